"""Orbax snapshots of the cache state: the block store (item and glue blocks, placement, index,
item embeddings), the user store, model fingerprint, tokenizer hash, contexts, format version.

Layout: an Orbax `CheckpointManager` directory, one step per snapshot, three items:
  blocks {k, v [L, N * S, K, H] (as sharded on the mesh), embeddings [n, D] of the item blocks}
  users  {k, v [L, u, K, H]: every cached user prefix, concatenated}
  meta   JSON: identity (format version, fingerprint, tokenizer hash, each block kind's context),
         placement, replication budget, mesh, shard size, block index (key, kind, shard (-1 = replicated), offset,
         length), the keys of the embeddings in order, user index (LRU order), sha256 of every array.
A user-store snapshot (what a server saves on shutdown, `save_users`) is a step with only meta,
and its KV in a raw file `user_kv.bin` [u, 2, L, K, H] in the step, written a page at a time.
Orbax writes a step into a temporary directory and renames it when complete, so a save killed at
any point leaves the previous snapshot the latest usable one. Restore checks identity and every
array's digest before touching a store; a refused or damaged snapshot leaves the stores as they
were. A snapshot restored onto another number of items-shards, or into a store of another
placement, replication budget or KV dtype, is laid out again from the saved embeddings under the
store's own placement (rankings unchanged: the blocks' KV are the same, or cast to the store's
dtype).

The functions take the stores and an identity dict (`identity`), never an engine: `Engine.save`,
`Engine.restore`, `Engine.save_users` and `Engine.restore_users` are the callers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import jax
import numpy as np

from rcllm_jax.cache.block_store import BlockEntry, host_slabs, to_host
from rcllm_jax.cache.quant import dequantize

FORMAT_VERSION = 2


class SnapshotError(RuntimeError):
    """A snapshot that is missing, incomplete or damaged."""


class SnapshotMismatchError(SnapshotError):
    """A snapshot of another model, tokenizer, prompt context or format version."""


def _manager(directory, create: bool, items=("blocks", "users", "meta")):
    import orbax.checkpoint as ocp
    path = Path(directory).resolve()
    if not create and not path.is_dir():
        raise SnapshotError(f"no snapshot directory at {path}")
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create),
                                 item_names=items)


def _kv_target(users, sharding, length: int) -> dict:
    """Restore targets for pool-shaped arrays [L, length, K, H], replicated like the pool."""
    shape = (users.pool.k.shape[0], max(1, length)) + users.pool.k.shape[2:]
    return {n: jax.ShapeDtypeStruct(shape, users.pool.k.dtype, sharding=sharding) for n in ("k", "v")}


def _verify(meta: dict, prefix: str, tree: dict, where: str) -> None:
    """Every restored array must match the sha256 saved with it."""
    for name, a in tree.items():
        want = meta["digests"].get(f"{prefix}.{name}")
        if want is None or _digest(a) != want:
            raise SnapshotError(f"{where} is damaged: {prefix}.{name} does not match its saved digest")


def _digest(a) -> str:
    """sha256 of an array's bytes in row-major order; a jax.Array of this process is read a slab at
    a time (`host_slabs`: a store is never copied to the host whole, and no copy stays on it)."""
    if isinstance(a, jax.Array) and a.is_fully_addressable:
        h = hashlib.sha256()
        for slab in host_slabs(a):
            h.update(slab.reshape(-1).view(np.uint8).data)
        return h.hexdigest()
    h = np.ascontiguousarray(to_host(a) if isinstance(a, jax.Array) else np.asarray(a))
    return hashlib.sha256(h.reshape(-1).view(np.uint8).data).hexdigest()  # read in place, no byte copy


def identity(fingerprint: str, tokenizer_hash: str, contexts: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "tokenizer": tokenizer_hash,
            "contexts": {kind: [int(t) for t in c] for kind, c in sorted(contexts.items())}}


def identity_problem(meta: dict, want: dict) -> str | None:
    """What differs between a snapshot's identity and `want`, or None."""
    names = {"format_version": "format version", "fingerprint": "model (weights fingerprint)",
             "tokenizer": "tokenizer", "contexts": "canonical block contexts"}
    for field, name in names.items():
        if meta.get(field) != want[field]:
            got, exp = meta.get(field), want[field]
            if isinstance(exp, dict):
                got = {k: f"{len(v)} tokens" for k, v in (got or {}).items()}
                exp = {k: f"{len(v)} tokens" for k, v in exp.items()}
            return f"another {name} ({got}) than this engine's ({exp})"
    return None


def _check_identity(meta: dict, want: dict, where) -> None:
    problem = identity_problem(meta, want)
    if problem:
        raise SnapshotMismatchError(f"{where} was built for {problem}; rebuild it with launch/build_cache.py")


def _read_meta(mngr, step: int, where: str) -> dict:
    import orbax.checkpoint as ocp
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged snapshot
        raise SnapshotError(f"{where} is damaged (metadata unreadable: {e})") from e


def steps(directory) -> list[int]:
    """The complete steps saved in `directory` (none when it does not exist)."""
    path = Path(directory).resolve()
    return sorted(_manager(path, create=False).all_steps()) if path.is_dir() else []


def latest_meta(directory) -> tuple[int, dict] | None:
    """(step, meta) of the newest complete snapshot in `directory` whose metadata reads, or None
    (a damaged newer step does not hide an older one, nor stop a new save beside it)."""
    path = Path(directory).resolve()
    if not path.is_dir():
        return None
    mngr = _manager(path, create=False)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, _read_meta(mngr, step, f"snapshot {path} step {step}")
        except SnapshotError:
            continue
    return None


def _refuse_other(directory, want: dict, what: str) -> None:
    prev = latest_meta(directory)
    problem = None if prev is None else identity_problem(prev[1], want)
    if problem:
        raise SnapshotMismatchError(f"refusing to save {what} into {Path(directory).resolve()}: its snapshot (step "
                                    f"{prev[0]}) is of {problem}; nothing was overwritten (use another directory)")


def save(directory, ident: dict, store, users, replicated) -> int:
    """Save a block store and a user store as a new step; returns the step. A directory holding
    another model's or tokenizer's snapshots is refused (nothing is replaced)."""
    import orbax.checkpoint as ocp
    _refuse_other(directory, ident, "caches")
    embedded = sorted(store.embeddings)
    emb = (np.stack([store.embeddings[k] for k in embedded]).astype(np.float32) if embedded
           else np.zeros((1, 1), np.float32))
    user_index, uk, uv = users.export()
    blocks = {"k": store.k, "v": store.v, "embeddings": jax.device_put(emb, replicated)}
    if store.quantized:
        blocks |= {"k_scale": store.k_scale, "v_scale": store.v_scale}
    user_arrays = {"k": uk, "v": uv}
    meta = dict(ident, placement=store.placement, replicate=store.replicate, mesh_items=store.num_shards,
                embedding_dim=int(emb.shape[1]),
                shard_slots=store.shard_slots, dtype=str(store.dtype), embedded=embedded,
                blocks=[[e.key, e.kind, e.shard, e.offset, e.length] for _, e in sorted(store.entries.items())],
                users=user_index,
                digests={f"blocks.{n}": _digest(a) for n, a in blocks.items()} |
                        {f"users.{n}": _digest(a) for n, a in user_arrays.items()})
    mngr = _manager(directory, create=True)
    step = (mngr.latest_step() or 0) + 1
    mngr.save(step, args=ocp.args.Composite(blocks=ocp.args.StandardSave(blocks),
                                            users=ocp.args.StandardSave(user_arrays), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    return step


def _newest_intact(mngr, path: Path, load, step: int | None, what: str):
    """load(step) at `step`, or (step None) at the newest step that loads intact: a damaged newer
    step is skipped with one log line (a step of another model is never skipped: that is refused).
    Returns (step, what load returned)."""
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps or (step is not None and step not in mngr.all_steps()):
        raise SnapshotError(f"no complete {what} in {path}" + ("" if step is None else f" at step {step}"))
    damage = []
    for s in steps:
        try:
            out = load(s)
        except SnapshotMismatchError:
            raise
        except SnapshotError as e:
            damage.append(str(e))
            continue
        if damage:
            logging.warning("%s; restored the newest intact step %d instead", "; ".join(damage), s)
        return s, out
    raise SnapshotError("; ".join(damage) + ": no intact step left")


def restore(directory, ident: dict, store, users, replicated, step: int | None = None) -> dict:
    """Load a snapshot into a block store and a user store (same or another items mesh): the given
    step, or the newest intact one. Returns its metadata. Nothing changes unless a step loads and
    checks out."""
    path = Path(directory).resolve()
    mngr = _manager(path, create=False)
    _, (meta, blocks, user_arrays) = _newest_intact(
        mngr, path, lambda s: _load_checked(mngr, path, s, ident, store, users, replicated), step, "snapshot")
    need = users.pages_needed(meta["users"])
    if need > users.budget:  # checked before anything changes: a restore is all or nothing
        raise SnapshotError(f"snapshot {path}: its user prefixes need {need} pages; this user store holds "
                            f"{users.budget} (raise the user-store budget)")
    # --- everything checked: from here on the stores change ---------------------------------
    _install_blocks(meta, blocks, store)
    users.load(meta["users"], _array_rows(user_arrays["k"], user_arrays["v"]))
    jax.block_until_ready((users.pool.k, users.pool.v, store.k, store.v))
    return meta


def restore_blocks(directory, ident: dict, store, replicated, step: int | None = None) -> dict:
    """`restore` of the block store alone (a serving process taking a newer step: its user store,
    more recent than any snapshot's, stays). Returns the step's metadata and its number ("step")."""
    path = Path(directory).resolve()
    mngr = _manager(path, create=False)
    at, (meta, blocks, _) = _newest_intact(
        mngr, path, lambda s: _load_checked(mngr, path, s, ident, store, None, replicated), step, "snapshot")
    _install_blocks(meta, blocks, store)
    jax.block_until_ready((store.k, store.v))
    return dict(meta, step=at)


def _install_blocks(meta: dict, blocks: dict, store) -> None:
    """Put a checked step's blocks into `store`: as saved when laid out alike, else laid out again
    under the store's own placement, mesh and KV dtype."""
    n_old, s_old = int(meta["mesh_items"]), int(meta["shard_slots"])
    same_layout = (n_old == store.num_shards and meta["placement"] == store.placement
                   and float(meta.get("replicate", 0.0)) == store.replicate  # snapshots before replication: 0
                   and jax.numpy.dtype(meta["dtype"]) == store.dtype)
    entries = {k: BlockEntry(k, kind, int(s), int(o), int(n)) for k, kind, s, o, n in meta["blocks"]}
    emb = np.asarray(blocks["embeddings"])
    embeddings = {k: emb[i] for i, k in enumerate(meta["embedded"])}
    if same_layout:
        store.embeddings = embeddings
        store.put_arrays(blocks["k"], blocks["v"], entries, s_old,
                         scales=(blocks.get("k_scale"), blocks.get("v_scale")))
    else:  # another mesh, placement, replication or KV dtype: lay the blocks out again (cast to the store's)
        hk, hv = to_host(blocks["k"]), to_host(blocks["v"])
        if "k_scale" in blocks:  # an int8 snapshot: read back into f32 first
            hk, hv = dequantize(hk, to_host(blocks["k_scale"])), dequantize(hv, to_host(blocks["v_scale"]))
        blocks.clear()
        host = {}
        for k, e in entries.items():
            g = max(e.shard, 0) * s_old + e.offset
            host[k] = (hk[:, g:g + e.length], hv[:, g:g + e.length])
        store.load_blocks(host, {k: e.kind for k, e in entries.items()}, embeddings)


def _load_checked(mngr, path: Path, step: int, ident: dict, store, users, replicated):
    """(meta, block arrays, user arrays) of one step, identity and digests checked (users None:
    the block arrays only)."""
    import orbax.checkpoint as ocp
    where = f"snapshot {path} step {step}"
    meta = _read_meta(mngr, step, where)
    _check_identity(meta, ident, where)
    n_old, s_old = int(meta["mesh_items"]), int(meta["shard_slots"])
    cfg = store.cfg
    kv_shape = (cfg.num_layers, n_old * s_old, cfg.num_kv_heads, cfg.head_dim)
    ksh = store.sharding if kv_shape[1] % store.num_shards == 0 else replicated
    dt = jax.numpy.dtype(meta["dtype"])
    blocks_t = {"k": jax.ShapeDtypeStruct(kv_shape, dt, sharding=ksh),
                "v": jax.ShapeDtypeStruct(kv_shape, dt, sharding=ksh),
                "embeddings": jax.ShapeDtypeStruct((max(1, len(meta["embedded"])), int(meta["embedding_dim"])),
                                                   np.float32, sharding=replicated)}
    if dt == np.int8:
        ssh = store.scale_sharding if kv_shape[1] % store.num_shards == 0 else replicated
        blocks_t |= {n: jax.ShapeDtypeStruct(kv_shape[:3], np.float32, sharding=ssh) for n in ("k_scale", "v_scale")}
    args = {"blocks": ocp.args.StandardRestore(blocks_t)}
    if users is not None:  # None: the blocks alone
        args["users"] = ocp.args.StandardRestore(_kv_target(users, replicated, sum(len(t) for _, t in meta["users"])))
    try:
        got = mngr.restore(step, args=ocp.args.Composite(**args))
        blocks, user_arrays = dict(got["blocks"]), dict(got["users"]) if users is not None else None
    except Exception as e:  # noqa: BLE001
        raise SnapshotError(f"{where} is damaged or incomplete ({type(e).__name__}: {e})") from e
    _verify(meta, "blocks", blocks, where)
    if users is not None:
        _verify(meta, "users", user_arrays, where)
    return meta, blocks, user_arrays


# --- the user store alone (what a serving process saves on shutdown) ---------------------------

def _array_rows(k, v):
    """rows(off, n) over saved user KV [L, u, K, H] (`UserStore.load`)."""
    return lambda off, n: (k[:, off:off + n], v[:, off:off + n])


USER_KV_FILE = "user_kv.bin"  # in a user snapshot step: the saved prefixes' KV, raw, row-major [u, 2, L, K, H]
_HASH_CHUNK = 1 << 26  # bytes read per digest update


def save_users(directory, ident: dict, users) -> int:
    """Save every cached user prefix (KV, tokens, LRU order, the history version each was computed
    from) as a new step of `directory` (refused if it holds another model's state). The histories
    themselves live in the state database (`rcllm_jax.serve.state`): this is a cache of their KV.

    Streamed: the KV is written a page at a time to a file beside the step (its sha256 computed on
    the way), never held on the host whole; the step's metadata (Orbax) records the file's shape,
    dtype and digest, then the file moves into the step. A save killed at any point leaves no step,
    or a step whose KV file is missing or short: a restore skips it for the newest intact one."""
    import orbax.checkpoint as ocp
    path = Path(directory).resolve()
    _refuse_other(path, ident, "users")
    path.mkdir(parents=True, exist_ok=True)
    index, pages = users.export_pages()
    pool = users.pool.k
    shape = [sum(len(toks) for _, toks in index), 2, pool.shape[0], *pool.shape[2:]]
    partial = path / f".{USER_KV_FILE}.{os.getpid()}.{threading.get_ident()}.partial"
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as f:
            for pk, pv in pages:  # [L, rows, K, H] each -> rows [rows, 2, L, K, H]
                chunk = np.ascontiguousarray(np.stack([pk, pv]).transpose(2, 0, 1, 3, 4))
                digest.update(chunk.data)
                f.write(chunk.data)
            f.flush()
            os.fsync(f.fileno())
        meta = dict(ident, users=index, user_kv={"file": USER_KV_FILE, "shape": shape, "dtype": str(pool.dtype),
                                                 "sha256": digest.hexdigest()})
        mngr = _manager(path, create=True, items=("users", "meta"))
        step = (mngr.latest_step() or 0) + 1
        mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
        step_dir = path / str(step)
        if not step_dir.is_dir():
            raise SnapshotError(f"saved user snapshot step {step} is not at {step_dir}")
        os.replace(partial, step_dir / USER_KV_FILE)
    finally:
        partial.unlink(missing_ok=True)
    return step


def _user_kv_rows(step_dir: Path, spec: dict, where: str):
    """rows(off, n) over a step's streamed user KV file (read through a memory map, a prefix at a
    time), after its size and sha256 are checked (a SnapshotError when they do not match)."""
    f = step_dir / spec["file"]
    dt = jax.numpy.dtype(spec["dtype"])
    shape = tuple(int(x) for x in spec["shape"])
    want = int(np.prod(shape)) * dt.itemsize
    if not f.is_file() or f.stat().st_size != want:
        raise SnapshotError(f"{where} is damaged or incomplete: {f.name} missing or not {want} bytes")
    digest = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != spec["sha256"]:
        raise SnapshotError(f"{where} is damaged: {f.name} does not match its saved digest")
    if not shape[0]:
        return lambda off, n: (None, None)
    kv = np.memmap(f, dtype=dt, mode="r", shape=shape)
    return lambda off, n: tuple(np.ascontiguousarray(kv[off:off + n, j].transpose(1, 0, 2, 3)) for j in (0, 1))


def restore_users(directory, ident: dict, users, replicated, keep=None) -> dict:
    """Put the latest saved user store back into `users` (checked like `restore`; all or nothing).
    keep(user, version): whether a saved prefix still stands for the user's history (a prefix
    computed from another version is dropped, never served). Returns the histories a snapshot
    of the format before the state database carried (user id string -> item ids; {} otherwise).
    A missing directory is an empty state, not an error. Reads the streamed format (`save_users`)
    a prefix at a time, and the earlier one (the KV an Orbax item, loaded whole)."""
    import orbax.checkpoint as ocp
    path = Path(directory).resolve()
    if not path.is_dir():
        return {}
    mngr = _manager(path, create=False, items=("users", "meta"))
    if mngr.latest_step() is None:
        return {}

    def load(step):
        where = f"user snapshot {path} step {step}"
        meta = _read_meta(mngr, step, where)
        _check_identity(meta, ident, where)
        if "user_kv" in meta:
            return meta, _user_kv_rows(path / str(step), meta["user_kv"], where)
        target = _kv_target(users, replicated, sum(len(t) for _, t in meta["users"]))
        try:
            arrays = dict(mngr.restore(step, args=ocp.args.Composite(users=ocp.args.StandardRestore(target)))["users"])
        except Exception as e:  # noqa: BLE001
            raise SnapshotError(f"{where} is damaged or incomplete ({type(e).__name__}: {e})") from e
        _verify(meta, "users", arrays, where)
        return meta, _array_rows(arrays["k"], arrays["v"])

    _, (meta, rows) = _newest_intact(mngr, path, load, None, "user snapshot")
    try:
        users.load(meta["users"], rows, keep=keep)
    except MemoryError as e:
        raise SnapshotError(f"user snapshot {path}: {e}") from None
    return {str(u): [int(i) for i in h] for u, h in meta.get("histories", {}).items()}
