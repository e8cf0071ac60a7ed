"""The block store: the KV of every reusable prompt block (item blocks and label / question glue),
each encoded once after its kind's canonical context, in two arrays sharded along the mesh's
`items` axis.

Layout: k, v [L, N * S, K, H] (N items-shards of S slots each); shard s holds slots
[s * S, (s + 1) * S). Where a block lives is a property of its kind:
  replicated (glue)  one copy in every shard, at the same offsets [0, R) (R: the replicated
                     region, a multiple of PAD), so a request reads it locally whatever its shard;
  sharded (items)    one copy, in the shard the placement chose (`rcllm_jax.parallel.placement`),
                     at an offset >= R; except the hot items that replication chose, which are
                     held like glue, in [0, R) of every shard.
Blocks occupy `length` consecutive slots starting at a PAD-aligned offset.

Content-addressed: key = hash(model fingerprint, the kind's canonical context, block tokens), so a
block of another model, context or text never matches. A block's first token was encoded at
position len(context of its kind).

A request served by shard `dest` reads its cached rows with `fetch`. In one process (default,
`fetch_exact`): `dest` gathers its own rows in one pass over the request's rows; every other
shard holding some gathers them as stored (bf16 moves as bf16) into a compact buffer (row count a
power of two, at least 16: few programs whatever the placement sends), the buffer is copied
device to device to `dest` and scattered into place; so the bytes moved are the request's
remote bytes (+ the bucket padding). Across processes: one jitted `shard_map` in which every shard gathers its
rows into a T-row buffer and a reduce-scatter over `items` delivers them to `dest` (~N/2 x the
bytes needed). Either way `dest` reads the rows into the model's dtype and re-rotates the keys
from their canonical to their real positions in f32.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.gather_rerotate import rotate_cs
from rcllm_jax import kernels
from rcllm_jax.buckets import bucket, coarse_bucket
from rcllm_jax.cache.keys import block_key
from rcllm_jax.cache.quant import dequantize, quantize
from rcllm_jax.parallel import placement as placement_lib
from rcllm_jax.parallel.mesh import by_device, partition_specs, row_mesh, shard_view, shardings
from rcllm_jax.model.config import ModelConfig, kv_bytes_per_token
from rcllm_jax.model.decoder import forward
from rcllm_jax.model.rope import inv_freq

PAD = 8  # block length granularity inside a shard; blocks start at multiples of it, so attention
#         that reads the store in place (`plan.store_spans`) reads pages of PAD rows
SLOT_ALIGN = 64  # shard sizes are multiples of this (restores onto other mesh sizes divide evenly)
REPLICATED = placement_lib.REPLICATED  # BlockEntry.shard of a block held by every shard
KV_DTYPES = ("float32", "bfloat16", "int8")  # how cached KV may be held (read back in the model's dtype;
# int8: with a scale per token and KV head, `rcllm_jax.cache.quant`)
KINDS = ("item", "glue")
REPLICATED_KINDS = ("glue",)


@dataclasses.dataclass(frozen=True)
class BlockEntry:
    key: str
    kind: str  # "item" | "glue"
    shard: int  # the shard holding it, or REPLICATED
    offset: int  # first slot inside the shard
    length: int


ROW_TOKENS = 512  # tokens per packed row of a build pass (longer blocks get a longer row)
PASS_ROWS = 1  # rows per items-shard in a build pass


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[tuple[int, int]]]:
    """Pack blocks (their token counts, each <= row_tokens) into rows of at most `row_tokens`
    tokens: next fit over the blocks in decreasing length (a row wastes less than one block).
    Returns, per row, (block index, offset in the row)."""
    rows, fill = [], row_tokens
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if fill + lengths[i] > row_tokens:
            rows.append([])
            fill = 0
        rows[-1].append((i, fill))
        fill += lengths[i]
    return rows


def packed_pass(blocks, rows: list[list[tuple[int, int]]], num_rows: int, row_tokens: int, start: int):
    """Inputs of one build pass: rows [num_rows, row_tokens] of tokens, positions (`start` + the
    offset inside the block), segments (1, 2, ... per block of a row) and the valid mask."""
    toks = np.zeros((num_rows, row_tokens), np.int32)
    pos = np.zeros((num_rows, row_tokens), np.int32)
    seg = np.zeros((num_rows, row_tokens), np.int32)
    valid = np.zeros((num_rows, row_tokens), bool)
    for r, row in enumerate(rows):
        for s, (i, off) in enumerate(row):
            n = len(blocks[i])
            toks[r, off:off + n] = blocks[i]
            pos[r, off:off + n] = start + np.arange(n)
            seg[r, off:off + n] = s + 1
            valid[r, off:off + n] = True
    return toks, pos, seg, valid


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_context(params, ctx_tokens, *, cfg: ModelConfig):
    """KV of the canonical context ([1, c] tokens), visible to every block (SEG_SHARED)."""
    return forward(params, ctx_tokens, jnp.arange(ctx_tokens.shape[1], dtype=jnp.int32)[None], cfg=cfg)[1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_packed(params, ctx, tokens, positions, segments, valid, *, cfg: ModelConfig):
    """KV ([L, R, T, K, H]) and final hidden states ([R, T, D]) of rows of packed blocks: each
    block (a positive segment id) attends the context `ctx` (a [1, c] KVCache) and itself
    causally, never the other blocks of its row: the same KV as encoding it alone after the
    context."""
    r = tokens.shape[0]
    ctx_r = jax.tree.map(lambda a: jnp.broadcast_to(a, (a.shape[0], r) + a.shape[2:]) if a.ndim == 5
                         else jnp.broadcast_to(a, (r,) + a.shape[1:]), ctx)
    hidden, kv = forward(params, tokens, positions, cfg=cfg, segments=segments, valid=valid, cache=ctx_r,
                         return_hidden="all")
    return kv.k, kv.v, hidden


class BlockStore:
    def __init__(self, mesh, cfg: ModelConfig, fingerprint: str, contexts: dict[str, tuple[int, ...]], *,
                 placement: str = "similarity", replicate: float = 0.0, dtype=None):
        """contexts: block kind -> the canonical context its blocks are encoded after; replicate:
        hot-item replication budget (`rcllm_jax.parallel.placement`)."""
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
        self.quantized = self.dtype == jnp.int8
        self.host_dtype = np.dtype(np.float32) if self.quantized else self.dtype  # of blocks on the host
        self.bytes_per_token = kv_bytes_per_token(cfg, self.dtype)
        self.sharding, self.scale_sharding = (shardings(mesh)[n] for n in ("block_store", "block_scales"))
        self.entries: dict[str, BlockEntry] = {}
        self.embeddings: dict[str, np.ndarray] = {}  # item key -> mean final hidden state (placement)
        self._coaccess = None  # co-access log (block keys of each request), or a function computing it
        self.exact_fetch = True  # single process: move only the rows a request needs (`fetch_exact`)
        self.fetched_lengths: set[int] = set()  # row counts T fetched exactly so far (`warm_fetch`)
        self.shard_slots = SLOT_ALIGN
        shape = (cfg.num_layers, self.num_shards * self.shard_slots, cfg.num_kv_heads, cfg.head_dim)
        self.k = jax.device_put(jnp.zeros(shape, self.dtype), self.sharding)
        self.v = jax.device_put(jnp.zeros(shape, self.dtype), self.sharding)
        self.k_scale = self.v_scale = None  # int8: [L, N * S, K] f32, sharded like k and v
        if self.quantized:
            self.k_scale = jax.device_put(jnp.zeros(shape[:3], jnp.float32), self.scale_sharding)
            self.v_scale = jax.device_put(jnp.zeros(shape[:3], jnp.float32), self.scale_sharding)

    def empty_like(self) -> "BlockStore":
        """An empty store with this one's settings (mesh, model, contexts, placement, replication,
        KV dtype, fetch mode, co-access log): where a newer snapshot step is staged."""
        out = BlockStore(self.mesh, self.cfg, self.fingerprint, self.contexts, placement=self.placement,
                         replicate=self.replicate, dtype=self.dtype)
        out.exact_fetch, out._coaccess = self.exact_fetch, self._coaccess
        return out

    @property
    def coaccess(self) -> list[tuple[str, ...]] | None:
        """The co-access log (block keys of each logged request) of the coaccess placement and of
        replication; given as a function, it is computed the first time a placement needs it."""
        if callable(self._coaccess):
            self._coaccess = self._coaccess()
        return self._coaccess

    @coaccess.setter
    def coaccess(self, log):
        self._coaccess = log

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

    @property
    def arrays(self) -> tuple:
        """The stored arrays: (k, v), and for int8 (k, v, k_scale, v_scale)."""
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())

    def host_blocks(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every stored block's KV on the host ([L, n, K, H] each, in `host_dtype`: int8 read back
        into f32; replicated: shard 0's copy)."""
        if not self.entries:
            return {}
        k, v = to_host(self.k), to_host(self.v)
        if self.quantized:
            k, v = dequantize(k, to_host(self.k_scale)), dequantize(v, to_host(self.v_scale))
        out = {}
        for key, e in self.entries.items():
            g = self.slot(e, 0)
            out[key] = (k[:, g:g + e.length], v[:, g:g + e.length])
        return out

    def build(self, params, blocks: dict[str, list], row_tokens: int = ROW_TOKENS, rows: int = PASS_ROWS,
              progress=None):
        """Encode every block (kind -> token tuples) not stored yet after its kind's context, then
        place the sharded blocks and lay the arrays out again. Blocks are packed into rows of
        `row_tokens` tokens (a block longer than a row widens the rows to its bucket); each block's
        tokens see the context and themselves only. A pass is one SPMD program over the mesh:
        `rows` rows per items-shard, the rows split along `items` (every device encodes its own
        rows; one compiled shape per kind); the next pass is dispatched before the last one is
        read back. progress(n) is called with the blocks of each pass. Returns one record per pass
        (kind, blocks, tokens, slots, seconds from the previous pass's end; the first pass of a
        kind includes its compile) and the lay-out's seconds. Deterministic: every process of a
        multi-host run computes the same placement."""
        todo = {k: kt for k, kt in self._wanted(blocks).items() if k not in self.entries}
        if not todo:
            return {"passes": [], "layout_s": 0.0}
        host, kinds = self.host_blocks(), {k: e.kind for k, e in self.entries.items()}
        passes = self._encode(params, todo, host, kinds, row_tokens, rows, progress)
        t0 = time.perf_counter()
        self._lay_out_host(host, kinds)
        return {"passes": passes, "layout_s": time.perf_counter() - t0}

    def update(self, params, blocks: dict[str, list], row_tokens: int = ROW_TOKENS, rows: int = PASS_ROWS,
               progress=None) -> dict:
        """Make the store hold exactly `blocks` (kind -> token tuples), changing only what changed:
        stored blocks not among them are dropped, new ones (new or edited item texts: a block's key
        is its content) are encoded as `build` encodes, and only those are placed
        (`placement.extend`: every kept block stays on its shard, or replicated). Returns `build`'s
        report and the counts kept / added / dropped / moved (0)."""
        wanted = self._wanted(blocks)
        todo = {k: kt for k, kt in wanted.items() if k not in self.entries}
        dropped = [k for k in self.entries if k not in wanted]
        counts = {"kept": len(wanted) - len(todo), "added": len(todo), "dropped": len(dropped), "moved": 0}
        if not todo and not dropped:
            return {"passes": [], "layout_s": 0.0, **counts}
        host, kinds = self.host_blocks(), {k: e.kind for k, e in self.entries.items()}
        shard_of = {k: e.shard for k, e in self.entries.items() if k in wanted}
        for k in dropped:
            host.pop(k)
            kinds.pop(k)
            self.embeddings.pop(k, None)
        passes = self._encode(params, todo, host, kinds, row_tokens, rows, progress)
        t0 = time.perf_counter()
        shard_of |= {k: REPLICATED for k in todo if kinds[k] in REPLICATED_KINDS}
        new = [k for k in sorted(todo) if kinds[k] not in REPLICATED_KINDS]
        if new:
            placed = sorted(k for k, s in shard_of.items() if kinds[k] not in REPLICATED_KINDS)
            shards = placement_lib.extend(
                self.placement, keys=new, lengths=[host[k][0].shape[1] for k in new],
                embeddings=np.stack([self.embeddings[k] for k in new]),
                placed_shards=[shard_of[k] for k in placed], placed_lengths=[host[k][0].shape[1] for k in placed],
                placed_embeddings=np.stack([self.embeddings[k] for k in placed]) if placed else np.zeros((0, 1)),
                num_shards=self.num_shards)
            shard_of |= {k: int(s) for k, s in zip(new, shards)}
        self.lay_out(shard_of, host, kinds)
        return {"passes": passes, "layout_s": time.perf_counter() - t0, **counts}

    def _wanted(self, blocks: dict[str, list]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """key -> (kind, tokens) of every non-empty block in `blocks` (kind -> token tuples)."""
        out = {}
        for kind, token_lists in blocks.items():
            for toks in token_lists:
                toks = tuple(int(t) for t in toks)
                if toks:
                    out[self.key(kind, toks)] = (kind, toks)
        return out

    def _encode(self, params, todo: dict, host: dict, kinds: dict, row_tokens: int, rows: int, progress) -> list:
        """Encode the blocks `todo` (key -> (kind, tokens)) into `host` (key -> host k, v), `kinds`
        and the item embeddings, in packed passes over the mesh; returns the passes' records."""
        passes = []
        rows_sharding = shardings(self.mesh)["per_shard"]
        per_pass = int(rows) * self.num_shards
        for kind in KINDS:
            keys = sorted(k for k in todo if todo[k][0] == kind)
            if not keys:
                continue
            toks = [todo[k][1] for k in keys]
            width = max(int(row_tokens), bucket(max(map(len, toks)), 128))
            packed = pack_rows([len(t) for t in toks], width)
            c = len(self.contexts[kind])
            ctx = encode_context(params, jnp.asarray(np.asarray([self.contexts[kind]], np.int32)), cfg=self.cfg)

            def collect(pending):
                chunk, outs = pending
                kk, vv, hid = (to_host(a) for a in outs)
                for r, row in enumerate(chunk):
                    for i, off in row:
                        k, n = keys[i], len(toks[i])
                        host[k] = (kk[:, r, off:off + n].astype(self.host_dtype),
                                   vv[:, r, off:off + n].astype(self.host_dtype))
                        kinds[k] = kind
                        if kind not in REPLICATED_KINDS:
                            self.embeddings[k] = hid[r, off:off + n].astype(np.float32).mean(axis=0)
                nonlocal mark
                now = time.perf_counter()
                passes.append({"kind": kind, "blocks": sum(len(row) for row in chunk), "slots": per_pass * width,
                               "tokens": sum(len(toks[i]) for row in chunk for i, _ in row),
                               "seconds": now - mark})
                mark = now
                if progress is not None:
                    progress(passes[-1]["blocks"])

            mark, pending = time.perf_counter(), None
            for s in range(0, len(packed), per_pass):
                chunk = packed[s:s + per_pass]
                args = [jax.make_array_from_callback(a.shape, rows_sharding, lambda idx, a=a: a[idx])
                        for a in packed_pass(toks, chunk, per_pass, width, c)]
                outs = encode_packed(params, ctx, *args, cfg=self.cfg)  # dispatched; runs while the last is read
                if pending is not None:
                    collect(pending)
                pending = (chunk, outs)
            collect(pending)
        return passes

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
        """Pack the blocks (key -> (k, v) host arrays; the dict is consumed) into their shards and
        put the arrays on the mesh, one shard at a time (about one copy of the store in memory)."""
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
        shape = (L, self.num_shards * shard_slots, K, H)
        held = {s: [e for e in entries.values() if e.shard in (s, REPLICATED)] for s in range(self.num_shards)}
        by_row: dict[int, list] = {}  # items-shard -> its addressable devices and their KV-head slices
        for dev, idx in self.sharding.addressable_devices_indices_map(shape).items():
            by_row.setdefault((idx[1].start or 0) // shard_slots, []).append((dev, idx[2]))
        pieces = {}  # per addressable device: its part of its shard's (k, v[, k_scale, v_scale])
        for s, devs in sorted(by_row.items()):
            bk = np.zeros((L, shard_slots, K, H), self.host_dtype)
            bv = np.zeros_like(bk)
            for e in held[s]:
                bk[:, e.offset:e.offset + e.length], bv[:, e.offset:e.offset + e.length] = host[e.key]
            for e in held[s]:
                if e.shard == s:
                    host.pop(e.key)  # consumed as copied: the host holds about one copy of the store
            arrays = (bk, bv)
            if self.quantized:
                (qk, sk), (qv, sv) = quantize(bk), quantize(bv)
                arrays = (qk, qv, sk, sv)
            for dev, heads in devs:  # the row's devices each hold their KV heads (all of them on model:1)
                pieces[dev] = jax.device_put(tuple(a[:, :, heads] for a in arrays), dev)
            del bk, bv, arrays
        shapes = (shape, shape) + ((shape[:3], shape[:3]) if self.quantized else ())
        shardings = (self.sharding, self.sharding) + ((self.scale_sharding,) * 2 if self.quantized else ())
        out = [jax.make_array_from_single_device_arrays(shp, sh, [p[i] for p in pieces.values()])
               for i, (shp, sh) in enumerate(zip(shapes, shardings))]
        self.put_arrays(out[0], out[1], entries, shard_slots, scales=tuple(out[2:]) or None)

    def put_arrays(self, k, v, entries, shard_slots: int, scales=None):
        """Install KV arrays laid out with the store's sharding and dtype (int8: with their `scales`
        (k_scale, v_scale)) and the entries that address them."""
        self.k, self.v = k, v
        self.k_scale, self.v_scale = scales if self.quantized else (None, None)
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
        fn = _fetch_program(self.mesh, self.num_shards, self.shard_slots, self.cfg, impl, self.quantized)
        ok, ov = fn(jnp.asarray(slots, jnp.int32), jnp.asarray(delta, jnp.int32), jnp.asarray(dest, jnp.int32),
                    *self.arrays)
        k, v = shard_view(ok, self.mesh, dest), shard_view(ov, self.mesh, dest)
        return (None, None) if k is None else (k[0], v[0])

    def local_arrays(self, shard: int):
        """(k, v) [L, shard_slots, K, H] of items-shard `shard`: its rows as stored, as its row holds
        them (`shard_view`: its one device on model:1; else KV heads over the row's devices) (what
        attention over the store in place reads; None in a process without it)."""
        return shard_view(self.k, self.mesh, shard), shard_view(self.v, self.mesh, shard)

    def fetch_exact(self, slots: np.ndarray, delta: np.ndarray, dest: int, impl: str):
        """`fetch` moving only the rows the request needs: every shard holding some gathers them
        into a compact buffer (its row count rounded up to a shape bucket) on its own device, the
        buffer is copied to `dest`'s device (device to device, nothing else moves) and scattered
        into place there. Returns (k, v, bytes moved between devices)."""
        slots = np.asarray(slots, np.int64)
        t, ss = len(slots), self.shard_slots
        self.fetched_lengths.add(t)
        owner = np.where(slots >= 0, slots // ss, -1)
        local = tuple(by_device(a) for a in self.arrays)
        # the destination's own rows: one gather over all t rows (zero where not its own), so the
        # programs depend on t only, not on how many rows happen to be local
        own = owner == dest
        own_idx = np.where(own, slots - dest * ss, 0).astype(np.int32)
        remote = []
        for j in np.unique(owner[(owner >= 0) & ~own]).tolist():
            pos = np.flatnonzero(owner == j)
            b = coarse_bucket(len(pos))
            idx, tgt = np.zeros(b, np.int32), np.full(b, t, np.int32)  # padding rows land past the end: dropped
            idx[:len(pos)], tgt[:len(pos)] = slots[pos] - j * ss, pos
            remote.append((j, idx, tgt))
        columns, moved = [], 0
        for m in range(self.mesh.shape["model"]):  # column m of every row holds the same KV heads
            dev = self.mesh.devices[dest, m]
            out = _gather_own(tuple(a[dev] for a in local), jax.device_put(own_idx, dev), jax.device_put(own, dev))
            for j, idx, tgt in remote:
                src = self.mesh.devices[j, m]
                rows = jax.device_put(_gather_rows(tuple(a[src] for a in local), jax.device_put(idx, src)), dev)
                moved += sum(a.nbytes for a in rows)
                out = _scatter_rows(out, rows, jax.device_put(tgt, dev))
            columns.append(out)
        if len(columns) == 1:
            out, at = columns[0], self.mesh.devices[dest, 0]
        else:  # the columns' heads as one array over the destination row (nothing moves)
            row = row_mesh(self.mesh, dest)
            out = tuple(jax.make_array_from_single_device_arrays(
                a.shape[:2] + (a.shape[2] * len(columns),) + a.shape[3:],
                NamedSharding(row, P(None, None, "model", *(None,) * (a.ndim - 3))), [c[i] for c in columns])
                for i, a in enumerate(columns[0]))
            at = NamedSharding(row, P())
        delta = jax.device_put(np.asarray(delta, np.int32), at)
        table = _rope_table(delta, cfg=self.cfg) if impl == "xla" else None  # a kernel rotates by the deltas
        k, v = _arrive(out, delta, table, cfg=self.cfg, impl=impl)
        return k, v, moved

    def warm_fetch(self, impl: str) -> int:
        """Compile the exact fetch's programs for every row count T fetched so far, on every
        shard: its own-row gather and arrival, and each power-of-two remote buffer up to T from
        every other shard (which ones a request needs depends on where its items live, so a
        warm-up with a few prompts misses most). Returns how many (T, buffer, source,
        destination) combinations were run."""
        if not self.exact_fetch or jax.process_count() > 1:
            return 0
        local = tuple(by_device(a) for a in self.arrays)
        devs = [self.mesh.devices[j, m] for m in range(self.mesh.shape["model"]) for j in range(self.num_shards)]
        column = {d: m for m in range(self.mesh.shape["model"]) for d in self.mesh.devices[:, m]}
        done = 0
        for t in sorted(self.fetched_lengths):
            for dest in range(self.num_shards):  # nothing remote: the own-row gather and the arrival
                jax.block_until_ready(self.fetch_exact(np.full(t, -1), np.zeros(t, np.int32), dest, impl)[:2])
            no_row = {d: (jax.device_put(np.zeros(t, np.int32), d), jax.device_put(np.zeros(t, bool), d)) for d in devs}
            b = 16
            while b <= coarse_bucket(t):
                for src in devs:
                    rows = _gather_rows(tuple(a[src] for a in local), jax.device_put(np.zeros(b, np.int32), src))
                    for dest in devs:
                        if dest == src or column[dest] != column[src]:
                            continue
                        # the buffer fetch scatters into: its own-row gather (a device's own KV heads), no row own
                        out = _gather_own(tuple(a[dest] for a in local), *no_row[dest])
                        tgt = jax.device_put(np.full(b, t, np.int32), dest)  # every row dropped
                        jax.block_until_ready(_scatter_rows(out, jax.device_put(rows, dest), tgt))
                        done += 1
                b *= 2
        return done


@jax.jit
def _gather_rows(arrays, idx):
    return tuple(a[:, idx] for a in arrays)


@jax.jit
def _gather_own(arrays, idx, own):
    return tuple(jnp.where(own.reshape((1, -1) + (1,) * (a.ndim - 2)), a[:, idx], jnp.zeros((), a.dtype))
                 for a in arrays)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_rows(out, rows, tgt):
    return tuple(o.at[:, tgt].set(r, mode="drop") for o, r in zip(out, rows))


def _read_rows(rows, cfg: ModelConfig):
    """Fetched rows (k, v as stored, + their scales for int8) -> k, v in the model's dtype."""
    if len(rows) == 4:
        return dequantize(rows[0], rows[2], cfg.dtype), dequantize(rows[1], rows[3], cfg.dtype)
    return rows[0].astype(cfg.dtype), rows[1].astype(cfg.dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _rope_table(delta, *, cfg: ModelConfig):
    """cos, sin [1 or L, T, H/2] of each fetched row's re-rotation (per layer where layers differ
    in RoPE base), in a program of their own: fused into the
    rotation XLA recomputes them for every layer and head (the XLA fetch's rotation 20 -> 8 ms at
    1024 rows x 30 layers on this CPU)."""
    inv = jnp.asarray(inv_freq(cfg), jnp.float32).reshape(-1, cfg.head_dim // 2)
    ang = delta.astype(jnp.float32)[None, :, None] * inv[:, None, :]
    return jnp.cos(ang), jnp.sin(ang)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _arrive(rows, delta, table, *, cfg: ModelConfig, impl: str):
    """The fetched rows into the model's dtype, keys re-rotated to their real positions (f32; the
    XLA path by `_rope_table`'s cos / sin, a kernel by the deltas)."""
    k, v = _read_rows(rows, cfg)
    if impl == "xla":
        cos, sin = (a[:, :, None] for a in table)
        return rotate_cs(k.astype(jnp.float32), cos, sin).astype(k.dtype), v
    return kernels.gather_rerotate(k, jnp.arange(k.shape[1], dtype=jnp.int32), delta, inv_freq(cfg), impl=impl), v


@functools.lru_cache(maxsize=64)
def _fetch_program(mesh, n: int, shard_slots: int, cfg: ModelConfig, impl: str, quantized: bool = False):
    inv = inv_freq(cfg)

    def local(want, delta, dest, *arrays):
        j = jax.lax.axis_index("items")
        idx = want - j * shard_slots
        own = (want >= 0) & (idx >= 0) & (idx < shard_slots)
        idx = jnp.where(own, idx, 0)
        got = []
        for a in arrays:  # the stored rows as they are (bf16 / int8 move as such), then to row `dest` only
            m = own.reshape((1, -1) + (1,) * (a.ndim - 2))
            g = jnp.where(m, a[:, idx], 0).astype(a.dtype)
            to = jax.nn.one_hot(dest, n, dtype=a.dtype).reshape((n,) + (1,) * a.ndim)
            got.append(jax.lax.psum_scatter(to * g[None], "items", scatter_dimension=0, tiled=True)[0])
        # on arrival: into the model's dtype, keys re-rotated to their real positions (in f32)
        rk, rv = _read_rows(tuple(got), cfg)
        rows = jnp.arange(want.shape[0], dtype=jnp.int32)
        return kernels.gather_rerotate(rk, rows, delta, inv, impl=impl)[None], rv[None]

    spec = partition_specs()
    store, rep, rows = spec["block_store"], spec["replicated"], spec["fetched"]
    specs = (store, store) + ((spec["block_scales"],) * 2 if quantized else ())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep) + specs,
                                 out_specs=(rows, rows), check_vma=False))


SLAB_BYTES = 1 << 26  # host bytes `host_slabs` assembles at a time


@functools.partial(jax.jit, static_argnums=2)
def _leading_rows(x, start, n):
    return jax.lax.dynamic_slice_in_dim(x, start, n, 0)


def host_slabs(a, slab_bytes: int | None = None, out: np.ndarray | None = None):
    """A fully addressable array's values on the host, one slab of its leading axis at a time
    (about `slab_bytes`, default SLAB_BYTES; concatenated along axis 0 they are the array), each
    assembled from the device shards that hold it (one copy of replicated ones); with `out` (a
    host array of a's shape and dtype) written into it, the slabs its views. Nothing stays
    behind: `np.asarray` of a jax.Array keeps its host copy cached on the array for as long as the
    array lives (a store saved or checked that way held twice its size until dropped)."""
    if not a.ndim:
        yield np.asarray(jax.device_get(a.addressable_shards[0].data.copy()))
        return
    shards = {}
    for sh in a.addressable_shards:  # distinct pieces: replicas hold the same index
        shards.setdefault(tuple(sl.indices(n)[:2] for sl, n in zip(sh.index, a.shape)), sh.data)
    per_row = max(1, a.nbytes // max(1, a.shape[0]))
    step = max(1, (SLAB_BYTES if slab_bytes is None else slab_bytes) // per_row)
    for g0 in range(0, a.shape[0], step):
        g1 = min(a.shape[0], g0 + step)
        buf = np.empty((g1 - g0,) + a.shape[1:], a.dtype) if out is None else out[g0:g1]
        for ((l0, l1), *rest), data in shards.items():
            lo, hi = max(g0, l0), min(g1, l1)
            if lo >= hi:
                continue
            n = min(step, l1 - l0)
            start = min(lo - l0, l1 - l0 - n)  # a fixed slab length per piece: one program each
            rows = np.asarray(jax.device_get(_leading_rows(data, start, n)))
            buf[(slice(lo - g0, hi - g0),) + tuple(slice(b, e) for b, e in rest)] = \
                rows[lo - l0 - start:hi - l0 - start]
        yield buf


def to_host(a) -> np.ndarray:
    """A global array on the host, whole, in every process (in one process assembled slab by slab
    from the shards, `host_slabs`: no second host copy stays cached on `a`)."""
    if a.is_fully_addressable:
        if not a.ndim:
            return next(host_slabs(a))
        out = np.empty(a.shape, a.dtype)
        for _ in host_slabs(a, out=out):  # each slab assembled in place
            pass
        return out
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
