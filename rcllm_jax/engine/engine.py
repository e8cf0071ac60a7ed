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
import numpy as np

from rcllm_jax.buckets import bucket
from rcllm_jax.cache.item_store import ItemStore
from rcllm_jax.cache.keys import model_fingerprint
from rcllm_jax.cache.pool import PAGE, KVPool, PageAllocator
from rcllm_jax.cache.stores import BlockStore, PrefixCache, UserStore
from rcllm_jax.dist.mesh import MeshSpec, make_mesh, shardings
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
    shard: int = 0  # items-shard that served the request
    local_item_blocks: int = 0  # cached item blocks held by that shard
    remote_item_blocks: int = 0  # cached item blocks fetched from other shards
    local_item_bytes: int = 0
    remote_item_bytes: int = 0


class Engine:
    """Ranks prompts in any mode. Item blocks are encoded after `canonical_context` tokens.

    On a mesh (`rcllm_jax.dist.mesh`): item blocks live in the `ItemStore`, sharded along `items`
    and placed by `placement`; weights, glue, the user store and the prefix cache are replicated on
    every device. A request runs on one items-shard (`shard=`, else the one holding most of its
    item-block bytes), which fetches its remote blocks through a collective. Without a mesh: one
    device (items:1).
    """

    def __init__(self, params: Params, cfg: ModelConfig, builder: PromptBuilder, *, item_ids,
                 canonical: str = "instruction", user_pages: int = 2048, prefix_pages: int = 2048,
                 fingerprint: str | None = None, max_candidates: int = 100, attention_impl: str = "xla",
                 mesh=None, placement: str = "similarity"):
        from pallas_kernels.dispatch import resolve
        self.mesh = mesh if mesh is not None else make_mesh(MeshSpec(), devices=jax.devices()[:1])
        if self.mesh.shape["model"] != 1:
            raise ValueError(f"the block engine serves on model:1 meshes only (got model:{self.mesh.shape['model']}); "
                             "tensor parallelism inside an items-shard is not implemented: use --mesh=items:N")
        self.cfg, self.builder = cfg, builder
        self.impl = resolve(attention_impl)  # kernels of the block modes: xla | pallas | interpret
        self.fingerprint = fingerprint or model_fingerprint(params, cfg)
        self.replicated = shardings(self.mesh)["replicated"]
        self.params = jax.device_put(params, self.replicated)
        self._replicas = {}  # device -> that device's copy of the weights
        self.canonical = canonical
        self.item_blocks = {int(i): builder.item_block(int(i)).tokens for i in item_ids}
        self.glue_blocks = self._glue_blocks(max_candidates)
        glue_tokens = sum(len(t) for t in self.glue_blocks)
        first_page_slot = 1 + glue_tokens
        self.pool = KVPool(cfg, first_page_slot + (user_pages + prefix_pages) * PAGE, sharding=self.replicated)
        # items after the canonical context; glue always after the instruction alone (glue encoded
        # after "...(A)" would follow a label, which measurably derails the answer)
        self.blocks = ItemStore(self.mesh, cfg, self.fingerprint, self.canonical_context(), placement=placement,
                                impl=self.impl)
        self.glue_store = BlockStore(self.pool, self.fingerprint, builder.instruction.tokens, 1, glue_tokens)
        self._pages = (first_page_slot, user_pages, prefix_pages)
        self.reset_caches()

    @property
    def num_shards(self) -> int:
        return self.mesh.shape["items"]

    def device(self, shard: int):
        """The device that runs requests of an items-shard."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} outside the mesh's {self.num_shards} items-shards")
        return self.mesh.devices[shard, 0]

    def _on(self, tree, dev):
        """`dev`'s copy of replicated arrays (None where this process does not hold `dev`)."""
        def one(a):
            for s in a.addressable_shards:
                if s.device == dev:
                    return s.data
            return None
        return jax.tree.map(one, tree)

    def _params_on(self, dev):
        if dev not in self._replicas:
            self._replicas[dev] = self._on(self.params, dev)
        return self._replicas[dev]

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
        probe = self.builder.build([], list(self.builder.items)[:1], check_length=False)
        out = {probe.blocks[-1].tokens}
        for k in (52, max_candidates):  # every letter label, and number labels up to max_candidates
            if k > len(self.builder.items):
                continue
            p = self.builder.build([], list(self.builder.items)[:k], check_length=False)  # glue only
            out.update(b.tokens for b in p.blocks if b.kind == "glue")
        return sorted(out)

    def build_store(self, batch: int = 32, progress=None):
        """Encode every item block and glue block once (the block stores)."""
        self.blocks.build(self.params, list(self.item_blocks.values()), batch=batch, progress=progress)
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

    def _block_layout(self, prompt: Prompt, user_id: int, policy: Policy) -> Layout:
        prefix_slots = self.users.slots(user_id)
        entries = {}  # block tokens -> (kind, entry) of the blocks served from a store

        def canon_start(blk):
            if not served_from_cache(blk, policy.cached_glue):
                return None
            entry = (self.blocks if blk.kind == "item" else self.glue_store).lookup(blk.tokens)
            if entry is not None:
                entries[blk.tokens] = (blk.kind, entry)
            return None if entry is None else entry.canon_start

        plan = stitch_plan(prompt, canon_start, sink=policy.sink)
        if plan.n_prefix != len(prefix_slots):
            raise RuntimeError("user store prefix does not match the prompt's instruction + history")
        rows = []  # (token, canon_pos, pool slot, cached, forced, item-store slot)
        toks = prompt.tokens
        for t in range(plan.n_prefix, len(toks)):
            cached = bool(plan.cached[t])
            slot, item_slot = 0, -1
            if cached:
                kind, e = entries[prompt.blocks[plan.block[t]].tokens]
                off = int(plan.canon_pos[t] - e.canon_start)
                if kind == "item":
                    item_slot = self.blocks.global_slot(e) + off
                else:
                    slot = e.slot + off
            rows.append([int(toks[t]), int(plan.canon_pos[t]), slot, cached, bool(plan.forced[t]), item_slot])
        items = tuple(e for kind, e in entries.values() if kind == "item")
        return self._layout(prefix_slots, rows, items)

    def _layout(self, prefix_slots, rows, item_blocks=()) -> Layout:
        n_p, n_t = len(prefix_slots), len(rows)
        pb, tb = bucket(n_p, 16), bucket(n_t, 16)
        ps = np.zeros(pb, np.int32)
        ps[:n_p] = prefix_slots
        tok, canon, slot, cached, forced, item_slot = (np.array([r[j] for r in rows]) for j in range(6))

        def pad(a, dtype, fill=0):
            out = np.full(tb, fill, dtype)
            out[:n_t] = a
            return out
        real = n_p + np.arange(tb, dtype=np.int32)
        return Layout(prefix_slots=ps, prefix_valid=np.arange(pb) < n_p, tokens=pad(tok, np.int32),
                      real_pos=real, canon_pos=pad(canon, np.int32, 0) + np.where(np.arange(tb) < n_t, 0, real),
                      slots=pad(slot, np.int32), cached=pad(cached, bool), forced=pad(forced, bool),
                      valid=np.arange(tb) < n_t, n_prefix=n_p, n_suffix=n_t,
                      item_slots=pad(item_slot, np.int32, -1), item_blocks=tuple(item_blocks))

    def affinity_shard(self, lay: Layout) -> int:
        """The items-shard holding most of the request's cached item-block bytes (lowest on ties)."""
        load = np.zeros(self.num_shards, np.int64)
        for e in lay.item_blocks:
            load[e.shard] += e.length
        return int(np.argmax(load))

    # --- ranking ---------------------------------------------------------------------------

    def rank(self, prompt: Prompt, mode: str, user_id: int | None = None, shard: int | None = None) -> EngineResult:
        """Rank the prompt's candidates in `mode`. shard: the items-shard that serves it (block
        modes default to the affinity choice, full and prefix to shard 0)."""
        if mode == "full":
            s = shard or 0
            params = self._params_on(self.device(s))
            r = rank_full(params, self.cfg, prompt) if params["embed"] is not None else None
            fields = None if r is None else (r.scores, np.float64(r.ttft_s), np.int64(r.computed_tokens))
            scores, ttft, computed = self._from_owner(s, fields, (
                np.zeros(len(prompt.candidates), np.float32), np.float64(0), np.int64(0)))
            return EngineResult(scores=scores, ttft_s=float(ttft), prompt_tokens=len(prompt),
                                computed_tokens=int(computed), shard=s)
        if len(prompt) > self.cfg.max_position:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the model's context of {self.cfg.max_position}")
        if mode == "prefix":
            return self._rank_prefix(prompt, shard or 0)
        if mode not in BLOCK_MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if user_id is None:
            raise ValueError(f"mode {mode!r} needs the user id (the user store keys history blocks by user)")
        return self.rank_policy(prompt, BLOCK_MODES[mode], user_id, shard=shard)

    @staticmethod
    def selection_size(lay: Layout, policy: Policy) -> int:
        """Rows of the recompute set: the forced tokens plus ratio x the other cached tokens,
        rounded up to a shape bucket (the extra rows take the next-highest deviations, or are
        masked out when there is no deviation check)."""
        want = int(lay.forced[lay.valid].sum()) + math.ceil(policy.ratio * int((lay.cached & ~lay.forced).sum()))
        return min(len(lay.tokens), bucket(max(want, 1), 16))

    def prefill(self, lay: Layout, policy: Policy, shard: int, logit_ids=None, return_kv: bool = False):
        """The blended prefill of a block layout on `shard`: its remote item blocks fetched through
        the item store's collective, then one jitted program on that shard's device. Returns
        blended_prefill's outputs, or None in a process that does not hold the shard's device."""
        dev = self.device(shard)
        ik, iv = self.blocks.fetch(lay.item_slots, lay.real_pos - lay.canon_pos, shard)
        params = self._params_on(dev)
        if params["embed"] is None:
            return None
        pk, pv = self._on((self.pool.k, self.pool.v), dev)
        return blended_prefill(
            params, pk, pv, *lay.arrays(), logit_ids, ik, iv, lay.item_slots >= 0, cfg=self.cfg,
            n_select=self.selection_size(lay, policy), check_layer=policy.check_layer if policy.ratio else None,
            deviation_on=policy.deviation_on, return_kv=return_kv, impl=self.impl)

    def _from_owner(self, shard: int, value, placeholder):
        """In a multi-process run only the process holding the shard's device computed `value`;
        every process gets it (a broadcast). One process: `value` itself."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils
        owner = self.device(shard).process_index == jax.process_index()
        return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value if owner else placeholder,
                                                                             is_source=owner))

    def rank_policy(self, prompt: Prompt, policy: Policy, user_id: int, shard: int | None = None) -> EngineResult:
        computed_prefix = self.update_user(user_id, prompt)
        t0 = time.perf_counter()
        lay = self._block_layout(prompt, user_id, policy)
        shard = self.affinity_shard(lay) if shard is None else shard
        n_select = self.selection_size(lay, policy)
        out = self.prefill(lay, policy, shard, answer_logit_ids(prompt), return_kv=not prompt.single_token_labels)
        value = None
        if out is not None:
            logits, r, sel, kv = out
            scores, extra = candidate_scores(self._params_on(self.device(shard)), self.cfg, prompt, logits, kv)
            value = (np.asarray(scores), np.asarray(r), np.asarray(sel), np.int64(extra))
        scores, r, sel, extra = self._from_owner(shard, value, (
            np.zeros(len(prompt.candidates), np.float32), np.zeros(n_select, np.int32), np.zeros(n_select, bool),
            np.int64(0)))
        ttft = time.perf_counter() - t0
        chosen = r[sel]
        recomputed_block = int(lay.cached[chosen].sum())
        full_layers = (policy.check_layer + 1) if policy.ratio else 0
        computed = (full_layers * lay.n_suffix + (self.cfg.num_layers - full_layers) * len(chosen)) / self.cfg.num_layers
        local = [e for e in lay.item_blocks if e.shard == shard]
        remote = [e for e in lay.item_blocks if e.shard != shard]
        bpt = self.blocks.bytes_per_token
        return EngineResult(scores=scores, ttft_s=ttft,
                            prompt_tokens=len(prompt), computed_tokens=int(round(computed)) + int(extra) + computed_prefix,
                            recomputed_block_tokens=recomputed_block, cached_block_tokens=int(lay.cached.sum()),
                            cache_hit_tokens=lay.n_prefix + int(lay.cached.sum()) - recomputed_block, selected=chosen,
                            shard=shard, local_item_blocks=len(local), remote_item_blocks=len(remote),
                            local_item_bytes=sum(e.length for e in local) * bpt,
                            remote_item_bytes=sum(e.length for e in remote) * bpt)

    def _rank_prefix(self, prompt: Prompt, shard: int = 0) -> EngineResult:
        if jax.process_count() > 1:
            raise ValueError("prefix mode is a single-process baseline (its pages are written from one device)")
        dev = self.device(shard)
        t0 = time.perf_counter()
        toks = prompt.tokens
        pages, hit = self.prefix.lookup(toks)
        rows = [(int(t), hit + i, 0, False, True, -1) for i, t in enumerate(toks[hit:])]
        lay = self._layout(self.prefix.alloc.slots(pages, hit) if pages else np.zeros(0, np.int32), rows)
        params = self._params_on(dev)
        pk, pv = self._on((self.pool.k, self.pool.v), dev)
        logits, _, _, kv = blended_prefill(
            params, pk, pv, *lay.arrays(), answer_logit_ids(prompt),
            cfg=self.cfg, n_select=len(lay.tokens), all_fresh=True, return_kv=True)
        scores, extra = candidate_scores(params, self.cfg, prompt, logits,
                                         None if prompt.single_token_labels else kv)
        scores = np.asarray(scores)
        ttft = time.perf_counter() - t0
        # store the new full pages (vLLM writes them during prefill; here after the answer)
        pb = len(lay.prefix_slots)
        self.prefix.insert(toks, kv.k[:, 0, pb:pb + lay.n_suffix], kv.v[:, 0, pb:pb + lay.n_suffix], hit)
        return EngineResult(scores=scores, ttft_s=ttft,
                            prompt_tokens=len(prompt), computed_tokens=len(prompt) - hit + extra,
                            cache_hit_tokens=hit, shard=shard)
