"""The item store: every item block's KV in two arrays sharded along the mesh's `items` axis.

Layout: k, v [L, N * S, K, H] (N items-shards of S slots each); shard s holds slots
[s * S, (s + 1) * S). A block occupies `length` consecutive slots of one shard, starting at an
offset aligned to PAD tokens (block lengths bucketed to multiples of PAD); `valid` [N * S] marks
the slots that hold a real token (padding and free slots are False). Which shard holds a block is
the placement's choice (`rcllm_jax.dist.placement`).

A request served by shard `dest` fetches its cached item tokens with `fetch`: one jitted
`shard_map` in which every shard gathers (and re-rotates to the request's positions) the tokens it
owns, and a reduce-scatter over `items` delivers them to `dest`; tokens `dest` owns never leave it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import dispatch as kernels
from rcllm_jax.cache.keys import block_key
from rcllm_jax.cache.stores import padded_batch
from rcllm_jax.dist import placement as placement_lib
from rcllm_jax.dist.mesh import partition_specs
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import forward
from rcllm_jax.model.rope import inv_freq

PAD = 8  # block length granularity inside a shard
SLOT_ALIGN = 64  # shard sizes are multiples of this (restores onto other mesh sizes divide evenly)


@dataclasses.dataclass(frozen=True)
class ItemEntry:
    key: str
    shard: int
    offset: int  # first slot inside the shard
    length: int
    canon_start: int  # position of the block's first token when it was encoded


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_blocks(params, ctx_tokens, tokens, valid, *, cfg: ModelConfig):
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


class ItemStore:
    """Content-addressed like `BlockStore` (key = hash(model fingerprint, canonical context, tokens)),
    but sharded over `mesh`'s items axis and placed by `placement`."""

    def __init__(self, mesh, cfg: ModelConfig, fingerprint: str, context, *, placement: str = "similarity",
                 dtype=None, impl: str = "xla"):
        if placement not in placement_lib.PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}: {' | '.join(placement_lib.PLACEMENTS)}")
        self.mesh, self.cfg, self.fingerprint = mesh, cfg, fingerprint
        self.context, self.placement, self.impl = tuple(int(t) for t in context), placement, impl
        self.num_shards = mesh.shape["items"]
        self.dtype = jnp.dtype(dtype or cfg.dtype)
        self.bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        specs = partition_specs()
        self.sharding = NamedSharding(mesh, specs["item_store"])
        self.valid_sharding = NamedSharding(mesh, specs["item_store.valid"])
        self.entries: dict[str, ItemEntry] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        self.shard_slots = SLOT_ALIGN
        self._alloc(self.shard_slots)

    # --- identity and lookup ---------------------------------------------------------------

    def key(self, tokens) -> str:
        return block_key(self.fingerprint, self.context, tuple(int(t) for t in tokens))

    def lookup(self, tokens) -> ItemEntry | None:
        return self.entries.get(self.key(tokens))

    def global_slot(self, entry: ItemEntry) -> int:
        return entry.shard * self.shard_slots + entry.offset

    def shard_loads(self) -> np.ndarray:
        """Real tokens held by each shard."""
        load = np.zeros(self.num_shards, np.int64)
        for e in self.entries.values():
            load[e.shard] += e.length
        return load

    @property
    def num_tokens(self) -> int:
        return int(sum(e.length for e in self.entries.values()))

    # --- building --------------------------------------------------------------------------

    def _alloc(self, shard_slots: int):
        shape = (self.cfg.num_layers, self.num_shards * shard_slots, self.cfg.num_kv_heads, self.cfg.head_dim)
        self.k = jax.device_put(jnp.zeros(shape, self.dtype), self.sharding)
        self.v = jax.device_put(jnp.zeros(shape, self.dtype), self.sharding)
        self.valid = jax.device_put(jnp.zeros(shape[1], bool), self.valid_sharding)

    def host_blocks(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every stored block's KV on the host ([L, n, K, H] each), gathered from all processes."""
        if not self.entries:
            return {}
        k, v = _to_host(self.k), _to_host(self.v)
        return {key: (k[:, self.global_slot(e):self.global_slot(e) + e.length],
                      v[:, self.global_slot(e):self.global_slot(e) + e.length]) for key, e in self.entries.items()}

    def build(self, params, blocks, batch: int = 32, progress=None):
        """Encode every block (token tuples) not stored yet after the canonical context, then place
        all blocks and lay the arrays out again. Deterministic: every process of a multi-host run
        computes the same placement."""
        todo = {}
        for toks in blocks:
            toks = tuple(int(t) for t in toks)
            k = self.key(toks)
            if toks and k not in self.entries:
                todo[k] = toks
        if not todo:
            return
        host = self.host_blocks()
        ctx = jnp.asarray(np.asarray([self.context], np.int32))
        order = sorted(todo, key=lambda k: (len(todo[k]), k))
        for s in range(0, len(order), batch):
            chunk = order[s:s + batch]
            toks, valid = padded_batch([todo[k] for k in chunk], batch)
            kk, vv, emb = _encode_blocks(params, ctx, jnp.asarray(toks), jnp.asarray(valid), cfg=self.cfg)
            kk, vv, emb = (np.asarray(jax.device_get(a)) for a in (kk, vv, emb))
            for row, k in enumerate(chunk):
                n_k = len(todo[k])
                host[k] = (kk[:, row, :n_k].astype(self.dtype), vv[:, row, :n_k].astype(self.dtype))
                self.embeddings[k] = emb[row]
            if progress is not None:
                progress(len(chunk))
        lengths = {k: h[0].shape[1] for k, h in host.items()}
        keys = sorted(host)
        shards = placement_lib.place(self.placement, keys=keys, lengths=[lengths[k] for k in keys],
                                     embeddings=np.stack([self.embeddings[k] for k in keys]),
                                     num_shards=self.num_shards)
        self.lay_out({k: int(s) for k, s in zip(keys, shards)}, host, canon_start=len(self.context))

    def lay_out(self, shard_of: dict[str, int], host: dict, canon_start: int):
        """Pack the blocks (key -> (k, v) host arrays) into their shards and put the arrays on the mesh."""
        fill = np.zeros(self.num_shards, np.int64)
        entries = {}
        for key in sorted(shard_of):
            s, n = shard_of[key], host[key][0].shape[1]
            entries[key] = ItemEntry(key, s, int(fill[s]), n, canon_start)
            fill[s] += -(-n // PAD) * PAD
        shard_slots = max(SLOT_ALIGN, int(-(-fill.max() // SLOT_ALIGN) * SLOT_ALIGN))
        L, K, H = self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim
        hk = np.zeros((L, self.num_shards * shard_slots, K, H), self.dtype)
        hv = np.zeros_like(hk)
        hvalid = np.zeros(self.num_shards * shard_slots, bool)
        for key, e in entries.items():
            g = e.shard * shard_slots + e.offset
            hk[:, g:g + e.length], hv[:, g:g + e.length] = host[key]
            hvalid[g:g + e.length] = True
        self.put_arrays(hk, hv, hvalid, entries, shard_slots)

    def put_arrays(self, hk, hv, hvalid, entries, shard_slots: int):
        self.k = jax.make_array_from_callback(hk.shape, self.sharding, lambda idx: hk[idx])
        self.v = jax.make_array_from_callback(hv.shape, self.sharding, lambda idx: hv[idx])
        self.valid = jax.make_array_from_callback(hvalid.shape, self.valid_sharding, lambda idx: hvalid[idx])
        self.entries, self.shard_slots = dict(entries), shard_slots

    # --- serving ---------------------------------------------------------------------------

    def fetch(self, want: np.ndarray, delta: np.ndarray, dest: int):
        """KV of the tokens at global slots `want` ([T], -1 = none), re-rotated by `delta` ([T]
        position offsets), delivered to items-shard `dest`: arrays [L, T, K, H] on that shard's
        first device (None in a process that does not hold it). Rows with want = -1 are zero."""
        fn = _fetch_program(self.mesh, self.num_shards, self.shard_slots, self.cfg, self.impl)
        ok, ov = fn(self.k, self.v, jnp.asarray(want, jnp.int32), jnp.asarray(delta, jnp.int32),
                    jnp.asarray(dest, jnp.int32))
        dev = self.mesh.devices[dest, 0]
        for sk, sv in zip(ok.addressable_shards, ov.addressable_shards):
            if sk.device == dev:
                return sk.data[0], sv.data[0]
        return None, None

    def placement_of(self, name: str | None = None) -> dict[str, int]:
        """Block key -> shard under placement `name` (default: the store's own), computed from the
        stored blocks' embeddings and lengths (what-if comparisons of placements)."""
        if name is None or name == self.placement:
            return {k: e.shard for k, e in self.entries.items()}
        keys = sorted(self.entries)
        shards = placement_lib.place(name, keys=keys, lengths=[self.entries[k].length for k in keys],
                                     embeddings=np.stack([self.embeddings[k] for k in keys]),
                                     num_shards=self.num_shards)
        return dict(zip(keys, (int(s) for s in shards)))

    def locality(self, slots, dest: int) -> tuple[int, int]:
        """(local, remote) tokens of global slots `slots` for a request served by shard `dest`."""
        owner = np.asarray(slots) // self.shard_slots
        return int((owner == dest).sum()), int((owner != dest).sum())


@functools.lru_cache(maxsize=64)
def _fetch_program(mesh, n: int, shard_slots: int, cfg: ModelConfig, impl: str):
    inv = inv_freq(cfg)

    def local(k_l, v_l, want, delta, dest):
        j = jax.lax.axis_index("items")
        idx = want - j * shard_slots
        own = (want >= 0) & (idx >= 0) & (idx < shard_slots)
        idx = jnp.where(own, idx, 0)
        m = own[None, :, None, None]
        gk = jnp.where(m, kernels.gather_rerotate(k_l, idx, delta, inv, impl=impl), 0).astype(k_l.dtype)
        gv = jnp.where(m, v_l[:, idx], 0).astype(v_l.dtype)
        to = jax.nn.one_hot(dest, n, dtype=k_l.dtype)[:, None, None, None, None]  # row `dest` only
        return (jax.lax.psum_scatter(to * gk[None], "items", scatter_dimension=0, tiled=True),
                jax.lax.psum_scatter(to * gv[None], "items", scatter_dimension=0, tiled=True))

    store = partition_specs()["item_store"]
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(store, store, P(), P(), P()),
                                 out_specs=(P("items"), P("items")), check_vma=False))


def _to_host(a) -> np.ndarray:
    """A global array on the host, whole, in every process."""
    if a.is_fully_addressable:
        return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
