"""The block-caching engine and its public interface.

An `Engine` owns the caches — the block store (item and glue blocks; items sharded over the mesh's
`items` axis, glue replicated), the user store and the prefix cache (pages of one replicated KV
pool) — and ranks prompts in any mode: `full` (reference), `prefix` (vLLM-style prefix caching,
`engine/prefix_baseline.py`) and the block modes `stitch`, `sink`, `deviation`, `rcllm`, each a
selective-recompute `Policy`. Warm-up is `engine/warm_up.py`, snapshot I/O `cache/snapshot.py`;
both, like the service and every launcher, use only the public methods: `rank`, `rank_step`,
`update_user`, `prefill_inputs`, `weights`, `pool_on`, `answer_scores`, `shard_bytes`, `item_info`,
`stats`, `build_store`, `reset_caches`, `warm_up`, `save` / `restore`, `save_users` / `restore_users`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax import kernels
from rcllm_jax.buckets import coarse_bucket
from rcllm_jax.cache import snapshot
from rcllm_jax.cache.block_store import PAD as STORE_PAGE
from rcllm_jax.cache.block_store import PASS_ROWS, REPLICATED, ROW_TOKENS, BlockStore
from rcllm_jax.cache.keys import model_fingerprint
from rcllm_jax.cache.pool import PAGE, KVPool, PageAllocator
from rcllm_jax.cache.stores import PrefixCache, UserStore
from rcllm_jax.data.prompt import Prompt, PromptBuilder, check_prompt_length
from rcllm_jax.engine import prefix_baseline, serving_step, warm_up
from rcllm_jax.engine.plan import (Layout, device_layout, history_prefix, pad_arrays, served_from_cache, span_entries, stitch_plan,
                                  store_spans)
from rcllm_jax.engine.ranking import EngineResult, answer_logit_ids, candidate_scores, rank_full, slot_rows
from rcllm_jax.engine.ranking_head import HeadError, head_prompt
from rcllm_jax.engine.selective_recompute import BLOCK_MODES, Policy, PrefillInputs, block_policy, selection_size
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import Params
from rcllm_jax.model.lora import AdapterMismatchError, check_fits
from rcllm_jax.parallel.mesh import (MeshSpec, check_model_axis, make_mesh, shard_view, shardings,
                                    weight_shardings)

# prefix_warm: prefix caching whose instruction + history pages are computed at event time
# (`warm_prefix`, like the user store of the block modes), the strongest prefix baseline
MODES = ("full", "prefix", "prefix_warm") + tuple(BLOCK_MODES)


class _States:
    """A stand-in head whose scores are the slot states themselves (`Engine.slot_states`)."""

    base_fingerprint = None

    @staticmethod
    def scores(hidden):
        return np.asarray(hidden, np.float32)


_STATES = _States()


def _adapted(head, params, cfg: ModelConfig):
    """The base weights with the head's query adapter folded in; a HeadError when its shapes do
    not fit this model."""
    try:
        check_fits(params, head.adapter, head.adapter_cfg)
    except AdapterMismatchError as e:
        raise HeadError(f"the ranking head's query adapter does not fit this model ({e})") from None
    return head.query_params(params)


# Item blocks are encoded after the instruction and the glue that precedes a first candidate: the
# item's first token then has its real left context (in a score-slot prompt, at every position).
# Measured: BENCHMARKS.md "The served model"; "instruction" alone left that token wrong and needed
# a recomputed sink.
DEFAULT_CANONICAL = "candidate"
CANONICAL_CONTEXTS = ("candidate", "instruction")


@dataclasses.dataclass(frozen=True)
class StagedCatalog:
    """A catalog and its snapshot step loaded beside the served ones (`Engine.stage_catalog`)."""

    builder: PromptBuilder
    item_blocks: dict  # item -> its block's tokens
    store: BlockStore
    step: int


class Engine:
    """Ranks prompts in any mode. Item blocks are encoded after `canonical_context` tokens, glue
    blocks after the instruction.

    On a mesh (`rcllm_jax.parallel.mesh`): item blocks are sharded along `items` and placed by
    `placement`; weights, glue, the user store and the prefix cache are on every device. A request
    runs on one items-shard (`shard=`, else the one holding most of its item-block bytes), which
    fetches its remote blocks through a collective. Without a mesh: one device (items:1).
    """

    last_step: dict | None = None  # shapes of the last `rank_step` (requests, batch, per-shard counts)

    def __init__(self, params: Params, cfg: ModelConfig, builder: PromptBuilder, *, item_ids,
                 canonical: str = DEFAULT_CANONICAL, user_pages: int = 2048, prefix_pages: int = 2048,
                 fingerprint: str | None = None, max_candidates: int = 100, attention_impl: str = "xla",
                 mesh=None, placement: str = "similarity", replicate: float = 0.0, head=None, coaccess=None,
                 kv_dtype: str | None = None, exact_fetch: bool = True):
        """head: the trained `SlotHead` that scores slot prompts (`PromptBuilder(head="slot")`),
        refused when it was trained on other weights. coaccess: the co-access log (candidate id
        lists the retrieval stage returns for training histories, `ItemKNN.coaccess_requests`):
        the `coaccess` placement's graph and what hot-item replication ranks items by
        (`set_coaccess`; without it such a store refuses to place blocks). replicate: up to this
        fraction of a shard's item tokens more per shard for items held on every shard
        (`rcllm_jax.parallel.placement`). kv_dtype: how the block store holds cached KV (default: the
        model's dtype; "bfloat16" halves its bytes, "int8" with a scale per token and KV head about
        quarters them; each request reads it back into the model's
        dtype). exact_fetch: remote rows move device to device in compact buffers (one process;
        else, or False: the whole-mesh collective, `BlockStore.fetch`)."""
        self.mesh = mesh if mesh is not None else make_mesh(MeshSpec(), devices=jax.devices()[:1])
        check_model_axis(cfg, self.mesh.shape["model"])
        self.cfg, self.builder = cfg, builder
        self.impl = kernels.resolve(attention_impl)  # kernels of the block modes, read on every request
        kernels.check_model(cfg, self.impl)
        self.fingerprint = fingerprint or model_fingerprint(params, cfg)
        if head is not None and head.base_fingerprint != self.fingerprint:
            raise HeadError(f"the ranking head was trained on other weights ({head.base_fingerprint[:12]}…) than "
                            f"this model ({self.fingerprint[:12]}…)")
        if head is not None and head_prompt(head) != builder.template.digest():
            raise HeadError(f"the ranking head was trained on another prompt template (digest {head_prompt(head)}) "
                            f"than this one ({builder.template.digest()}): train a head on it (launch/train.py "
                            "--prompt=...)")
        self.head = head
        # mode -> the Policy it runs; `rcllm` is replaced by a calibrated one (`set_policy`,
        # `engine/calibration.py`), which `calibration` then describes
        self.policies, self.calibration = dict(BLOCK_MODES), None
        self.replicated = shardings(self.mesh)["replicated"]
        self.params = self._place_weights(params)
        # the weights of the rows computed per request: the base, or the base + the head's query adapter
        self.has_query_adapter = getattr(head, "adapter", None) is not None
        self.query_params = self._place_weights(_adapted(head, params, cfg)) if self.has_query_adapter else self.params
        self._replicas = {}  # (shard, query?) -> the weights as that shard's row holds them
        # the Pallas paths read a request's cached rows in place when they all lie on its shard;
        # False: fetch them as a request with remote rows does (warm-up compiles both programs)
        self.read_in_place = True
        self.canonical = canonical
        self.item_blocks = {int(i): builder.item_block(int(i)).tokens for i in item_ids}
        self.glue_blocks = self._glue_blocks(max_candidates)
        # items after the canonical context; glue always after the instruction alone (glue encoded
        # after "...(A)" would follow a label, which measurably derails the answer)
        self.store = BlockStore(self.mesh, cfg, self.fingerprint,
                                {"item": self.canonical_context(), "glue": builder.instruction.tokens},
                                placement=placement, replicate=replicate, dtype=kv_dtype)
        self.store.exact_fetch = exact_fetch
        if coaccess is not None:
            self.set_coaccess(coaccess)
        # page 0 is scratch (slot 0 takes padding rows): every page is PAGE-aligned, so attention can
        # read a prefix as whole pages of the pool
        self.pool = KVPool(cfg, (1 + user_pages + prefix_pages) * PAGE, sharding=shardings(self.mesh)["kv_pool"])
        self._pages = (user_pages, prefix_pages)
        self.reset_caches()

    def policy(self, mode) -> Policy:
        """The `Policy` a block mode (a name or a Policy) runs with on this engine."""
        return block_policy(mode, policies=self.policies)

    def set_policy(self, mode: str, policy: Policy, calibration=None):
        """Run block mode `mode` with `policy` from now on (before `warm_up`: the recompute rows
        it compiles depend on it); `calibration`: the measurement that chose it (reported by the
        server's /healthz and the benchmark)."""
        if mode not in BLOCK_MODES:
            raise ValueError(f"{mode!r} is not a block mode ({', '.join(BLOCK_MODES)})")
        self.policies[mode] = policy
        if mode == "rcllm":
            self.calibration = calibration

    @property
    def num_shards(self) -> int:
        return self.mesh.shape["items"]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one cached token's KV in the block store."""
        return self.store.bytes_per_token

    def device(self, shard: int):
        """The device that runs requests of an items-shard."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} outside the mesh's {self.num_shards} items-shards")
        return self.mesh.devices[shard, 0]

    def _place_weights(self, params):
        """Weights on the mesh: whole on every items-shard, split over `model` (`weight_shardings`)."""
        return jax.device_put(params, weight_shardings(params, self.mesh))

    def weights(self, shard: int, query: bool = False):
        """The weights a request served on `shard` runs with, as that shard's row holds them (one
        device on model:1, split over the row's devices otherwise: `shard_view`) (query: those that
        compute its rows: the base + the head's query adapter, if any): what `PrefillInputs.run`
        takes. Leaves are None in a process that does not hold the row."""
        self.device(shard)
        if (shard, query) not in self._replicas:
            tree = self.query_params if query else self.params
            self._replicas[shard, query] = jax.tree.map(lambda a: shard_view(a, self.mesh, shard), tree)
        return self._replicas[shard, query]

    def pool_on(self, shard: int):
        """(k, v) of the KV pool (user store and prefix cache pages) as `shard`'s row holds it."""
        self.device(shard)
        return shard_view(self.pool.k, self.mesh, shard), shard_view(self.pool.v, self.mesh, shard)

    def warm_fetch(self) -> int:
        """Compile the remote fetches of every suffix length served so far, for every pair of
        shards and remote-buffer size (`BlockStore.warm_fetch`): a warm-up's few prompts reach
        only the pairs their items happen to need. Returns the combinations run."""
        return self.store.warm_fetch(self.impl)

    def serving_shapes(self, mode="rcllm", max_candidates: int | None = None) -> dict:
        """Every shape a block-mode request can take (`engine.warm_up.serving_shapes`)."""
        return warm_up.serving_shapes(self, mode, max_candidates)

    def warm_up(self, mode="rcllm", max_candidates: int | None = None, max_batch: int = 0) -> int:
        """Compile every program a block-mode request can need before serving
        (`engine.warm_up.warm_up`); `reset_caches` drops the warm-up user's prefix. Returns the
        number of shapes run."""
        return warm_up.warm_up(self, mode, max_candidates, max_batch)

    def reset_caches(self):
        """Empty the user store and the prefix cache (the block store stays): a fresh serving state."""
        self.users = UserStore(self.pool, PageAllocator(PAGE, self._pages[0]))
        self._reset_prefix()

    def _reset_prefix(self):
        user_pages, prefix_pages = self._pages
        self.prefix = PrefixCache(self.pool, PageAllocator((1 + user_pages) * PAGE, prefix_pages), self.fingerprint)

    def canonical_context(self) -> tuple[int, ...]:
        """Tokens an item block is encoded after: the instruction block, optionally followed by the
        glue that precedes a first candidate in the prompt's head format (what really stands
        before an item in a prompt)."""
        instr = self.builder.instruction.tokens
        if self.canonical == "instruction":
            return instr
        if self.canonical == "candidate":
            return instr + tuple(self.builder.tok.encode(self.builder.first_lead()))
        raise ValueError(f"unknown canonical context {self.canonical!r}: {' | '.join(CANONICAL_CONTEXTS)}")

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

    # --- caches ----------------------------------------------------------------------------

    def build_store(self, row_tokens: int = ROW_TOKENS, rows: int = PASS_ROWS,
                    progress=None):
        """Encode every item block and glue block not stored yet (the block store; passes of
        `rows` packed rows of `row_tokens` tokens per items-shard). Returns the per-pass timings
        (`BlockStore.build`)."""
        return self.store.build(self.params, self._blocks(), row_tokens=row_tokens, rows=rows, progress=progress)

    def update_store(self, row_tokens: int = ROW_TOKENS, rows: int = PASS_ROWS, progress=None) -> dict:
        """Bring a restored block store to this engine's catalog, encoding only what changed: blocks
        of items no longer in it (or whose text changed) dropped, new ones encoded and placed
        beside the kept ones, which do not move (`BlockStore.update`)."""
        return self.store.update(self.params, self._blocks(), row_tokens=row_tokens, rows=rows, progress=progress)

    def _blocks(self) -> dict[str, list]:
        """Every block this engine's catalog and prompt need, by kind (what the store must hold)."""
        return {"item": list(self.item_blocks.values()), "glue": self.glue_blocks}

    def update_user(self, user_id, prompt: Prompt, version: int | None = None) -> int:
        """Bring the user's cached prefix (instruction + history block) up to date; returns the
        number of tokens computed (0 on a hit). version: the stored history's version it stands
        for (saved with it: a restore drops a prefix whose history has moved on)."""
        computed = self.users.ensure(self.params, self.cfg, user_id, history_prefix(prompt), version=version)
        jax.block_until_ready((self.pool.k, self.pool.v))  # an event handler finishes its writes
        return computed

    @contextlib.contextmanager
    def _leases(self, requests):
        """Lease each (prompt, user_id) request's own prefix for the duration of the block: computed
        when missing, never evicted or extended in place until the block ends. Yields the tokens
        each request computed for its prefix."""
        held, computed = [], []
        try:
            for prompt, user_id in requests:
                key = history_prefix(prompt)
                computed.append(self.users.ensure(self.params, self.cfg, user_id, key, pin=True))
                held.append(key)
            jax.block_until_ready((self.pool.k, self.pool.v))
            yield computed
        finally:
            for key in held:
                self.users.release(key)

    def user_prefix(self, user_id) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        """(tokens, k, v [L, n, K, H]) of a user's cached instruction + history prefix (to keep
        it outside the store: training examples reuse their prefixes across epochs)."""
        if str(user_id) not in self.users.latest:
            raise KeyError(f"user {user_id!r} has no cached prefix")
        sl = self.users.slots(user_id)
        return self.users.latest[str(user_id)], np.asarray(self.pool.k[:, sl]), np.asarray(self.pool.v[:, sl])

    def has_user(self, user_id) -> bool:
        """Is the user's prefix in the user store (not evicted)?"""
        return str(user_id) in self.users.latest

    def put_user_prefix(self, user_id, tokens, k, v):
        """Put a prefix taken with `user_prefix` back (most recently used)."""
        self.users.restore_user(user_id, tuple(int(t) for t in tokens), jnp.asarray(k), jnp.asarray(v))

    def warm_prefix(self, prompt: Prompt, shard: int = 0) -> int:
        """Event-time warming of the prefix cache (the prefix_warm baseline,
        `engine.prefix_baseline.warm_prefix`); returns the tokens computed (0 on a hit)."""
        return prefix_baseline.warm_prefix(self, prompt, shard)

    def _item_entries(self, item_ids):
        out = []
        for i in item_ids:
            toks = self.item_blocks.get(int(i))
            e = None if toks is None else self.store.lookup("item", toks)
            if e is not None:
                out.append(e)
        return out

    def shard_bytes(self, item_ids) -> np.ndarray:
        """[N] bytes of these items' cached blocks that each items-shard holds (what a request
        with these candidates would read locally on each shard)."""
        return self.store.shard_bytes(self._item_entries(item_ids))

    def set_coaccess(self, candidate_lists):
        """The co-access log of the `coaccess` placement and of hot-item replication (also for
        what-if `locality`): candidate id lists of the retrieval stage (`ItemKNN.coaccess_requests`
        over training sequences), or a function returning them, called only when a placement
        first needs them (a restore onto the saved layout never does); items this engine does not
        hold are left out. Set before the store is built or restored (a built store is not moved)."""
        key_of = {i: self.store.key("item", t) for i, t in self.item_blocks.items()}

        def keys(lists):
            return [tuple(key_of[int(c)] for c in cands if int(c) in key_of) for cands in lists]
        self.store.coaccess = (lambda: keys(candidate_lists())) if callable(candidate_lists) else keys(candidate_lists)

    def locality(self, candidate_lists, placement: str | None = None, replicate: float | None = None) -> dict:
        """How local a request stream (candidate id lists) would be under `placement` of the stored
        item blocks with hot-item `replicate` (default: the store's own), each request on the
        shard holding most of its candidates' bytes: mean local fraction, remote blocks and
        remote bytes per request."""
        from rcllm_jax.parallel.placement import locality
        key_of = {i: self.store.key("item", t) for i, t in self.item_blocks.items()}
        key_of = {i: k for i, k in key_of.items() if k in self.store.entries}
        if not key_of:
            return {}
        table = self.store.placement_of(placement, replicate)
        out = locality({i: table[k] for i, k in key_of.items()}, {i: self.store.entries[k].length for i, k in key_of.items()},
                       [[c for c in cands if c in key_of] for cands in candidate_lists], self.num_shards)
        out["remote_bytes_per_request"] = out.pop("remote_tokens_per_request") * self.kv_bytes_per_token
        return out

    def item_info(self, item_id: int) -> dict:
        """Whether the item's block is cached, on which shard (None: not cached or replicated),
        whether every shard holds it (hot-item replication), its tokens."""
        toks = self.item_blocks.get(int(item_id)) or self.builder.item_block(int(item_id)).tokens
        e = self.store.lookup("item", toks)
        return {"cached": e is not None, "shard": None if e is None or e.shard == REPLICATED else e.shard,
                "replicated": e is not None and e.shard == REPLICATED, "block_tokens": len(toks)}

    def cached_users(self) -> frozenset:
        """The users whose latest history prefix the user store holds (their next request with that
        history computes none of it)."""
        return frozenset(self.users.latest)

    def stats(self) -> dict:
        """Counts of every cache (for /healthz, /metrics and the launchers' summaries)."""
        loads = self.store.shard_loads()
        return {"item_blocks": self.store.count("item"), "item_tokens": self.store.num_tokens("item"),
                "item_bytes": self.store.num_tokens("item") * self.kv_bytes_per_token,
                "glue_blocks": self.store.count("glue"), "shard_tokens": loads.tolist(),
                "replicated_item_blocks": self.store.count("item", replicated=True),
                "replicated_item_tokens": self.store.num_tokens("item", replicated=True),
                "placement": self.store.placement, "replicate": self.store.replicate, "kv_dtype": str(self.store.dtype),
                "users_cached": len(self.users.latest), "user_prefixes": len(self.users.entries),
                "user_store": dict(self.users.stats), "prefix_cache": dict(self.prefix.stats)}

    def identity(self) -> dict:
        """What a snapshot must match to be restored into this engine."""
        return snapshot.identity(self.fingerprint, self.builder.tok.content_hash(), self.store.contexts)

    def save(self, directory) -> int:
        """Save the block store and the user store as a new snapshot step (Orbax); returns the step."""
        return snapshot.save(directory, self.identity(), self.store, self.users, self.replicated)

    def restore(self, directory, step: int | None = None) -> dict:
        """Load a snapshot (this or another items mesh; blocks laid out under this engine's
        placement). Refused (nothing changed) for another model, tokenizer or context, or a
        damaged snapshot. Returns its metadata."""
        meta = snapshot.restore(directory, self.identity(), self.store, self.users, self.replicated, step=step)
        self._reset_prefix()
        return meta

    def stage_catalog(self, builder: PromptBuilder, item_ids, directory, step: int | None = None) -> "StagedCatalog":
        """A newer snapshot step and the catalog it was built for, loaded beside what is served
        (off the serving path; nothing served changes): the step's blocks (newest intact, or `step`)
        in a new block store like this one, the catalog's item blocks, every one of which the step
        must hold (refused otherwise: run launch/build_cache.py --update first). The prompt must
        be this engine's (same tokenizer, template and contexts). `install` swaps it in."""
        if builder.template.digest() != self.builder.template.digest():
            raise ValueError("a reload keeps the prompt template: restart the server to change it")
        item_blocks = {int(i): builder.item_block(int(i)).tokens for i in item_ids}
        store = self.store.empty_like()
        meta = snapshot.restore_blocks(directory, self.identity(), store, self.replicated, step=step)
        missing = [i for i, t in item_blocks.items() if store.lookup("item", t) is None]
        if missing:
            raise snapshot.SnapshotError(
                f"snapshot {directory} step {meta['step']} lacks the blocks of {len(missing)} of the catalog's "
                f"{len(item_blocks)} items (e.g. item {builder.items[missing[0]].id!r}): run launch/build_cache.py "
                "--update first (nothing was changed)")
        return StagedCatalog(builder, item_blocks, store, int(meta["step"]))

    def install(self, staged: "StagedCatalog") -> None:
        """Serve a staged catalog from now on (reference swaps: call it between requests). The user
        store and the prefix cache stay (their prefixes are the histories' text, not the items')."""
        self.builder, self.item_blocks, self.store = staged.builder, staged.item_blocks, staged.store

    def copy_blocks_from(self, other: "Engine"):
        """Take another engine's encoded blocks (same model, tokenizer and contexts; any mesh),
        laid out under this engine's placement on its mesh: nothing is encoded again."""
        if other.identity() != self.identity():
            raise ValueError("blocks of another model, tokenizer or context cannot be copied")
        host = other.store.host_blocks()
        self.store.load_blocks(host, {k: e.kind for k, e in other.store.entries.items()}, other.store.embeddings)

    def save_users(self, directory) -> int:
        """Save the user store's prefixes (what a server saves on shutdown: a cache of the state
        database's histories)."""
        return snapshot.save_users(directory, self.identity(), self.users)

    def restore_users(self, directory, keep=None) -> dict:
        """Put the latest saved user store back (keep(user, version): whether a saved prefix still
        stands for the user's history); returns the histories an older snapshot carried."""
        return snapshot.restore_users(directory, self.identity(), self.users, self.replicated, keep=keep)

    # --- ranking ---------------------------------------------------------------------------

    def rank(self, prompt: Prompt, mode, user_id=None, shard: int | None = None) -> EngineResult:
        """Rank the prompt's candidates in `mode` (a mode name or a `Policy`). shard: the
        items-shard that serves it (block modes default to the affinity choice, full and prefix to
        shard 0)."""
        check_prompt_length(len(prompt), self.cfg.max_position, "the model's context")
        if mode == "full":
            s = shard or 0
            params = self.weights(s)
            qp = self.weights(s, query=True) if self.has_query_adapter else None
            r = rank_full(params, self.cfg, prompt, self.head, qp) if params["embed"] is not None else None
            fields = None if r is None else (r.scores, np.float64(r.ttft_s), np.int64(r.computed_tokens))
            scores, ttft, computed = self._from_owner(s, fields, (
                np.zeros(len(prompt.candidates), np.float32), np.float64(0), np.int64(0)))
            return EngineResult(scores=scores, ttft_s=float(ttft), prompt_tokens=len(prompt),
                                computed_tokens=int(computed), shard=s)
        if mode in ("prefix", "prefix_warm"):  # the same computation; prefix_warm callers warm at event time
            return prefix_baseline.rank_prefix(self, prompt, shard or 0)
        if not isinstance(mode, Policy) and mode not in BLOCK_MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        return self._rank_policy(prompt, block_policy(mode, user_id, policies=self.policies), user_id, shard=shard)

    def rank_step(self, requests, mode="rcllm", pad_to: tuple[int, int, int] | None = None) -> list[EngineResult]:
        """Rank block-mode requests in one serving step (`engine/serving_step.py`): each on its
        items-shard (given, else the affinity choice), each shard's requests as one batch, every
        shard in one SPMD program. requests: (prompt, user_id, shard or None) each, prompts of one
        head. The scores `rank` gives one by one; every result's ttft_s is the step's (history
        prefixes brought up to date before it starts). Requests whose answer needs the prompt KV
        (multi-token labels), and every request of a multi-process run, are ranked one by one.
        pad_to: (prefix, suffix, recompute rows): pad the step's prefix and suffix to at least these
        and run it with exactly this many recompute rows (`warm_up` compiles a shape so)."""
        policy = block_policy(mode, *(user_id for _, user_id, _ in requests), policies=self.policies)
        heads = {prompt.head for prompt, _, _ in requests}
        if len(heads) > 1:
            raise ValueError(f"a serving step takes prompts of one head, got {sorted(heads)}")
        out: list[EngineResult | None] = [None] * len(requests)
        batched = []
        for i, (prompt, user_id, shard) in enumerate(requests):
            check_prompt_length(len(prompt), self.cfg.max_position, "the model's context")
            if jax.process_count() > 1 or (prompt.head == "label" and not prompt.single_token_labels):
                out[i] = self.rank(prompt, policy, user_id=user_id, shard=shard)
            else:
                batched.append(i)
        if not batched:
            return out
        with self._leases([(requests[i][0], requests[i][1]) for i in batched]) as computed:
            return self._rank_leased(requests, policy, out, batched, dict(zip(batched, computed)), pad_to)

    def _rank_leased(self, requests, policy: Policy, out: list, batched: list[int], computed_prefix: dict,
                     pad_to) -> list[EngineResult]:
        """`rank_step`'s serving step over the requests `batched`, each one's prefix leased."""
        t0 = time.perf_counter()
        stitched = {i: self._stitch(requests[i][0], requests[i][1], policy, requests[i][2]) for i in batched}
        slots = requests[batched[0]][0].head == "slot"
        outs_of = {i: slot_rows(requests[i][0], stitched[i][0].n_prefix) if slots else
                   np.asarray(answer_logit_ids(requests[i][0])) for i in batched}
        n_sel = {i: selection_size(stitched[i][0].forced, stitched[i][0].cached, stitched[i][0].valid, policy)
                 for i in batched}
        p_len = max(len(stitched[i][0].prefix_slots) for i in batched)
        t_len = max(len(stitched[i][0].tokens) for i in batched)
        n_max = max(n_sel.values())
        if pad_to is not None:
            p_len, t_len, n_max = max(p_len, pad_to[0]), max(t_len, pad_to[1]), pad_to[2]
        c_len = max(len(outs_of[i]) for i in batched)
        n = self.num_shards
        counts = np.bincount([stitched[i][0].shard for i in batched], minlength=n)
        b = coarse_bucket(counts.max(), 1)
        host = [np.stack([a] * n * b) for a in serving_step.filler(p_len, t_len)]
        outs = np.full((n * b, c_len), -1 if slots else 0, np.int32)
        keep = np.ones(n * b, np.int32)
        want = np.full((n, b * t_len), -1, np.int64)  # per shard, its batch's cached rows (slot -1: none)
        delta = np.zeros((n, b * t_len), np.int32)
        row_of, taken = {}, np.zeros(n, np.int64)
        for i in batched:
            lay = stitched[i][0]
            s = lay.shard
            j = int(taken[s])
            taken[s] += 1
            row = row_of[i] = s * b + j
            for a, x in zip(host, pad_arrays(lay.arrays(), p_len, t_len)):
                a[row] = x
            outs[row, :len(outs_of[i])] = outs_of[i]
            keep[row] = n_sel[i]
            cols = slice(j * t_len, j * t_len + len(lay.tokens))
            want[s, cols], delta[s, cols] = lay.block_slots, lay.real_pos - lay.canon_pos
        stack = functools.partial(serving_step.stack_rows, self.mesh)
        spans = {i: self._store_spans(stitched[i][0], policy, False) for i in batched}
        in_place = all(x is not None for x in spans.values())
        if in_place:  # every request reads its cached rows where they lie: the store and the spans
            table = np.zeros((5, n * b, span_entries(t_len)), np.int32)  # filler and padding entries: no rows
            for i in batched:
                table[:, row_of[i], :len(spans[i][0])] = spans[i]
            cached_rows = (self.store.k, self.store.v, *map(stack, table))
        else:  # each shard's cached rows in one fetch (remote ones in compact buffers), [L, B, T, K, H]
            kv = [self.store.fetch(want[s], delta[s], s, self.impl) for s in range(n)]
            shape = (self.cfg.num_layers, b, t_len, self.cfg.num_kv_heads, self.cfg.head_dim)
            cached_rows = tuple(serving_step.stack_device_rows(self.mesh, [x[j].reshape(shape) for x in kv])
                                for j in (0, 1))
        fn = serving_step.step_program(self.mesh, self.cfg, n_max, policy.check_layer,
                                       policy.deviation_on, self.impl, slots, in_place)
        logits, r, sel = fn(self.query_params, self.pool.k, self.pool.v, *map(stack, host), stack(outs), stack(keep),
                            *cached_rows)
        logits, r, sel = np.asarray(logits), np.asarray(r), np.asarray(sel)
        scores = {}
        for i in batched:
            prompt, row = requests[i][0], row_of[i]
            sc, extra = self.answer_scores(prompt, logits[row][:len(prompt.candidates)], None, stitched[i][0].shard)
            scores[i] = (np.asarray(sc), int(extra))
        ttft = time.perf_counter() - t0
        for i in batched:
            lay, items = stitched[i]
            out[i] = self._policy_result(requests[i][0], policy, lay, items, scores[i][0], r[row_of[i]],
                                         sel[row_of[i]], scores[i][1], computed_prefix[i], ttft)
        self.last_step = {"requests": len(batched), "batch": b, "shard_requests": counts.tolist(),
                          "prefix": p_len, "suffix": t_len, "n_select": n_max, "in_place": in_place}
        return out

    def slot_states(self, prompt: Prompt, mode, user_id=None, shard: int | None = None) -> np.ndarray:
        """[K, D] final-normed hidden states of a slot prompt's score slots, computed exactly as
        `rank` computes them in `mode` (what a ranking head reads; its training examples)."""
        if prompt.head != "slot":
            raise ValueError("slot_states needs a slot prompt (PromptBuilder(head='slot'))")
        head, self.head = self.head, _STATES
        try:
            return np.asarray(self.rank(prompt, mode, user_id=user_id, shard=shard).scores)
        finally:
            self.head = head

    def _stitch(self, prompt: Prompt, user_id, policy: Policy, shard: int | None = None):
        """(the request's device layout, the cached item blocks it reads). Looks every cacheable
        block up once; the plan is made from that lookup."""
        entries = [None, None] + [self.store.lookup(b.kind, b.tokens) if served_from_cache(b, policy.cached_glue)
                                  else None for b in prompt.blocks[2:]]
        plan = stitch_plan(prompt, [None if e is None else self.store.canon_start(e) for e in entries],
                           sink=policy.sink)
        items = [e for e in entries if e is not None and e.kind == "item"]  # hot replicas too: local anywhere
        if shard is None:  # affinity: the shard holding most of the request's item bytes (lowest on ties)
            shard = int(np.argmax(self.store.shard_bytes(items)))
        self.device(shard)
        lay = device_layout(prompt, plan, self.users.slots_of(history_prefix(prompt)),
                            [None if e is None else self.store.slot(e, shard) for e in entries], shard)
        return lay, items

    def answer_scores(self, prompt: Prompt, out, kv, shard: int = 0):
        """(candidate scores [K], label tokens computed) from a prefill's output on `shard`: the
        ranking head's scores of the slot states, or the label log-probabilities."""
        if prompt.head == "slot":
            if self.head is None:
                raise ValueError("slot prompts need a trained ranking head (Engine(head=SlotHead.load(...)))")
            return self.head.scores(np.asarray(out)[:len(prompt.candidates)]), 0
        return candidate_scores(self.weights(shard), self.cfg, prompt, out, kv)

    def prefill_inputs(self, prompt: Prompt, mode="rcllm", user_id=None, shard: int | None = None):
        """(PrefillInputs, Layout, cached item entries) of a block-mode request: the user's prefix
        brought up to date, the stitched layout, its cached rows fetched onto the serving shard
        (remote ones through the block store's collective). `inputs.run(weights)` is the blended
        prefill `rank` runs (with the query weights); training differentiates through the same
        call. inputs is None in a process that does not hold the shard's device."""
        policy = block_policy(mode, user_id, policies=self.policies)
        lay, items = self._stitch(prompt, user_id, policy, shard)
        n_select = selection_size(lay.forced, lay.cached, lay.valid, policy)
        return_kv = prompt.head == "label" and not prompt.single_token_labels
        spans = self._store_spans(lay, policy, return_kv)
        store = None
        if spans is None:
            ck, cv = self.store.fetch(lay.block_slots, lay.real_pos - lay.canon_pos, lay.shard, self.impl)
        else:
            ck = cv = None
            store = (*self.store.local_arrays(lay.shard), *spans)
        if self.weights(lay.shard)["embed"] is None:
            return None, lay, items
        pk, pv = self.pool_on(lay.shard)
        inputs = PrefillInputs(
            (pk, pv, *lay.arrays(), answer_logit_ids(prompt), ck, cv, slot_rows(prompt, lay.n_prefix)),
            n_select=n_select, cfg=self.cfg, check_layer=policy.check_layer, deviation_on=policy.deviation_on,
            return_kv=return_kv, impl=self.impl, store=store)
        return inputs, lay, items

    def _store_spans(self, lay: Layout, policy: Policy, return_kv: bool):
        """The request's spans in its shard's block store (`plan.store_spans`) when its attention reads
        the cached rows there in place, else None (they are fetched: gathered and re-rotated into a
        buffer). In place on the Pallas paths (`--attention_impl=pallas`: the paged kernel rotates
        the query back per span, so no row is copied), for a policy without a deviation check (that
        compares fresh K/V with the cached rows, so it needs them in a buffer), a float store
        (int8 rows are dequantized on arrival), one process, KV heads not split over a `model`
        axis, every cached row on the serving shard. The XLA path fetches: its reference of the
        paged read gathers whole pages, and on the CPU rotating each query per span costs more than
        rotating each cached row once (at history 50 / 50 candidates: 64 queries x 9 heads x ~170
        spans against ~900 rows x 3 KV heads)."""
        if (self.impl == "xla" or not self.read_in_place or policy.check_layer is not None or return_kv
                or self.store.quantized or jax.process_count() > 1 or self.mesh.shape.get("model", 1) > 1):
            return None
        return store_spans(lay, self.store.shard_slots, STORE_PAGE)

    def _from_owner(self, shard: int, value, placeholder):
        """In a multi-process run only the process holding the shard's device computed `value`;
        every process gets it (a broadcast). One process: `value` itself."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils
        owner = self.device(shard).process_index == jax.process_index()
        return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value if owner else placeholder,
                                                                             is_source=owner))

    def _rank_policy(self, prompt: Prompt, policy: Policy, user_id, shard: int | None = None) -> EngineResult:
        with self._leases([(prompt, user_id)]) as (computed_prefix,):
            t0 = time.perf_counter()
            inputs, lay, items = self.prefill_inputs(prompt, policy, user_id, shard)
            return self._run_policy(prompt, policy, inputs, lay, items, computed_prefix, t0)

    def _run_policy(self, prompt: Prompt, policy: Policy, inputs, lay, items, computed_prefix: int,
                    t0: float) -> EngineResult:
        n_select = inputs.n_select if inputs is not None else selection_size(lay.forced, lay.cached, lay.valid, policy)
        value = None
        if inputs is not None:
            logits, r, sel, kv = inputs.run(self.weights(lay.shard, query=True))
            scores, extra = self.answer_scores(prompt, logits, kv, lay.shard)
            value = (np.asarray(scores), np.asarray(r), np.asarray(sel), np.int64(extra))
        scores, r, sel, extra = self._from_owner(lay.shard, value, (
            np.zeros(len(prompt.candidates), np.float32), np.zeros(n_select, np.int32), np.zeros(n_select, bool),
            np.int64(0)))
        return self._policy_result(prompt, policy, lay, items, scores, r, sel, int(extra), computed_prefix,
                                   time.perf_counter() - t0)

    def _policy_result(self, prompt: Prompt, policy: Policy, lay, items, scores, r, sel, extra: int,
                       computed_prefix: int, ttft: float) -> EngineResult:
        """A block-mode request's result: its scores and what was computed, cached, local, remote."""
        chosen = r[sel]
        cached = lay.cached
        recomputed_block = int(cached[chosen].sum())
        full_layers = (policy.check_layer + 1) if policy.ratio else 0
        computed = (full_layers * lay.n_suffix + (self.cfg.num_layers - full_layers) * len(chosen)) / self.cfg.num_layers
        need = self.store.shard_bytes(items)
        n_local = sum(1 for e in items if e.shard in (lay.shard, REPLICATED))
        replica_bytes = sum(e.length for e in items if e.shard == REPLICATED) * self.kv_bytes_per_token
        return EngineResult(scores=scores, ttft_s=ttft,
                            prompt_tokens=len(prompt), computed_tokens=int(round(computed)) + extra + computed_prefix,
                            recomputed_block_tokens=recomputed_block, cached_block_tokens=int(cached.sum()),
                            cache_hit_tokens=lay.n_prefix - computed_prefix + int(cached.sum()) - recomputed_block,
                            selected=chosen, shard=lay.shard, local_item_blocks=n_local,
                            remote_item_blocks=len(items) - n_local,
                            local_item_bytes=int(need[lay.shard]) + replica_bytes,
                            remote_item_bytes=int(need.sum() - need[lay.shard]))
