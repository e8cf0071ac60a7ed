"""Training examples: ranking prompts built by the engine's prompt builder from each user's
training sequence (never the validation or test items), as padded arrays, through grain.

An example asks which of K candidates (the next item + K-1 sampled negatives, as in evaluation)
follows a prefix of the user's training sequence; the loss is on the answer's label token, plus
optionally a soft ranking target over all K labels from training-split popularity (a dense
teacher signal: every example ranks all its candidates, not just names one). With
probability `block_prob` an example carries the stitching plan of the engine (`engine/plan.py`):
its item blocks (and, per `block_glue`, its glue) attend as the cached blocks the engine stitches.
"""

from __future__ import annotations

import numpy as np

from rcllm_jax.data.movielens import LeaveOneOut, sample_candidates
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.plan import served_from_cache, stitch_plan

GLUE_CHOICES = ("fresh", "cached", "mixed")


def training_pairs(split: LeaveOneOut, min_history: int = 1) -> list[tuple[int, int]]:
    """(user, t): predict train_sequence[t] from train_sequence[:t], for every t >= min_history."""
    return [(u, t) for u in split.users for t in range(min_history, len(split.train_sequence(u)))]


def fit_prompt(builder: PromptBuilder, history, candidates, max_len: int):
    """The prompt, its history shortened (oldest items first) if needed to fit max_len tokens."""
    history = list(history)[-builder.history_len:] if builder.history_len else []
    while True:
        prompt = builder.build(history, candidates, check_length=False)
        if len(prompt) <= max_len or not history:
            return prompt
        history = history[1:]


def popularity_teacher(candidates, popularity, temperature: float) -> np.ndarray:
    """[K] soft ranking target from training-split popularity: p_j ~ (1 + count_j)^(1/temperature)."""
    logits = np.log1p(np.asarray([popularity.get(int(c), 0) for c in candidates], np.float64)) / temperature
    p = np.exp(logits - logits.max())
    return (p / p.sum()).astype(np.float32)


def prompt_arrays(prompt, target_index: int, max_len: int, *, block: bool, cached_glue: bool,
                  teacher: np.ndarray | None = None) -> dict:
    """Padded arrays of one prompt. block: attention as the engine stitches it with cached items
    encoded after the instruction alone (`Engine(canonical="instruction")`; glue cached too if
    cached_glue), else ordinary causal attention. teacher:
    a soft target over the candidates (default uniform; used only with a teacher weight)."""
    n = len(prompt)
    if n > max_len:
        raise ValueError(f"prompt of {n} tokens exceeds max_len={max_len}")
    if not prompt.single_token_labels:
        raise ValueError("training scores single-token labels only (at most 52 candidates)")
    real = np.arange(max_len, dtype=np.int32)
    seg, canon = np.zeros(max_len, np.int32), real.copy()
    forced = np.zeros(max_len, bool)
    if block:
        start = len(prompt.blocks[0].tokens)  # canonical context: the instruction
        plan = stitch_plan(prompt, [start if served_from_cache(b, cached_glue) else None for b in prompt.blocks])
        seg[:n], canon[:n], forced[:n] = plan.seg, plan.canon_pos, plan.forced
    tokens = np.zeros(max_len, np.int32)
    tokens[:n] = prompt.tokens
    return {"tokens": tokens, "canon_pos": canon, "seg": seg, "forced": forced, "valid": real < n,
            "answer_index": np.int32(n - 1), "label": np.int32(prompt.label_tokens[target_index][0]),
            "cand_ids": np.asarray([lt[0] for lt in prompt.label_tokens], np.int32),
            "target_index": np.int32(target_index), "block": np.bool_(block),
            "teacher": (np.full(len(prompt.candidates), 1 / len(prompt.candidates), np.float32)
                        if teacher is None else np.asarray(teacher, np.float32))}


class ExampleMaker:
    """(index, (user, t)) -> arrays; all randomness from (seed, index): a resumed stream repeats exactly."""

    def __init__(self, builder: PromptBuilder, split: LeaveOneOut, *, num_candidates: int, max_len: int,
                 negatives: str = "uniform", block_prob: float = 0.0, block_glue: str = "mixed", seed: int = 0,
                 teacher_temperature: float = 2.0):
        if block_glue not in GLUE_CHOICES:
            raise ValueError(f"block_glue must be one of {GLUE_CHOICES}")
        if not 0.0 <= block_prob <= 1.0:
            raise ValueError("block_attention_prob must be in [0, 1]")
        self.builder, self.split = builder, split
        self.k, self.max_len, self.negatives = num_candidates, max_len, negatives
        self.block_prob, self.block_glue, self.seed = block_prob, block_glue, seed
        self.teacher_temperature = teacher_temperature

    def __call__(self, index: int, pair) -> dict:
        user, t = int(pair[0]), int(pair[1])
        rng = np.random.default_rng([self.seed, index])
        seq = self.split.train_sequence(user)
        target = seq[t]
        cands = sample_candidates(self.split, user, target, self.k, self.negatives,
                                  seed=int(rng.integers(2 ** 31)))
        prompt = fit_prompt(self.builder, seq[:t], cands, self.max_len)
        block = bool(rng.random() < self.block_prob)
        glue = self.block_glue if self.block_glue != "mixed" else ("cached" if rng.random() < 0.5 else "fresh")
        teacher = popularity_teacher(cands, self.split.popularity, self.teacher_temperature)
        return prompt_arrays(prompt, cands.index(target), self.max_len, block=block, cached_glue=glue == "cached",
                             teacher=teacher)


def train_dataset(pairs, maker: ExampleMaker, batch_size: int, seed: int):
    """Endless shuffled stream of batches (grain); iterator state = position, for exact resume."""
    import grain
    ds = grain.MapDataset.source(np.asarray(pairs, np.int64)).shuffle(seed=seed).repeat(None)
    return ds.map_with_index(maker).batch(batch_size, drop_remainder=True)
