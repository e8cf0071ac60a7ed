"""The block store: the KV of every reusable prompt block (item blocks and label / question glue),
each encoded once after its kind's canonical context, in two arrays sharded along the mesh's
`items` axis.

Layout: k, v [L, N * S, K, H] (N items-shards of S slots each); shard s holds slots
[s * S, (s + 1) * S). Where a block lives is a property of its kind:
  replicated (glue)  one copy in every shard, at the same offsets [0, R) (R: the replicated
                     region, a multiple of PAD), so a request reads it locally whatever its shard;
  sharded (items)    one copy, in the shard the placement chose (`rcllm_jax.dist.placement`),
                     at an offset >= R; except the hot items that replication chose, which are
                     held like glue, in [0, R) of every shard.
Blocks occupy `length` consecutive slots starting at a PAD-aligned offset.

Content-addressed: key = hash(model fingerprint, the kind's canonical context, block tokens), so a
block of another model, context or text never matches. A block's first token was encoded at
position len(context of its kind).

A request served by shard `dest` reads its cached rows with `fetch`. In one process (default,
`fetch_exact`): each shard holding some of the rows gathers them as stored (bf16 moves as bf16)
into a compact buffer (row count rounded to a shape bucket), the buffer is copied device to
device to `dest` and scattered into place; so the bytes moved are the request's remote bytes
(+ the bucket padding). Across processes: one jitted `shard_map` in which every shard gathers its
rows into a T-row buffer and a reduce-scatter over `items` delivers them to `dest` (~N/2 x the
bytes needed). Either way `dest` reads the rows into the model's dtype and re-rotates the keys
from their canonical to their real positions in f32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rcllm_jax import kernels
from rcllm_jax.buckets import bucket
from rcllm_jax.cache.keys import block_key
from rcllm_jax.dist import placement as placement_lib
from rcllm_jax.dist.mesh import partition_specs
from rcllm_jax.model.config import ModelConfig, kv_bytes_per_token
from rcllm_jax.model.decoder import forward
from rcllm_jax.model.rope import inv_freq

PAD = 8  # block length granularity inside a shard
SLOT_ALIGN = 64  # shard sizes are multiples of this (restores onto other mesh sizes divide evenly)
REPLICATED = placement_lib.REPLICATED  # BlockEntry.shard of a block held by every shard
KV_DTYPES = ("float32", "bfloat16")  # how cached KV may be held (read back in the model's dtype)
KINDS = ("item", "glue")
REPLICATED_KINDS = ("glue",)


@dataclasses.dataclass(frozen=True)
class BlockEntry:
    key: str
    kind: str  # "item" | "glue"
    shard: int  # the shard holding it, or REPLICATED
    offset: int  # first slot inside the shard
    length: int


def padded_batch(blocks, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as one [batch, n] array (n: their longest length's bucket) and its valid mask."""
    n = bucket(max(len(t) for t in blocks), 8)
    toks = np.zeros((batch, n), np.int32)
    valid = np.zeros((batch, n), bool)
    for row, t in enumerate(blocks):
        toks[row, :len(t)] = t
        valid[row, :len(t)] = True
    return toks, valid


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_blocks(params, ctx_tokens, tokens, valid, *, cfg: ModelConfig):
    """KV ([L, B, n, K, H]) and mean final hidden state ([B, D]) of B blocks, each encoded after the
    same context tokens ([1, c])."""
    c = ctx_tokens.shape[1]
    _, ctx = forward(params, ctx_tokens, jnp.arange(c, dtype=jnp.int32)[None], cfg=cfg)
    b, n = tokens.shape
    ctx_b = jax.tree.map(lambda a: jnp.broadcast_to(a, (a.shape[0], b) + a.shape[2:]) if a.ndim == 5
                         else jnp.broadcast_to(a, (b,) + a.shape[1:]), ctx)
    pos = jnp.broadcast_to(c + jnp.arange(n, dtype=jnp.int32), (b, n))
    hidden, kv = forward(params, tokens, pos, cfg=cfg, valid=valid, cache=ctx_b, return_hidden="all")
    w = valid.astype(jnp.float32)[..., None]
    emb = jnp.sum(hidden.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return kv.k, kv.v, emb


class BlockStore:
    def __init__(self, mesh, cfg: ModelConfig, fingerprint: str, contexts: dict[str, tuple[int, ...]], *,
                 placement: str = "similarity", replicate: float = 0.0, dtype=None):
        """contexts: block kind -> the canonical context its blocks are encoded after; replicate:
        hot-item replication budget (`rcllm_jax.dist.placement`)."""
        if placement not in placement_lib.PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}: {' | '.join(placement_lib.PLACEMENTS)}")
        if set(contexts) != set(KINDS):
            raise ValueError(f"contexts for the block kinds {KINDS} expected, got {sorted(contexts)}")
        self.mesh, self.cfg, self.fingerprint = mesh, cfg, fingerprint
        self.contexts = {kind: tuple(int(t) for t in c) for kind, c in contexts.items()}
        self.placement, self.replicate = placement, placement_lib.check_replicate(replicate)
        self.num_shards = mesh.shape["items"]
        if dtype is not None and str(jnp.dtype(dtype)) not in KV_DTYPES:
            raise ValueError(f"unsupported KV cache dtype {dtype!r}: {' | '.join(KV_DTYPES)}")
        self.dtype = jnp.dtype(dtype or cfg.dtype)
        self.bytes_per_token = kv_bytes_per_token(cfg, self.dtype)
        self.sharding = NamedSharding(mesh, partition_specs()["block_store"])
        self.entries: dict[str, BlockEntry] = {}
        self.embeddings: dict[str, np.ndarray] = {}  # item key -> mean final hidden state (placement)
        self.coaccess: list[tuple[str, ...]] | None = None  # co-access log: block keys of each request
        self.exact_fetch = True  # single process: move only the rows a request needs (`fetch_exact`)
        self.shard_slots = SLOT_ALIGN
        shape = (cfg.num_layers, self.num_shards * self.shard_slots, cfg.num_kv_heads, cfg.head_dim)
        self.k = jax.device_put(jnp.zeros(shape, self.dtype), self.sharding)
        self.v = jax.device_put(jnp.zeros(shape, self.dtype), self.sharding)

    # --- identity and addressing -----------------------------------------------------------

    def key(self, kind: str, tokens) -> str:
        return block_key(self.fingerprint, self.contexts[kind], tuple(int(t) for t in tokens))

    def lookup(self, kind: str, tokens) -> BlockEntry | None:
        return self.entries.get(self.key(kind, tokens))

    def canon_start(self, entry: BlockEntry) -> int:
        """Position the block's first token was encoded at."""
        return len(self.contexts[entry.kind])

    def slot(self, entry: BlockEntry, shard: int) -> int:
        """Global slot of the block's first token as read by a request served on `shard`."""
        return (shard if entry.shard == REPLICATED else entry.shard) * self.shard_slots + entry.offset

    def shard_bytes(self, entries) -> np.ndarray:
        """[N] bytes of the sharded blocks among `entries` that each shard holds (replicated blocks
        are local everywhere and count nowhere). The one definition of a request's bytes per shard:
        the affinity rule, the scheduler and the locality reports all use it."""
        sharded = [e for e in entries if e.shard != REPLICATED]
        return placement_lib.shard_tokens([e.shard for e in sharded], [e.length for e in sharded],
                                          self.num_shards) * self.bytes_per_token

    def shard_loads(self) -> np.ndarray:
        """Real tokens of sharded blocks held by each shard."""
        return self.shard_bytes(self.entries.values()) // self.bytes_per_token

    def count(self, kind: str, replicated: bool | None = None) -> int:
        """Blocks of `kind` stored (replicated: only those held by every shard, or only those not)."""
        return len(self._of(kind, replicated))

    def num_tokens(self, kind: str = "item", replicated: bool | None = None) -> int:
        return int(sum(e.length for e in self._of(kind, replicated)))

    def _of(self, kind: str, replicated: bool | None) -> list[BlockEntry]:
        return [e for e in self.entries.values()
                if e.kind == kind and (replicated is None or (e.shard == REPLICATED) == replicated)]

    # --- building --------------------------------------------------------------------------

    def host_blocks(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every stored block's KV on the host ([L, n, K, H] each; replicated: shard 0's copy)."""
        if not self.entries:
            return {}
        k, v = to_host(self.k), to_host(self.v)
        out = {}
        for key, e in self.entries.items():
            g = self.slot(e, 0)
            out[key] = (k[:, g:g + e.length], v[:, g:g + e.length])
        return out

    def build(self, params, blocks: dict[str, list], batch: int = 32, progress=None):
        """Encode every block (kind -> token tuples) not stored yet after its kind's context, then
        place the sharded blocks and lay the arrays out again. Deterministic: every process of a
        multi-host run computes the same placement."""
        todo = {}
        for kind, token_lists in blocks.items():
            for toks in token_lists:
                toks = tuple(int(t) for t in toks)
                k = self.key(kind, toks)
                if toks and k not in self.entries:
                    todo[k] = (kind, toks)
        if not todo:
            return
        host = self.host_blocks()
        kinds = {k: e.kind for k, e in self.entries.items()}
        for kind in KINDS:
            ctx = jnp.asarray(np.asarray([self.contexts[kind]], np.int32))
            order = sorted((k for k in todo if todo[k][0] == kind), key=lambda k: (len(todo[k][1]), k))
            for s in range(0, len(order), batch):
                chunk = order[s:s + batch]
                toks, valid = padded_batch([todo[k][1] for k in chunk], batch)
                kk, vv, emb = encode_blocks(params, ctx, jnp.asarray(toks), jnp.asarray(valid), cfg=self.cfg)
                kk, vv, emb = (np.asarray(jax.device_get(a)) for a in (kk, vv, emb))
                for row, k in enumerate(chunk):
                    n_k = len(todo[k][1])
                    host[k] = (kk[:, row, :n_k].astype(self.dtype), vv[:, row, :n_k].astype(self.dtype))
                    kinds[k] = kind
                    if kind not in REPLICATED_KINDS:
                        self.embeddings[k] = emb[row]
                if progress is not None:
                    progress(len(chunk))
        self._lay_out_host(host, kinds)

    def _place(self, name: str, lengths: dict[str, int], kinds: dict[str, str],
               replicate: float | None = None) -> dict[str, int]:
        """Key -> shard (REPLICATED for replicated kinds and hot items) under placement `name` and
        hot-item `replicate` (default: the store's), from the blocks' lengths, the item
        embeddings and the co-access log."""
        keys = sorted(k for k in lengths if kinds[k] not in REPLICATED_KINDS)
        shard_of = {k: REPLICATED for k in lengths if kinds[k] in REPLICATED_KINDS}
        if keys:
            requests = None
            if self.coaccess is not None:
                at = {k: i for i, k in enumerate(keys)}
                requests = [[at[k] for k in r if k in at] for r in self.coaccess]
            shards = placement_lib.place(name, keys=keys, lengths=[lengths[k] for k in keys],
                                         embeddings=np.stack([self.embeddings[k] for k in keys]),
                                         num_shards=self.num_shards, requests=requests,
                                         replicate=self.replicate if replicate is None else replicate)
            shard_of |= {k: int(s) for k, s in zip(keys, shards)}
        return shard_of

    def _lay_out_host(self, host: dict, kinds: dict[str, str]):
        """Place the host blocks under the store's placement and lay them out."""
        self.lay_out(self._place(self.placement, {k: h[0].shape[1] for k, h in host.items()}, kinds), host, kinds)

    def lay_out(self, shard_of: dict[str, int], host: dict, kinds: dict[str, str]):
        """Pack the blocks (key -> (k, v) host arrays) into their shards and put the arrays on the mesh."""
        entries, fill = {}, 0
        for key in sorted(k for k in shard_of if shard_of[k] == REPLICATED):
            n = host[key][0].shape[1]
            entries[key] = BlockEntry(key, kinds[key], REPLICATED, fill, n)
            fill += -(-n // PAD) * PAD
        shard_fill = np.full(self.num_shards, fill, np.int64)
        for key in sorted(k for k in shard_of if shard_of[k] != REPLICATED):
            s, n = shard_of[key], host[key][0].shape[1]
            entries[key] = BlockEntry(key, kinds[key], s, int(shard_fill[s]), n)
            shard_fill[s] += -(-n // PAD) * PAD
        shard_slots = max(SLOT_ALIGN, int(-(-shard_fill.max() // SLOT_ALIGN) * SLOT_ALIGN))
        L, K, H = self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim
        hk = np.zeros((L, self.num_shards * shard_slots, K, H), self.dtype)
        hv = np.zeros_like(hk)
        for key, e in entries.items():
            for s in (range(self.num_shards) if e.shard == REPLICATED else (e.shard,)):
                g = s * shard_slots + e.offset
                hk[:, g:g + e.length], hv[:, g:g + e.length] = host[key]
        self.put_arrays(hk, hv, entries, shard_slots)

    def put_arrays(self, hk, hv, entries, shard_slots: int):
        """Install the KV arrays: host arrays are placed on the mesh; device arrays already laid
        out with the store's sharding (a restore) are taken as they are."""
        if isinstance(hk, jax.Array):
            self.k, self.v = hk, hv
        else:
            self.k = jax.make_array_from_callback(hk.shape, self.sharding, lambda idx: hk[idx])
            self.v = jax.make_array_from_callback(hv.shape, self.sharding, lambda idx: hv[idx])
        self.entries, self.shard_slots = dict(entries), shard_slots

    def load_blocks(self, host: dict, kinds: dict[str, str], embeddings: dict[str, np.ndarray]):
        """Replace the store's content by blocks given on the host (key -> (k, v) [L, n, K, H];
        key -> kind; item key -> embedding), laid out under the store's placement."""
        self.embeddings = dict(embeddings)
        self._lay_out_host(host, kinds)

    def placement_of(self, name: str | None = None, replicate: float | None = None) -> dict[str, int]:
        """Item block key -> shard (or REPLICATED) under placement `name` with hot-item `replicate`
        (default: the store's own), computed from the stored blocks' embeddings, lengths and the
        co-access log (what-if comparisons of placements)."""
        items = {k: e for k, e in self.entries.items() if e.kind not in REPLICATED_KINDS}
        name = self.placement if name is None else name
        replicate = self.replicate if replicate is None else float(replicate)
        if name == self.placement and replicate == self.replicate:
            return {k: e.shard for k, e in items.items()}
        return self._place(name, {k: e.length for k, e in items.items()}, {k: e.kind for k, e in items.items()},
                           replicate)

    # --- serving ---------------------------------------------------------------------------

    def fetch(self, slots: np.ndarray, delta: np.ndarray, dest: int, impl: str, exact: bool | None = None):
        """KV of the rows at global `slots` ([T], -1 = none), re-rotated by `delta` ([T] position
        offsets), delivered to items-shard `dest`: arrays [L, T, K, H] in the model's dtype on that
        shard's first device (None in a process that does not hold it). Rows with slot -1 are zero.
        impl: a resolved `rcllm_jax.kernels` implementation of the re-rotation. exact (default:
        `self.exact_fetch`, one process only): `fetch_exact`, else the collective."""
        if (self.exact_fetch if exact is None else exact) and jax.process_count() == 1:
            return self.fetch_exact(slots, delta, dest, impl)[:2]
        fn = _fetch_program(self.mesh, self.num_shards, self.shard_slots, self.cfg, impl)
        ok, ov = fn(self.k, self.v, jnp.asarray(slots, jnp.int32), jnp.asarray(delta, jnp.int32),
                    jnp.asarray(dest, jnp.int32))
        dev = self.mesh.devices[dest, 0]
        for sk, sv in zip(ok.addressable_shards, ov.addressable_shards):
            if sk.device == dev:
                return sk.data[0], sv.data[0]
        return None, None

    def fetch_exact(self, slots: np.ndarray, delta: np.ndarray, dest: int, impl: str):
        """`fetch` moving only the rows the request needs: every shard holding some gathers them
        into a compact buffer (its row count rounded up to a shape bucket) on its own device, the
        buffer is copied to `dest`'s device (device to device, nothing else moves) and scattered
        into place there. Returns (k, v, bytes moved between devices)."""
        slots = np.asarray(slots, np.int64)
        t, ss = len(slots), self.shard_slots
        owner = np.where(slots >= 0, slots // ss, -1)
        dev = self.mesh.devices[dest, 0]
        local = tuple({sh.device: sh.data for sh in a.addressable_shards} for a in (self.k, self.v))
        ok = ov = None
        moved = 0
        for j in np.unique(owner[owner >= 0]).tolist():
            pos = np.flatnonzero(owner == j)
            b = bucket(len(pos), 8)
            idx, tgt = np.zeros(b, np.int32), np.full(b, t, np.int32)  # padding rows land past the end: dropped
            idx[:len(pos)], tgt[:len(pos)] = slots[pos] - j * ss, pos
            src = self.mesh.devices[j, 0]
            gk, gv = _gather_rows(local[0][src], local[1][src], jax.device_put(idx, src))
            if j != dest:
                gk, gv = jax.device_put((gk, gv), dev)
                moved += 2 * gk.nbytes
            tgt = jax.device_put(tgt, dev)
            ok, ov = (_scatter_first(gk, gv, tgt, t=t) if ok is None else _scatter_rows(ok, ov, gk, gv, tgt))
        if ok is None:
            shape = (self.cfg.num_layers, t, self.cfg.num_kv_heads, self.cfg.head_dim)
            ok = ov = jax.device_put(np.zeros(shape, self.dtype), dev)
        k, v = _arrive(ok, ov, jax.device_put(np.asarray(delta, np.int32), dev), cfg=self.cfg, impl=impl)
        return k, v, moved


@jax.jit
def _gather_rows(k, v, idx):
    return k[:, idx], v[:, idx]


@functools.partial(jax.jit, static_argnames=("t",))
def _scatter_first(gk, gv, tgt, *, t: int):
    shape = (gk.shape[0], t) + gk.shape[2:]
    return (jnp.zeros(shape, gk.dtype).at[:, tgt].set(gk, mode="drop"),
            jnp.zeros(shape, gv.dtype).at[:, tgt].set(gv, mode="drop"))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _scatter_rows(ok, ov, gk, gv, tgt):
    return ok.at[:, tgt].set(gk, mode="drop"), ov.at[:, tgt].set(gv, mode="drop")


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _arrive(ok, ov, delta, *, cfg: ModelConfig, impl: str):
    """The fetched rows into the model's dtype, keys re-rotated to their real positions (f32)."""
    rows = jnp.arange(ok.shape[1], dtype=jnp.int32)
    return kernels.gather_rerotate(ok.astype(cfg.dtype), rows, delta, inv_freq(cfg), impl=impl), ov.astype(cfg.dtype)


@functools.lru_cache(maxsize=64)
def _fetch_program(mesh, n: int, shard_slots: int, cfg: ModelConfig, impl: str):
    inv = inv_freq(cfg)

    def local(k_l, v_l, want, delta, dest):
        j = jax.lax.axis_index("items")
        idx = want - j * shard_slots
        own = (want >= 0) & (idx >= 0) & (idx < shard_slots)
        idx = jnp.where(own, idx, 0)
        m = own[None, :, None, None]
        gk = jnp.where(m, k_l[:, idx], 0).astype(k_l.dtype)  # the stored rows as they are (bf16 moves as bf16)
        gv = jnp.where(m, v_l[:, idx], 0).astype(v_l.dtype)
        to = jax.nn.one_hot(dest, n, dtype=k_l.dtype)[:, None, None, None, None]  # row `dest` only
        rk = jax.lax.psum_scatter(to * gk[None], "items", scatter_dimension=0, tiled=True)
        rv = jax.lax.psum_scatter(to * gv[None], "items", scatter_dimension=0, tiled=True)
        # on arrival: into the model's dtype, keys re-rotated to their real positions (in f32)
        rows = jnp.arange(want.shape[0], dtype=jnp.int32)
        rk = kernels.gather_rerotate(rk[0].astype(cfg.dtype), rows, delta, inv, impl=impl)[None]
        return rk, rv.astype(cfg.dtype)

    store = partition_specs()["block_store"]
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(store, store, P(), P(), P()),
                                 out_specs=(P("items"), P("items")), check_vma=False))


def to_host(a) -> np.ndarray:
    """A global array on the host, whole, in every process."""
    if a.is_fully_addressable:
        return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
