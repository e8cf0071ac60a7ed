"""One serving step: the block-mode requests of every items-shard in one SPMD program.

The scheduler gives each items-shard a batch (`serve/scheduler.py`). `Engine.rank_step` lays each
request out as `Engine.rank` does (on its given shard, else the affinity choice), then:

  - pads the step's requests to common shapes (`plan.pad_arrays`: the largest prefix and suffix
    bucket among them; padding is never attended and never selected; each request keeps its own
    recompute-set size, `blended_prefill`'s n_keep);
  - stacks them [N x B, ...] along `items`, B = the largest shard batch rounded up to a power of
    two; a shard with fewer requests gets filler rows (`filler`: one valid token that attends
    only itself, its outputs dropped);
  - fetches each shard's cached rows for its whole batch at once (`BlockStore.fetch`: remote
    rows device to device in compact buffers), delivered as [L, B, T, K, H] on that shard; or,
    where every request reads its cached rows in place (`Engine._store_spans`: the Pallas paths),
    passes the block store itself and each request's spans in its shard's part;
  - runs `step_program`: a `shard_map` over the mesh in which each shard runs its B requests
    through the blended prefill at once (`jax.vmap`), all shards in the same program. On a mesh
    with model > 1 it is manual along `items` only: the weights, pool and cached rows keep their
    split along `model` and XLA partitions each shard's batch over its row.

One executable serves every shard (one request at a time compiles once per device it runs on);
shapes are bucketed, so compiles are bounded by (batch buckets x shape buckets).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from rcllm_jax.engine.selective_recompute import blended_prefill
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.parallel.mesh import partition_specs, shardings


def filler(prefix: int, suffix: int) -> tuple:
    """The layout arrays (`Layout.arrays`) of a request that fills an empty batch row: one valid,
    forced token at position 0 that attends only itself (no prefix, nothing cached); its outputs
    are dropped."""
    one = np.arange(suffix) == 0
    return (np.zeros(prefix, np.int32), np.zeros(prefix, bool), np.zeros(suffix, np.int32),
            np.arange(suffix, dtype=np.int32), np.zeros(suffix, bool), one, one)


@functools.lru_cache(maxsize=64)
def step_program(mesh, cfg: ModelConfig, n_select: int, check_layer: int | None, deviation_on: str, impl: str,
                 slots: bool, in_place: bool = False):
    """The jitted step: (params, pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos,
    cached, forced, valid, outs, keep, cached_k, cached_v) with every array after the pool
    [N x B, ...] sharded along `items` (cached_k/v [L, N x B, T, K, H] along their second axis) ->
    (outputs, recompute rows, their mask), each [N x B, ...] along `items`. outs: per request the
    answer's logit ids (label prompts) or the score-slot rows (slot prompts: outputs are their
    final-normed hidden states [C, D]); keep: per request its own recompute-set size
    (`blended_prefill`'s n_keep; n_select is the step's largest).
    in_place: instead of cached_k, cached_v the block store's k, v [L, N x S, K, H] (sharded as
    stored along `items`) and each request's spans in its shard's part (`plan.store_spans`: table,
    start, len, pos, delta, each [N x B, M]): each shard reads its requests' cached rows where they
    lie (`blended_prefill`'s store)."""

    def local(params, pool_k, pool_v, ps, pvd, tok, pos, cached, forced, valid, outs, keep, *rest):
        # rest: ck, cv [L, B, T, K, H] (the shard's batch of cached rows as one fetch delivered them),
        # or the shard's store k, v [L, S, K, H] and the batch's spans [B, M] each
        def one(ps, pvd, tok, pos, cached, forced, valid, outs, keep, *kv):
            ck, cv, store = (None, None, (*rest[:2], *kv)) if in_place else (*kv, None)
            logits, r, sel, _ = blended_prefill(params, pool_k, pool_v, ps, pvd, tok, pos, cached, forced, valid,
                                                None if slots else outs, ck, cv, outs if slots else None, keep,
                                                store, cfg=cfg, n_select=n_select, check_layer=check_layer,
                                                deviation_on=deviation_on, impl=impl)
            return logits, r, sel
        per = rest[2:] if in_place else rest
        axes = (0,) * 9 + ((0,) * 5 if in_place else (1, 1))
        return jax.vmap(one, in_axes=axes)(ps, pvd, tok, pos, cached, forced, valid, outs, keep, *per)

    spec = partition_specs()
    rep, rows, kv = spec["replicated"], spec["per_shard"], spec["step_rows"]
    extra = (kv, kv) + (rows,) * 5 if in_place else (kv, kv)
    # manual over `items` only: along `model` the weights, pool and rows keep their split and XLA
    # partitions each shard's batch over its row (the specs above name `items` alone)
    manual = frozenset({"items"}) if mesh.shape["model"] > 1 else frozenset()  # frozenset(): every axis
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep) + (rows,) * 9 + extra,
                                 out_specs=(rows, rows, rows), axis_names=manual, check_vma=False))


def stack_rows(mesh, host: np.ndarray):
    """[N x B, ...] host array -> a global array sharded along `items`."""
    return jax.device_put(host, shardings(mesh)["per_shard"])


def stack_device_rows(mesh, per_shard: list):
    """Per items-shard arrays [L, B, T, K, H] already on that shard's row (its one device on
    model:1; else KV heads split over the row) -> one global [L, N x B, T, K, H] array sharded
    along `items` on its second axis (and along `model` on the KV heads); nothing moves."""
    shape = per_shard[0].shape
    sharding = shardings(mesh)["step_rows" if mesh.shape["model"] == 1 else "step_rows_split"]
    pieces = [s.data for a in per_shard for s in a.addressable_shards]
    return jax.make_array_from_single_device_arrays((shape[0], len(per_shard) * shape[1]) + shape[2:], sharding,
                                                    pieces)
