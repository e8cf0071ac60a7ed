"""Orbax snapshots of the whole cache state: item store, user store, glue, placement table,
block index, model fingerprint, tokenizer hash, format version.

Layout: an Orbax `CheckpointManager` directory, one step per snapshot, three items:
  items  {k, v [L, N * S, K, H] (as sharded on the mesh), valid [N * S], embeddings [n, D]}
  users  {k, v [L, u, K, H]: every cached user prefix, concatenated; glue_k, glue_v: the glue region}
  meta   JSON: format version, fingerprint, tokenizer hash, contexts, placement, mesh, shard size,
         block index (key, shard, offset, length, canon_start; same order as the embeddings), glue
         index, user index (LRU order), sha256 of every array.
Orbax writes a step into a temporary directory and renames it when complete, so a save killed at
any point leaves the previous snapshot the latest usable one. Restore checks identity (format,
model, tokenizer, canonical context) and every array's digest before touching the engine; a
refused or damaged snapshot leaves the engine as it was. Restoring onto another number of
items-shards re-places the blocks from the saved embeddings with the saved placement policy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.cache.item_store import ItemEntry, _to_host
from rcllm_jax.dist import placement as placement_lib

FORMAT_VERSION = 1


class SnapshotError(RuntimeError):
    """A snapshot that is missing, incomplete or damaged."""


class SnapshotMismatchError(SnapshotError):
    """A snapshot of another model, tokenizer, prompt context or format version."""


def _manager(directory, create: bool, items=("items", "users", "meta")):
    import orbax.checkpoint as ocp
    path = Path(directory).resolve()
    if not create and not path.is_dir():
        raise SnapshotError(f"no snapshot directory at {path}")
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create),
                                 item_names=items)


def _pool_target(engine, names, length: int) -> dict:
    """Restore targets for pool-shaped arrays [L, length, K, H], replicated like the pool."""
    cfg = engine.cfg
    return {n: jax.ShapeDtypeStruct((cfg.num_layers, max(1, length), cfg.num_kv_heads, cfg.head_dim),
                                    engine.pool.k.dtype, sharding=engine.replicated) for n in names}


def _verify(meta: dict, prefix: str, tree: dict, where: str) -> None:
    """Every restored array must match the sha256 saved with it."""
    for name, a in tree.items():
        want = meta["digests"].get(f"{prefix}.{name}")
        if want is None or _digest(a) != want:
            raise SnapshotError(f"{where} is damaged: {prefix}.{name} does not match its saved digest")


def _digest(a) -> str:
    h = _to_host(a) if isinstance(a, jax.Array) else np.asarray(a)
    return hashlib.sha256(np.ascontiguousarray(h).tobytes()).hexdigest()


def identity(engine) -> dict:
    return {"format_version": FORMAT_VERSION, "fingerprint": engine.fingerprint,
            "tokenizer": engine.builder.tok.content_hash(),
            "item_context": list(engine.blocks.context), "glue_context": list(engine.glue_store.context)}


def identity_problem(meta: dict, engine) -> str | None:
    """What differs between a snapshot's identity and the engine's, or None."""
    want = identity(engine)
    names = {"format_version": "format version", "fingerprint": "model (weights fingerprint)",
             "tokenizer": "tokenizer", "item_context": "canonical item context", "glue_context": "glue context"}
    for field, name in names.items():
        if meta.get(field) != want[field]:
            got, exp = meta.get(field), want[field]
            if isinstance(got, list) or isinstance(exp, list):
                got, exp = f"{len(got or [])} tokens", f"{len(exp)} tokens"
            return f"another {name} ({got}) than this engine's ({exp})"
    return None


def _check_identity(meta: dict, engine, where) -> None:
    problem = identity_problem(meta, engine)
    if problem:
        raise SnapshotMismatchError(f"snapshot {where} was built for {problem}; rebuild it with launch/build_cache.py")


def _read_meta(mngr, step: int, where: str) -> dict:
    import orbax.checkpoint as ocp
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged snapshot
        raise SnapshotError(f"snapshot {where} is damaged (metadata unreadable: {e})") from e


def latest_meta(directory) -> tuple[int, dict] | None:
    """(step, meta) of the newest complete snapshot in `directory`, or None."""
    path = Path(directory).resolve()
    if not path.is_dir():
        return None
    mngr = _manager(path, create=False)
    step = mngr.latest_step()
    if step is None:
        return None
    return step, _read_meta(mngr, step, f"{path} step {step}")


def _user_state(engine):
    """([[user id, prefix tokens]] in LRU order, {"k", "v"}: their KV concatenated [L, u, K, H])."""
    index, slots = [], []
    for uid, e in engine.users.users.items():  # LRU order, oldest first
        index.append([int(uid), [int(t) for t in e.tokens]])
        slots.append(engine.users.slots(uid))
    sl = np.concatenate(slots) if slots else np.zeros(1, np.int32)  # slot 0: scratch
    return index, {"k": engine.pool.k[:, sl], "v": engine.pool.v[:, sl]}


def _put_users(engine, index, users):
    """Empty the engine's user store and prefix cache, then put the saved prefixes back."""
    engine.reset_caches()
    off = 0
    for uid, toks in index:
        n = len(toks)
        engine.users.restore_user(int(uid), tuple(toks), users["k"][:, off:off + n], users["v"][:, off:off + n])
        off += n


def save(engine, directory, *, overwrite_other: bool = False) -> int:
    """Save the engine's cache state as a new step; returns the step. A directory holding another
    model's or tokenizer's snapshots is refused unless overwrite_other (nothing is replaced)."""
    import orbax.checkpoint as ocp
    prev = latest_meta(directory)
    problem = None if prev is None or overwrite_other else identity_problem(prev[1], engine)
    if problem:
        raise SnapshotMismatchError(f"refusing to save into {Path(directory).resolve()}: its snapshot (step "
                                    f"{prev[0]}) is of {problem}; nothing was overwritten (use another directory)")
    store = engine.blocks
    keys = sorted(store.entries)
    emb = np.stack([store.embeddings[k] for k in keys]).astype(np.float32) if keys else np.zeros((1, 1), np.float32)
    user_index, users = _user_state(engine)
    glue_end = engine.glue_store.next_slot
    items = {"k": store.k, "v": store.v, "valid": store.valid,
             "embeddings": jax.device_put(emb, engine.replicated)}
    users |= {"glue_k": engine.pool.k[:, :glue_end], "glue_v": engine.pool.v[:, :glue_end]}
    meta = dict(identity(engine), placement=store.placement, mesh_items=store.num_shards,
                embedding_dim=int(emb.shape[1]),
                shard_slots=store.shard_slots, dtype=str(store.dtype),
                blocks=[[k, e.shard, e.offset, e.length, e.canon_start] for k, e in ((k, store.entries[k]) for k in keys)],
                glue=[[e.key, e.slot, e.length, e.canon_start] for e in engine.glue_store.entries.values()],
                glue_end=int(glue_end),
                users=user_index,
                digests={f"items.{n}": _digest(a) for n, a in items.items()} |
                        {f"users.{n}": _digest(a) for n, a in users.items()})
    mngr = _manager(directory, create=True)
    step = (mngr.latest_step() or 0) + 1
    mngr.save(step, args=ocp.args.Composite(items=ocp.args.StandardSave(items), users=ocp.args.StandardSave(users),
                                            meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    return step


def restore(engine, directory, step: int | None = None) -> dict:
    """Load a snapshot into `engine` (same or another items mesh). Returns its metadata."""
    import orbax.checkpoint as ocp
    path = Path(directory).resolve()
    mngr = _manager(path, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise SnapshotError(f"no complete snapshot in {path}" + ("" if step is None else f" at step {step}"))
    where = f"{path} step {step}"
    meta = _read_meta(mngr, step, where)
    _check_identity(meta, engine, where)
    store = engine.blocks
    n_old, s_old = int(meta["mesh_items"]), int(meta["shard_slots"])
    cfg = engine.cfg
    kv_shape = (cfg.num_layers, n_old * s_old, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(meta["dtype"])
    same_mesh = n_old == store.num_shards
    if same_mesh or kv_shape[1] % store.num_shards == 0:  # (another mesh: the old layout split over it)
        ksh, vsh = store.sharding, store.valid_sharding
    else:
        ksh = vsh = engine.replicated
    n_blocks = max(1, len(meta["blocks"]))
    u_len = max(1, sum(len(t) for _, t in meta["users"]))
    rep = engine.replicated
    items_t = {"k": jax.ShapeDtypeStruct(kv_shape, dt, sharding=ksh), "v": jax.ShapeDtypeStruct(kv_shape, dt, sharding=ksh),
               "valid": jax.ShapeDtypeStruct((kv_shape[1],), bool, sharding=vsh),
               "embeddings": jax.ShapeDtypeStruct((n_blocks, int(meta["embedding_dim"])), np.float32, sharding=rep)}
    users_t = _pool_target(engine, ("k", "v"), u_len) | _pool_target(engine, ("glue_k", "glue_v"), meta["glue_end"])
    try:
        got = mngr.restore(step, args=ocp.args.Composite(items=ocp.args.StandardRestore(items_t),
                                                         users=ocp.args.StandardRestore(users_t)))
        items, users = dict(got["items"]), dict(got["users"])
    except Exception as e:  # noqa: BLE001
        raise SnapshotError(f"snapshot {where} is damaged or incomplete ({type(e).__name__}: {e})") from e
    _verify(meta, "items", items, f"snapshot {where}")
    _verify(meta, "users", users, f"snapshot {where}")
    # glue is derived data: a snapshot built for another candidate limit keeps its items and users,
    # and the engine encodes its own glue (`build_store`) instead of taking the saved one
    saved_glue = {k for k, *_ in meta["glue"]}
    glue_fits = bool(saved_glue) and meta["glue_end"] <= engine.glue_store.end_slot and \
        saved_glue == {engine.glue_store.key(t) for t in engine.glue_blocks if t}

    # --- everything checked: from here on the engine changes --------------------------------
    entries = {k: ItemEntry(k, int(s), int(o), int(n), int(c)) for k, s, o, n, c in meta["blocks"]}
    keys = [b[0] for b in meta["blocks"]]
    emb = np.asarray(items["embeddings"])
    store.embeddings = {k: emb[i] for i, k in enumerate(keys)}
    if same_mesh:
        store.k, store.v, store.valid = items["k"], items["v"], items["valid"]
        store.entries, store.shard_slots = entries, s_old
    else:
        hk, hv = _to_host(items["k"]), _to_host(items["v"])
        del items
        host = {k: (hk[:, e.shard * s_old + e.offset:][:, :e.length], hv[:, e.shard * s_old + e.offset:][:, :e.length])
                for k, e in entries.items()}
        lengths = [entries[k].length for k in keys]
        shards = placement_lib.place(meta["placement"], keys=keys, lengths=lengths,
                                     embeddings=emb if keys else np.zeros((0, 1)), num_shards=store.num_shards)
        store.placement = meta["placement"]
        canon = entries[keys[0]].canon_start if keys else len(store.context)
        store.lay_out({k: int(s) for k, s in zip(keys, shards)}, host, canon_start=canon)
    if glue_fits:
        if meta["glue_end"] > 1:
            engine.pool.write(1, users["glue_k"][:, 1:], users["glue_v"][:, 1:])
        from rcllm_jax.cache.stores import BlockEntry
        engine.glue_store.entries = {k: BlockEntry(k, int(s), int(n), int(c)) for k, s, n, c in meta["glue"]}
        engine.glue_store.next_slot = int(meta["glue_end"])
    _put_users(engine, meta["users"], users)
    jax.block_until_ready((engine.pool.k, engine.pool.v, store.k, store.v))
    return meta



# --- the user store alone (what a serving process saves on shutdown) ---------------------------

def save_users(engine, directory, histories: dict | None = None) -> int:
    """Save every cached user prefix (KV, tokens, LRU order) and the server's per-user item
    histories as a new step of `directory` (refused if it holds another model's state)."""
    import orbax.checkpoint as ocp
    prev = latest_meta(directory)
    problem = None if prev is None else identity_problem(prev[1], engine)
    if problem:
        raise SnapshotMismatchError(f"refusing to save users into {Path(directory).resolve()}: it holds state of "
                                    f"{problem}; nothing was overwritten")
    user_index, users = _user_state(engine)
    meta = dict(identity(engine), users=user_index,
                histories={str(u): [int(i) for i in h] for u, h in (histories or {}).items()},
                digests={f"users.{n}": _digest(a) for n, a in users.items()})
    mngr = _manager(directory, create=True, items=("users", "meta"))
    step = (mngr.latest_step() or 0) + 1
    mngr.save(step, args=ocp.args.Composite(users=ocp.args.StandardSave(users), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    return step


def restore_users(engine, directory) -> dict[int, list[int]]:
    """Put the latest saved user store back into `engine` (checked like `restore`); returns the
    saved histories (user id -> item ids). A missing directory is an empty state, not an error."""
    import orbax.checkpoint as ocp
    path = Path(directory).resolve()
    if not path.is_dir():
        return {}
    mngr = _manager(path, create=False, items=("users", "meta"))
    step = mngr.latest_step()
    if step is None:
        return {}
    where = f"user snapshot {path} step {step}"
    meta = _read_meta(mngr, step, where)
    _check_identity(meta, engine, where)
    target = _pool_target(engine, ("k", "v"), sum(len(t) for _, t in meta["users"]))
    try:
        users = dict(mngr.restore(step, args=ocp.args.Composite(users=ocp.args.StandardRestore(target)))["users"])
    except Exception as e:  # noqa: BLE001
        raise SnapshotError(f"user snapshot {where} is damaged or incomplete ({type(e).__name__}: {e})") from e
    _verify(meta, "users", users, where)
    _put_users(engine, meta["users"], users)
    return {int(u): list(h) for u, h in meta["histories"].items()}
