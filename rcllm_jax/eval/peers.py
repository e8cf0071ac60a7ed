"""External peer for the benchmark: Hugging Face `transformers` on CPU torch, same weights, same
prompts, same candidate scoring: label prompts by log-softmax over the label tokens' first-token
logits; slot prompts by the same ranking head over transformers' final-normed hidden states at
the score slots (a head with a query adapter is not supported: its rows need other weights).

  hf_full    full prefill of every prompt;
  hf_prefix  prefix reuse the way a transformers user does it: the KV (`past_key_values`) of a
             stored prefix is deep-copied and only the rest of the prompt is run. Stored prefixes:
             the instruction (shared by every prompt) and each user's instruction + history from
             their previous request (written after that request, as a prefix cache would); the
             longest stored prefix of the prompt is used.

Optional dependency (the `parity` extra): `load_peer` returns None and a reason when it is absent.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np

from rcllm_jax.engine.ranking import EngineResult

PEER_MODES = ("hf_full", "hf_prefix")


def load_peer(model_source: str | Path, head=None):
    """(TransformersPeer, None) or (None, why it is unavailable). head: the `SlotHead` that scores
    slot prompts (None: label prompts only)."""
    import importlib.util
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed; pip install -e '.[parity]'"
    if head is not None and head.adapter is not None:
        return None, "the ranking head has a query adapter (its query rows need other weights than the peer's)"
    return TransformersPeer(model_source, head), None


class TransformersPeer:
    def __init__(self, model_source, head=None):
        import torch
        import transformers as tf
        torch.set_num_threads(os.cpu_count() or 1)
        src = Path(model_source)
        t0 = time.perf_counter()
        self.model = (tf.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
                      if src.suffix == ".gguf" else tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        self.torch = torch
        self.head = head
        self.reset()

    MAX_PREFIXES = 128  # stored prefixes kept (oldest dropped first): ~18 MB each at 400 tokens

    def reset(self):
        self.prefixes: dict[tuple[int, ...], object] = {}  # prefix tokens -> DynamicCache

    def _forward(self, ids, cache=None, rows=None):
        """(next-token logits, or with `rows` the final-normed hidden states at those indices of
        ids; the KV cache)."""
        with self.torch.no_grad():
            x = self.torch.as_tensor(np.asarray(ids, np.int64))[None]
            if rows is not None:  # the decoder only (its last hidden state is after the final norm)
                out = self.model.model(x, past_key_values=cache, use_cache=True)
                return out.last_hidden_state[0, np.asarray(rows)].float().numpy(), out.past_key_values
            out = self.model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().numpy(), out.past_key_values

    def _scores(self, prompt, out):
        if prompt.head == "slot":
            return self.head.scores(out)
        logits = out
        if not prompt.single_token_labels:
            raise ValueError("the transformers peer scores single-token labels only (<= 52 candidates)")
        x = logits[[lt[0] for lt in prompt.label_tokens]].astype(np.float64)
        return (x - np.logaddexp.reduce(x)).astype(np.float32)

    def rank(self, prompt, mode: str, user_id=None) -> EngineResult:
        toks = [int(t) for t in prompt.tokens]
        if prompt.head == "slot" and self.head is None:
            raise ValueError("slot prompts need the ranking head (load_peer(..., head=...))")
        slots = prompt.slot_positions if prompt.head == "slot" else None
        if mode == "hf_full":
            t0 = time.perf_counter()
            logits, _ = self._forward(toks, rows=slots)
            scores = self._scores(prompt, logits)
            return EngineResult(scores=scores, ttft_s=time.perf_counter() - t0, prompt_tokens=len(toks),
                                computed_tokens=len(toks))
        if mode != "hf_prefix":
            raise ValueError(f"unknown peer mode {mode!r}: {', '.join(PEER_MODES)}")
        n_instr = len(prompt.blocks[0].tokens)
        n_user = n_instr + len(prompt.blocks[1].tokens)
        hit = max((n for n in (n_user, n_instr) if tuple(toks[:n]) in self.prefixes and n < len(toks)), default=0)
        t0 = time.perf_counter()
        cache = copy.deepcopy(self.prefixes[tuple(toks[:hit])]) if hit else None
        logits, _ = self._forward(toks[hit:], cache, rows=None if slots is None else slots - hit)
        scores = self._scores(prompt, logits)
        ttft = time.perf_counter() - t0
        for n in (n_instr, n_user):  # store the prefixes, as a prefix cache would during this prefill
            if tuple(toks[:n]) not in self.prefixes:
                self.prefixes[tuple(toks[:n])] = self._forward(toks[:n])[1]
                if len(self.prefixes) > self.MAX_PREFIXES:
                    self.prefixes.pop(next(iter(self.prefixes)))
        return EngineResult(scores=scores, ttft_s=ttft, prompt_tokens=len(toks), computed_tokens=len(toks) - hit,
                            cache_hit_tokens=hit)
