"""Warm-up: every program a block-mode request can need, compiled before a server takes traffic.

`serving_shapes` enumerates the shapes an engine's prompts can take (the bucket rules are
`rcllm_jax.buckets`); `warm_up` runs a probe padded to each of them on every items-shard, plus the
remote fetches and the user store's chunked prefix computation. Then no request of an accepted
shape compiles (`tests/test_serve.py`). Both read the engine through its public interface only.
"""

from __future__ import annotations

import dataclasses
import weakref

import jax
import numpy as np

from rcllm_jax.buckets import buckets_between, coarse_bucket, coarse_buckets
from rcllm_jax.engine.plan import served_from_cache, stitch_plan
from rcllm_jax.engine.selective_recompute import Policy

WARM_UP_USER = "__warmup__"  # the user whose prefix the probes use (`Engine.reset_caches` drops it)


@dataclasses.dataclass(frozen=True)
class ShapeBounds:
    """What bounds an engine's request shapes: the served items (shortest block first), the history
    whose prompt prefix is shortest (none or one item), and the shortest and longest instruction +
    history prefix in tokens."""

    items: list[int]
    shortest_history: list[int]
    prefix_lo: int
    prefix_hi: int


def shape_bounds(engine) -> ShapeBounds:
    """The engine's `ShapeBounds`. Any catalog item may stand in a history (a user's stored
    sequence), not only the served ones; the longest prefix is the history_len items with the
    longest lines, plus a token a line (slack). A prompt per catalog item: computed once per
    engine (the blocks and the builder are fixed)."""
    if engine not in _BOUNDS:
        _BOUNDS[engine] = _bounds(engine.builder, engine.item_blocks)
    return _BOUNDS[engine]


_BOUNDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bounds(b, blocks: dict) -> ShapeBounds:
    ids = sorted(blocks, key=lambda i: (len(blocks[i]), i))

    def prefix(history):
        return sum(len(x.tokens) for x in b.build(history, ids[:1], check_length=False).blocks[:2])
    lines = sorted(b.items, key=lambda i: (prefix([i]), i))
    shortest = [] if prefix([]) <= prefix(lines[:1]) else lines[:1]
    longest = lines[-b.history_len:] if b.history_len else []
    return ShapeBounds(ids, shortest, prefix(shortest), prefix(longest) + len(longest))


def serving_shapes(engine, mode="rcllm", max_candidates: int | None = None) -> dict:
    """Every shape a block-mode request of the engine's prompts can take: {(output rows, recompute
    rows): {(prefix rows, suffix rows), ...}} for histories of up to the builder's history_len
    items and 1..max_candidates candidates among the served items, prompts that fit the model.
    Bounds come from the catalog's shortest and longest blocks, so the set is a (small) superset of
    what traffic reaches; every dimension is a power of two but the recompute rows
    (`buckets.bucket`, four per octave)."""
    policy = engine.policy(mode)
    b, bounds = engine.builder, shape_bounds(engine)
    ids, p_lo, p_hi = bounds.items, bounds.prefix_lo, bounds.prefix_hi
    k_max = min(max_candidates or len(ids), len(ids))
    limit = min(engine.cfg.max_position, b.max_prompt_tokens or engine.cfg.max_position)

    def lowest(bk, lo):  # the shortest length >= lo in bucket bk
        return max(lo, bk // 2 + 1) if bk > 16 else lo

    out = {}
    for k in range(1, k_max + 1):
        ends = []
        for cands in (ids[:k], ids[-k:]):  # the shortest and the longest item blocks
            p = b.build([], cands, check_length=False)
            plan = stitch_plan(p, [0 if j >= 2 and served_from_cache(x, policy.cached_glue) else None
                                   for j, x in enumerate(p.blocks)], sink=policy.sink)
            t = slice(plan.n_prefix, len(p))
            forced, cached = plan.forced[t], plan.cached[t]
            want = int(forced.sum()) + int(np.ceil(policy.ratio * int((cached & ~forced).sum())))
            ends.append((len(p) - plan.n_prefix, want))
        (s_lo, w_lo), (s_hi, w_hi) = ends
        ob = coarse_bucket(k, 16)
        for tb in coarse_buckets(s_lo, s_hi):
            for pb in coarse_buckets(p_lo, p_hi):
                if lowest(pb, p_lo) + lowest(tb, s_lo) > limit:
                    continue
                for ns in buckets_between(max(1, min(w_lo, w_hi)), max(w_lo, w_hi)):
                    out.setdefault((ob, min(ns, tb)), set()).add((pb, tb))
    return out


def warm_up(engine, mode="rcllm", max_candidates: int | None = None, max_batch: int = 0) -> int:
    """Compile every program a block-mode request can need (`serving_shapes`), on every
    items-shard: the blended prefill of each shape (one request at a time, and with max_batch > 0
    each serving-step batch bucket up to max_batch), the cached rows' fetch of each suffix length
    from and to every shard, the user store's chunked prefix computation. Runs a probe per
    output-row class padded to each shape; nothing stored changes but the warm-up user's prefix.
    Returns the number of shapes run."""
    policy = engine.policy(mode)
    shapes = serving_shapes(engine, policy, max_candidates)
    bounds = shape_bounds(engine)
    probes = {}
    for ob in {ob for ob, _ in shapes}:  # the smallest prompt with ob output rows: below every shape of its class
        k = next(k for k in range(1, len(bounds.items) + 1) if coarse_bucket(k, 16) == ob)
        probes[ob] = engine.builder.build(bounds.shortest_history, bounds.items[:k], check_length=False)
    engine.users.warm(engine.params, engine.cfg, max(pb for v in shapes.values() for pb, _ in v))
    done = 0
    # the Pallas paths read cached rows in place; a request with rows on another shard fetches
    # them: on a mesh both programs are compiled
    for in_place in (True, False) if engine.impl != "xla" and engine.num_shards > 1 else (True,):
        engine.read_in_place = in_place
        try:
            done += _warm_shapes(engine, shapes, probes, policy, max_batch)
        finally:
            engine.read_in_place = True
    for tb in {tb for sizes in shapes.values() for _, tb in sizes}:  # every suffix length's fetch
        engine.store.fetch(np.full(tb, -1), np.zeros(tb, np.int32), 0, engine.impl)  # (warm_fetch: every shard pair)
    engine.warm_fetch()
    return done


def _warm_shapes(engine, shapes: dict, probes: dict, policy: Policy, max_batch: int) -> int:
    """`warm_up`'s blended prefills: each (output, recompute) class's probe padded to each of its
    (prefix, suffix) shapes, one request at a time on every shard and, with max_batch > 0, in each
    serving-step batch bucket. Returns the number of shapes run."""
    done = 0
    for (ob, ns), sizes in sorted(shapes.items()):
        probe = probes[ob]
        engine.update_user(WARM_UP_USER, probe)
        for shard in range(engine.num_shards):
            inputs, _, _ = engine.prefill_inputs(probe, policy, WARM_UP_USER, shard)
            if inputs is None:
                continue
            params = engine.weights(shard, query=True)
            inputs = dataclasses.replace(inputs, n_select=ns)  # exactly the shape's (a compile, not a ranking)
            for pb, tb in sorted(sizes):
                jax.block_until_ready(inputs.padded(pb, tb, ns).run(params)[0])
                done += 1
        b = 1
        while max_batch and b <= coarse_bucket(max_batch, 1):
            for pb, tb in sorted(sizes):
                engine.rank_step([(probe, WARM_UP_USER, s) for s in range(engine.num_shards) for _ in range(b)],
                                 policy, pad_to=(pb, tb, ns))
                done += 1
            b *= 2
    return done
