"""The block-caching engine: item store + user store + prefix cache over one KV pool, and the
prefill modes that use them.

Modes: `full` (reference), `prefix` (vLLM-style prefix caching), and the block modes `stitch`,
`sink`, `deviation`, `rcllm`, each a `Policy` for choosing which suffix tokens to recompute.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.buckets import bucket
from rcllm_jax.cache.keys import model_fingerprint
from rcllm_jax.cache.pool import PAGE, KVPool, PageAllocator
from rcllm_jax.cache.stores import BlockStore, PrefixCache, UserStore
from rcllm_jax.data.prompt import Prompt, PromptBuilder
from rcllm_jax.engine.blend import Layout, blended_prefill
from rcllm_jax.engine.plan import served_from_cache, stitch_plan
from rcllm_jax.engine.ranking import RankResult, answer_logit_ids, candidate_scores, rank_full
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import Params


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which suffix tokens a block mode recomputes, beyond glue and the question (always)."""

    sink: int = 0  # first tokens of every cached block (EPIC LegoLink-k)
    ratio: float = 0.0  # fraction of cached block tokens chosen by deviation (CacheBlend)
    check_layer: int | None = None  # layer at which deviation is measured (layers below run in full)
    deviation_on: str = "k"  # "k" (LMCache) or "v" (original CacheBlend)
    cached_glue: bool = False  # serve label/question glue from the block store too: only the
    #                            prompt's last token is then always recomputed

    def __post_init__(self):
        if self.ratio and self.check_layer is None:
            raise ValueError("a deviation ratio needs a check layer")
        if self.deviation_on not in ("k", "v"):
            raise ValueError("deviation_on must be 'k' or 'v'")


BLOCK_MODES = {
    "stitch": Policy(),
    "sink": Policy(sink=2),
    "deviation": Policy(ratio=0.15, check_layer=1),
    # Chosen by measurement (WORKSPACE_NOTES.md, issue 4): the lowest TTFT at top-1 agreement
    # >= 0.99 vs full prefill on the default workload. On the zero-shot model that is pure
    # stitching with cached glue (every policy keeps top-1 there: the model always answers "A");
    # re-measure with `launch/bench.py --sweep=...` when the model changes.
    "rcllm": Policy(cached_glue=True),
}
MODES = ("full", "prefix") + tuple(BLOCK_MODES)


@dataclasses.dataclass(frozen=True)
class EngineResult(RankResult):
    recomputed_block_tokens: int = 0  # cached block tokens recomputed (sink + deviation picks)
    cached_block_tokens: int = 0  # suffix tokens served from the item store
    cache_hit_tokens: int = 0  # prompt tokens whose KV came from a cache (prefix + items)
    selected: np.ndarray | None = None  # [n] suffix indices recomputed (block modes)


class Engine:
    """Ranks prompts in any mode. Item blocks are encoded after `canonical_context` tokens."""

    def __init__(self, params: Params, cfg: ModelConfig, builder: PromptBuilder, *, item_ids,
                 canonical: str = "instruction", user_pages: int = 2048, prefix_pages: int = 2048,
                 fingerprint: str | None = None, max_candidates: int = 100, attention_impl: str = "xla"):
        from pallas_kernels.dispatch import resolve
        self.params, self.cfg, self.builder = params, cfg, builder
        self.impl = resolve(attention_impl)  # kernels of the block modes: xla | pallas | interpret
        self.fingerprint = fingerprint or model_fingerprint(params, cfg)
        self.canonical = canonical
        self.item_blocks = {int(i): builder.item_block(int(i)).tokens for i in item_ids}
        self.glue_blocks = self._glue_blocks(max_candidates)
        item_tokens = sum(len(t) for t in self.item_blocks.values())
        glue_tokens = sum(len(t) for t in self.glue_blocks)
        first_page_slot = 1 + item_tokens + glue_tokens
        self.pool = KVPool(cfg, first_page_slot + (user_pages + prefix_pages) * PAGE)
        # items after the canonical context; glue always after the instruction alone (glue encoded
        # after "...(A)" would follow a label, which measurably derails the answer)
        self.blocks = BlockStore(self.pool, self.fingerprint, self.canonical_context(), 1, item_tokens)
        self.glue_store = BlockStore(self.pool, self.fingerprint, builder.instruction.tokens,
                                     1 + item_tokens, glue_tokens)
        self._pages = (first_page_slot, user_pages, prefix_pages)
        self.reset_caches()

    def reset_caches(self):
        """Empty the user store and the prefix cache (the block stores stay): a fresh serving state."""
        first, user_pages, prefix_pages = self._pages
        self.users = UserStore(self.pool, PageAllocator(first, user_pages))
        self.prefix = PrefixCache(self.pool, PageAllocator(first + user_pages * PAGE, prefix_pages),
                                  self.fingerprint)

    def canonical_context(self) -> tuple[int, ...]:
        """Tokens an item block is encoded after: the instruction block, optionally followed by the
        glue that precedes a first candidate (what really stands before an item in a prompt)."""
        instr = self.builder.instruction.tokens
        if self.canonical == "instruction":
            return instr
        if self.canonical == "candidate":
            return instr + tuple(self.builder.tok.encode(self.builder.template.candidates_intro + "\n(A)"))
        raise ValueError(f"unknown canonical context {self.canonical!r}: instruction | candidate")

    def _glue_blocks(self, max_candidates: int) -> list[tuple[int, ...]]:
        """The request-independent glue of every prompt with up to max_candidates candidates:
        each label's "\n(X)" / "Candidates:\n(A)" and the question block."""
        probe = self.builder.build([], list(self.builder.items)[:1])
        out = {probe.blocks[-1].tokens}
        for k in (52, max_candidates):  # every letter label, and number labels up to max_candidates
            if k > len(self.builder.items):
                continue
            p = self.builder.build([], list(self.builder.items)[:k])
            out.update(b.tokens for b in p.blocks if b.kind == "glue")
        return sorted(out)

    def build_store(self, batch: int = 32, progress=None):
        """Encode every item block and glue block once (the block stores)."""
        self.blocks.build(self.params, self.cfg, list(self.item_blocks.values()), batch=batch, progress=progress)
        self.glue_store.build(self.params, self.cfg, self.glue_blocks, batch=batch, progress=progress)

    def update_user(self, user_id: int, prompt: Prompt) -> int:
        """Bring the user's cached prefix (instruction + history block) up to date; returns the
        number of tokens computed (0 on a hit)."""
        b0, b1 = prompt.blocks[0], prompt.blocks[1]
        if (b0.kind, b1.kind) != ("instruction", "history"):
            raise ValueError("prompt does not start with instruction + history blocks")
        computed = self.users.ensure(self.params, self.cfg, user_id, b0.tokens + b1.tokens)
        jax.block_until_ready((self.pool.k, self.pool.v))  # an event handler finishes its writes
        return computed

    # --- layouts ---------------------------------------------------------------------------

    def _block_layout(self, prompt: Prompt, user_id: int, policy: Policy):
        prefix_slots = self.users.slots(user_id)
        entries = {}  # block tokens -> BlockEntry of the blocks served from a store

        def canon_start(blk):
            if not served_from_cache(blk, policy.cached_glue):
                return None
            entry = (self.blocks if blk.kind == "item" else self.glue_store).lookup(blk.tokens)
            if entry is not None:
                entries[blk.tokens] = entry
            return None if entry is None else entry.canon_start

        plan = stitch_plan(prompt, canon_start, sink=policy.sink)
        if plan.n_prefix != len(prefix_slots):
            raise RuntimeError("user store prefix does not match the prompt's instruction + history")
        rows = []  # (token, canon_pos, slot, cached, forced)
        toks = prompt.tokens
        for t in range(plan.n_prefix, len(toks)):
            cached = bool(plan.cached[t])
            blk = prompt.blocks[plan.block[t]]
            slot = entries[blk.tokens].slot + int(plan.canon_pos[t] - entries[blk.tokens].canon_start) if cached else 0
            rows.append([int(toks[t]), int(plan.canon_pos[t]), slot, cached, bool(plan.forced[t])])
        return self._layout(prefix_slots, rows)

    def _layout(self, prefix_slots, rows) -> Layout:
        n_p, n_t = len(prefix_slots), len(rows)
        pb, tb = bucket(n_p, 16), bucket(n_t, 16)
        ps = np.zeros(pb, np.int32)
        ps[:n_p] = prefix_slots
        tok, canon, slot, cached, forced = (np.array([r[j] for r in rows]) for j in range(5))

        def pad(a, dtype, fill=0):
            out = np.full(tb, fill, dtype)
            out[:n_t] = a
            return out
        real = n_p + np.arange(tb, dtype=np.int32)
        return Layout(prefix_slots=ps, prefix_valid=np.arange(pb) < n_p, tokens=pad(tok, np.int32),
                      real_pos=real, canon_pos=pad(canon, np.int32, 0) + np.where(np.arange(tb) < n_t, 0, real),
                      slots=pad(slot, np.int32), cached=pad(cached, bool), forced=pad(forced, bool),
                      valid=np.arange(tb) < n_t, n_prefix=n_p, n_suffix=n_t)

    # --- ranking ---------------------------------------------------------------------------

    def rank(self, prompt: Prompt, mode: str, user_id: int | None = None) -> EngineResult:
        if mode == "full":
            r = rank_full(self.params, self.cfg, prompt)
            return EngineResult(**dataclasses.asdict(r))
        if len(prompt) > self.cfg.max_position:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the model's context of {self.cfg.max_position}")
        if mode == "prefix":
            return self._rank_prefix(prompt)
        if mode not in BLOCK_MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if user_id is None:
            raise ValueError(f"mode {mode!r} needs the user id (the user store keys history blocks by user)")
        return self.rank_policy(prompt, BLOCK_MODES[mode], user_id)

    @staticmethod
    def selection_size(lay: Layout, policy: Policy) -> int:
        """Rows of the recompute set: the forced tokens plus ratio x the other cached tokens,
        rounded up to a shape bucket (the extra rows take the next-highest deviations, or are
        masked out when there is no deviation check)."""
        want = int(lay.forced[lay.valid].sum()) + math.ceil(policy.ratio * int((lay.cached & ~lay.forced).sum()))
        return min(len(lay.tokens), bucket(max(want, 1), 16))

    def rank_policy(self, prompt: Prompt, policy: Policy, user_id: int) -> EngineResult:
        computed_prefix = self.update_user(user_id, prompt)
        t0 = time.perf_counter()
        lay = self._block_layout(prompt, user_id, policy)
        n_cached = int(lay.cached.sum())
        n_select = self.selection_size(lay, policy)
        logits, r, sel, kv = blended_prefill(
            self.params, self.pool.k, self.pool.v, *map(jnp.asarray, lay.arrays()), answer_logit_ids(prompt),
            cfg=self.cfg, n_select=n_select, check_layer=policy.check_layer if policy.ratio else None,
            deviation_on=policy.deviation_on, return_kv=not prompt.single_token_labels, impl=self.impl)
        scores, extra = candidate_scores(self.params, self.cfg, prompt, logits, kv)
        scores = np.asarray(scores)
        ttft = time.perf_counter() - t0
        r, sel = np.asarray(r), np.asarray(sel)
        chosen = r[sel]
        recomputed_block = int(lay.cached[chosen].sum())
        full_layers = (policy.check_layer + 1) if policy.ratio else 0
        computed = (full_layers * lay.n_suffix + (self.cfg.num_layers - full_layers) * len(chosen)) / self.cfg.num_layers
        return EngineResult(scores=scores, ttft_s=ttft,
                            prompt_tokens=len(prompt), computed_tokens=int(round(computed)) + extra + computed_prefix,
                            recomputed_block_tokens=recomputed_block, cached_block_tokens=n_cached,
                            cache_hit_tokens=lay.n_prefix + n_cached - recomputed_block, selected=chosen)

    def _rank_prefix(self, prompt: Prompt) -> EngineResult:
        t0 = time.perf_counter()
        toks = prompt.tokens
        pages, hit = self.prefix.lookup(toks)
        rows = [(int(t), hit + i, 0, False, True) for i, t in enumerate(toks[hit:])]
        lay = self._layout(self.prefix.alloc.slots(pages, hit) if pages else np.zeros(0, np.int32), rows)
        logits, _, _, kv = blended_prefill(
            self.params, self.pool.k, self.pool.v, *map(jnp.asarray, lay.arrays()), answer_logit_ids(prompt),
            cfg=self.cfg, n_select=len(lay.tokens), all_fresh=True, return_kv=True)
        scores, extra = candidate_scores(self.params, self.cfg, prompt, logits,
                                         None if prompt.single_token_labels else kv)
        scores = np.asarray(scores)
        ttft = time.perf_counter() - t0
        # store the new full pages (vLLM writes them during prefill; here after the answer)
        pb = len(lay.prefix_slots)
        self.prefix.insert(toks, kv.k[:, 0, pb:pb + lay.n_suffix], kv.v[:, 0, pb:pb + lay.n_suffix], hit)
        return EngineResult(scores=scores, ttft_s=ttft,
                            prompt_tokens=len(prompt), computed_tokens=len(prompt) - hit + extra,
                            cache_hit_tokens=hit)

