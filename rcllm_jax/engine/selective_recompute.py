"""Selective recomputation: which tokens of a stitched prompt are recomputed (`Policy`, the
selection size) and the blended prefill that recomputes them, one jitted program for every mode.

A request is laid out (`engine/plan.py::Layout`) as an exact prefix (KV gathered from the pool,
never recomputed: the instruction + history block, or a prefix-cache hit) followed by a suffix of
T tokens. Each suffix token is either cached (a block's KV from the block store, already gathered
and re-rotated from its canonical to its real position by `BlockStore.fetch`) or fresh (glue
computed per request, the question). A set R of suffix tokens is recomputed in every layer, their
fresh K/V written over the cached ones before attention:

  R = forced tokens (fresh blocks, the last token, and per policy the first k tokens of each
      cached block)
      + with a deviation check layer c: the cached tokens whose K (or V) deviates most from a
        fresh computation at layer c (CacheBlend); layers < c then run over the whole suffix.

Queries in R attend with the exact causal mask by global position (`attention_mask`, with the
model's sliding window), so with R = the whole suffix the result is a full prefill. They read
each key set where it lies (`engine/key_sets.py`: the prefix in the pool, the suffix buffer or the
block store's spans, the fresh rows), merged by log-sum-exp, without a stitched copy. `all_fresh`
runs the suffix as a plain prefill (full and prefix modes: nothing to gather or select).

`blended_prefill` composes the steps: the selection (`_top_rows`, or `_deviation_rows` with a
check layer), the recompute layers over the request's key sets (`_recompute_layers`), the answer's
readout (`_readout`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from rcllm_jax.buckets import bucket
from rcllm_jax.cache.block_store import PAD as STORE_PAGE
from rcllm_jax.cache.pool import PAGE
from rcllm_jax.engine.key_sets import RequestKeys, attend, prefix_page_table, suffix_page_table
from rcllm_jax.engine.plan import pad_arrays, span_entries
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import (SEG_SHARED, KVCache, Params, attn_mlp, decoder_layer, embed, forward,
                                     layer_mask, layer_masks, lm_head, out_mlp, qkv, rms_norm)
from rcllm_jax.model.rope import inv_freq, layer_inv


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which suffix tokens a block mode recomputes, beyond the fresh blocks and the last token."""

    sink: int = 0  # first tokens of every cached block (EPIC LegoLink-k)
    ratio: float = 0.0  # fraction of cached block tokens chosen by deviation (CacheBlend)
    check_layer: int | None = None  # layer at which deviation is measured (layers below run in full)
    deviation_on: str = "k"  # "k" (LMCache) or "v" (original CacheBlend)
    cached_glue: bool = False  # serve label/question glue from the block store too: only the
    #                            prompt's last token is then always recomputed

    def __post_init__(self):
        if self.ratio and self.check_layer is None:
            raise ValueError("a deviation ratio needs a check layer")
        if self.check_layer is not None and not self.ratio:
            raise ValueError("a check layer needs a deviation ratio > 0 (it is used for nothing else)")
        if self.deviation_on not in ("k", "v"):
            raise ValueError("deviation_on must be 'k' or 'v'")


BLOCK_MODES = {
    "stitch": Policy(),
    "sink": Policy(sink=2),
    "deviation": Policy(ratio=0.15, check_layer=1),
    # Chosen by measurement on the shipped head (score-slot head over the collaborative scorer, 20
    # retrieved candidates in the retriever's order; BENCHMARKS.md "The served model"): the cheapest
    # policy with top-1 agreement >= 0.95 vs full prefill. With item blocks encoded after the glue
    # that really precedes an item ("Candidates:\n-", `Engine(canonical="candidate")`, the default),
    # stitching with the glue computed per request gave top-1 1.000, KL 5e-5 (history 20, test
    # position 1, 221 requests); serving the glue ("-" before each item, the question) from the block
    # store as well gives top-1 0.9955, KL 1e-4, NDCG@10 within the retrieved 0.388 vs full 0.390
    # (2026-12-05), computing 21 tokens per request instead of 57 (one score slot per candidate + the
    # last token). Re-measure with `launch/make_benchmarks.py --only=served` when the model, head or
    # prompt changes.
    "rcllm": Policy(cached_glue=True),
}


def block_policy(mode, *user_ids, policies=None) -> Policy:
    """The policy of block-mode requests (a mode name or a `Policy`) by these users, from
    `policies` (an engine's: `rcllm` may be calibrated; default `BLOCK_MODES`); a ValueError
    naming the problem when it is not a block mode or a user id is missing."""
    policy = mode if isinstance(mode, Policy) else (BLOCK_MODES if policies is None else policies).get(mode)
    if policy is None:
        raise ValueError(f"{mode!r} is not a block mode ({', '.join(BLOCK_MODES)})")
    if any(u is None for u in user_ids):
        raise ValueError(f"mode {mode!r} needs the user id (the user store keys history blocks by user)")
    return policy


def selection_size(forced, cached, valid, policy: Policy) -> int:
    """Rows of the recompute set: the forced tokens plus ratio x the other cached tokens, rounded up
    to a shape bucket (`buckets.bucket`, four per octave: these rows run through every layer; the
    extra rows take the next-highest deviations, or are masked out when there is no deviation
    check)."""
    want = int((forced & valid).sum()) + math.ceil(policy.ratio * int((cached & ~forced).sum()))
    return min(len(valid), bucket(max(want, 1), 16))


@dataclasses.dataclass(frozen=True)
class PrefillInputs:
    """Everything `blended_prefill` takes for one request except the weights: the request's device
    arrays (in its order) and its static arguments. `run(params)` is the one call that serving
    (`Engine.rank`) and training (`train/ranker.py`, differentiating through it) both make."""

    arrays: tuple  # pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos, cached, forced, valid,
    #                logit_ids, cached_k, cached_v, out_rows
    n_select: int
    cfg: ModelConfig
    check_layer: int | None = None
    deviation_on: str = "k"
    return_kv: bool = False
    impl: str = "xla"
    store: tuple | None = None  # the cached rows read in place instead of fetched (cached_k/v None):
    #                             (store_k, store_v [L, S, K, H] of the serving shard, and
    #                             `plan.store_spans` table, start, len, pos, delta [M])

    def run(self, params):
        return blended_prefill(params, *self.arrays, store=self.store, cfg=self.cfg, n_select=self.n_select,
                               check_layer=self.check_layer, deviation_on=self.deviation_on,
                               return_kv=self.return_kv, impl=self.impl)

    def padded(self, prefix: int, suffix: int, n_select: int) -> "PrefillInputs":
        """The same request in larger shapes (prefix slots, suffix rows, recompute rows): padding is
        never attended and never selected, so the outputs are unchanged; one compiled program
        for requests of different lengths (training)."""
        pk, pv, ps, pvd, tok, pos, cached, forced, valid, lid, ck, cv, rows = self.arrays
        p0, t0 = ps.shape[0], tok.shape[0]
        if prefix < p0 or suffix < t0 or n_select < self.n_select:
            raise ValueError(f"cannot pad a request of {p0} prefix / {t0} suffix / {self.n_select} recomputed "
                             f"rows to {prefix} / {suffix} / {n_select}")
        padkv = lambda a: None if a is None else jnp.pad(a, [(0, 0), (0, suffix - t0), (0, 0), (0, 0)])  # noqa: E731
        arrays = (pk, pv, *pad_arrays((ps, pvd, tok, pos, cached, forced, valid), prefix, suffix), lid,
                  padkv(ck), padkv(cv), rows)
        store = self.store
        if store is not None:  # more span entries, without rows
            store = (*store[:2], *(jnp.pad(a, (0, span_entries(suffix) - a.shape[0])) for a in store[2:]))
        return dataclasses.replace(self, arrays=arrays, n_select=n_select, store=store)


def _layer_params(layers, i):
    """One layer's weights, read by (traced) index inside a scan: no copy of the whole stack."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), layers)


@functools.partial(jax.jit, static_argnames=("cfg", "n_select", "check_layer", "deviation_on",
                                             "all_fresh", "return_kv", "impl"))
def blended_prefill(params: Params, pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos,
                    cached, forced, valid, logit_ids=None, cached_k=None, cached_v=None, out_rows=None,
                    n_keep=None, store=None, *,
                    cfg: ModelConfig,
                    n_select: int, check_layer: int | None = None, deviation_on: str = "k",
                    all_fresh: bool = False, return_kv: bool = False, impl: str = "xla"):
    """Returns (next-token logits [V] or [len(logit_ids)], selected suffix indices [n], selected
    mask [n], kv or None).

    pool_k/v [L, S, K, H]; the other arrays as in `Layout.arrays()` (unbatched; B = 1 inside).
    cached_k/v [L, T, K, H]: the suffix's cached KV at real positions (`BlockStore.fetch`; rows
    that are not cached are ignored). `logit_ids`: compute the answer's logits only for these
    vocabulary ids (ranking needs the labels only). out_rows [C]: suffix indices of forced rows
    (score slots) whose final-normed hidden states [C, D] are returned instead of the logits.
    n_keep: recompute only the best n_keep of the n_select rows (a request padded into a larger
    batch keeps its own selection; `engine/serving_step.py`).
    store: read the cached rows where they lie instead of from cached_k/v (None then):
    (store_k, store_v [L, S, K, H], table, start, len, pos, delta [M]) — the serving shard's block
    store and the request's spans in it (`plan.store_spans`: every cached row not recomputed),
    attended through `kernels.paged_attention` with the query rotated back by each span's delta
    (RoPE on the query side: no re-rotated copy of a row), the recomputed rows' fresh K/V as a
    key set of their own. The forced rows are then the recompute set (no deviation check) and no
    KV is returned.
    impl: a resolved `rcllm_jax.kernels` implementation of the recomputed tokens' attention
    ("xla", "pallas", "interpret", "interpret:gpu").
    """
    if all_fresh:
        return _fresh_prefill(params, cfg, pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos, valid,
                              logit_ids, out_rows, return_kv)
    if store is not None and (check_layer is not None or return_kv):
        raise ValueError("cached rows read in place (store=...) serve neither a deviation check nor return_kv")
    inv = inv_freq(cfg)
    p_len, t_len = prefix_slots.shape[0], tokens.shape[0]
    p_pos, q_pos = jnp.arange(p_len, dtype=jnp.int32)[None], real_pos[None]
    seg = jnp.full((1, p_len + t_len), SEG_SHARED, jnp.int32)
    k_pos, k_valid = jnp.concatenate([p_pos, q_pos], axis=1), jnp.concatenate([prefix_valid, valid])[None]
    masks = layer_masks(q_pos, seg[:, p_len:], k_pos, seg, k_valid, cfg)  # [1, T, P+T] (per layer kind)
    buf = None if store is not None else (cached_k[:, None].astype(pool_k.dtype),  # [L, 1, T, K, H]
                                          cached_v[:, None].astype(pool_v.dtype))
    x = embed(params, cfg, tokens)[None]  # [1, T, D]
    if check_layer is None:
        r, sel = _top_rows(jnp.where(forced & valid, jnp.inf, -jnp.inf), n_select, n_keep)
        x_r, below = x[:, r], None
    else:
        x_r, r, sel, below = _deviation_rows(params, cfg, inv, x, q_pos, masks, pool_k, pool_v, prefix_slots,
                                             cached, forced, valid, buf, n_select, n_keep, check_layer, deviation_on)
    mask_r = jax.tree.map(lambda m: m[:, r], masks)
    pages = impl != "xla" or store is not None
    keys = RequestKeys(
        impl=impl, pool_k=pool_k, pool_v=pool_v, prefix_slots=prefix_slots,
        prefix_pages=prefix_page_table(prefix_slots, prefix_valid, PAGE) if pages else None, page=PAGE,
        mask_p=jax.tree.map(lambda m: m[..., :p_len], mask_r), mask_t=jax.tree.map(lambda m: m[..., p_len:], mask_r),
        suffix_pages=suffix_page_table(q_pos, valid, PAGE) if pages and store is None else None,
        store=None if store is None else (store[0], store[1], tuple(a[None].astype(jnp.int32) for a in store[2:]),
                                          STORE_PAGE))
    start = 0 if below is None else check_layer + 1
    x_r, fresh = _recompute_layers(params, cfg, inv, x_r, r, sel, q_pos[:, r], keys, buf, start, return_kv)
    logits = _readout(params, cfg, x_r, r, valid, logit_ids, out_rows)
    if not return_kv:
        return logits, r, sel, None
    sk, sv = fresh
    if below is not None:  # layers 0..c are fresh for the whole suffix
        sk, sv = jnp.concatenate([below[0], sk], 0), jnp.concatenate([below[1], sv], 0)
    kv = KVCache(k=jnp.concatenate([pool_k[:, prefix_slots][:, None], sk], 2),
                 v=jnp.concatenate([pool_v[:, prefix_slots][:, None], sv], 2), pos=k_pos, seg=seg, valid=k_valid)
    return logits, r, sel, kv


def _fresh_prefill(params, cfg, pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos, valid, logit_ids,
                   out_rows, return_kv):
    """`blended_prefill(all_fresh=True)`: the suffix as a plain prefill over the prefix's pool rows."""
    p_len = prefix_slots.shape[0]
    prefix = KVCache(k=pool_k[:, prefix_slots][:, None], v=pool_v[:, prefix_slots][:, None],
                     pos=jnp.arange(p_len, dtype=jnp.int32)[None], seg=jnp.full((1, p_len), SEG_SHARED, jnp.int32),
                     valid=prefix_valid[None])
    hidden, kv = forward(params, tokens[None], real_pos[None], cfg=cfg, valid=valid[None], cache=prefix,
                         return_hidden=True if out_rows is None else "all")
    if out_rows is None:
        logits = lm_head(params, cfg, hidden[0], logit_ids)
    else:
        logits = rms_norm(hidden[0, jnp.maximum(out_rows, 0)], params["final_norm"], cfg.rms_eps)
    return logits, jnp.arange(tokens.shape[0], dtype=jnp.int32), valid, (prefix.concat(kv) if return_kv else None)


def _top_rows(score, n_select: int, n_keep):
    """(the suffix indices of the n_select best scores, ascending; which of them are real: a score
    above -inf and, with n_keep, among the best n_keep — a request padded into a batch keeps its own
    selection)."""
    neg = jnp.float32(-jnp.inf)
    top, r = jax.lax.top_k(score, n_select)
    if n_keep is not None:
        top = jnp.where(jnp.arange(n_select) < n_keep, top, neg)
    order = jnp.argsort(r)
    return r[order], top[order] > neg


def _deviation_rows(params, cfg, inv, x, q_pos, masks, pool_k, pool_v, prefix_slots, cached, forced, valid, buf,
                    n_select: int, n_keep, c: int, deviation_on: str):
    """The CacheBlend selection: layers 0..c-1 run over the whole suffix, layer c's fresh K (or V)
    is compared with the cached rows', the forced rows plus the most deviating cached ones are kept
    and layer c finishes for them. Returns (their residual stream after layer c, r, sel, (k, v)
    [c+1, 1, T, K, H] of layers 0..c for the whole suffix)."""
    layers = params["layers"]
    pk, pv = (pool[:c + 1, prefix_slots][:, None] for pool in (pool_k, pool_v))  # [c+1, 1, P, K, H]

    def full_body(x, xs):
        i, lk, lv = xs
        x, k, v = decoder_layer(cfg, layer_inv(inv, i), x, _layer_params(layers, i), q_pos, lk, lv,
                                layer_mask(masks, cfg, i))
        return x, (k, v)

    x, (full_k, full_v) = jax.lax.scan(full_body, x, (jnp.arange(c), pk[:c], pv[:c]))
    p_c = _layer_params(layers, c)
    q, k, v = qkv(cfg, layer_inv(inv, c), x, p_c, q_pos)
    fresh, old = (k, buf[0][c]) if deviation_on == "k" else (v, buf[1][c])
    dev = jnp.sum(jnp.square((fresh - old).astype(jnp.float32)), axis=(0, 2, 3))  # [T]
    r, sel = _top_rows(jnp.where(forced, jnp.inf, jnp.where(cached & valid, dev, -jnp.inf)), n_select, n_keep)
    keys, vals = jnp.concatenate([pk[c], k], axis=1), jnp.concatenate([pv[c], v], axis=1)
    x_r = attn_mlp(cfg, x[:, r], p_c, q[:, r], keys, vals, layer_mask(masks, cfg, c)[:, r])
    return x_r, r, sel, (jnp.concatenate([full_k, k[None]], axis=0), jnp.concatenate([full_v, v[None]], axis=0))


def _recompute_layers(params, cfg, inv, x_r, r, sel, pos_r, keys: RequestKeys, buf, start: int, return_kv: bool):
    """Layers start..L-1 for the recompute rows r (real where sel): each layer's fresh K/V written
    over the cached rows in the suffix buffer `buf` (None: the cached rows are read in place and
    the fresh rows are a key set of their own), then attention over the request's key sets.
    Returns (x_r, the buffer's layers [L-start, 1, T, K, H] after the writes, or None)."""
    layers = params["layers"]
    write = sel[None, :, None, None]

    def body(x_r, xs):
        (i, p), lck, lcv = xs
        if p is None:  # from a check layer on the weights are read by index (slicing the stack would copy it)
            p = _layer_params(layers, i)
        inv_i = layer_inv(inv, i)
        q, k, v = qkv(cfg, inv_i, x_r, p, pos_r)
        if lck is not None:
            lck = lck.at[:, r].set(jnp.where(write, k, lck[:, r]))
            lcv = lcv.at[:, r].set(jnp.where(write, v, lcv[:, r]))
        o = attend(cfg, q, pos_r, inv_i, keys.impl, keys.layer(cfg, i, lck, lcv, k, v, sel))
        x_r = out_mlp(cfg, x_r, p, o.astype(x_r.dtype).reshape(*o.shape[:2], -1))
        return x_r, ((lck, lcv) if return_kv else None)

    sl = slice(start, cfg.num_layers)
    # from layer 0 the weights are scanned over as they are stacked (no copy; a differentiated call
    # then accumulates one layer's cotangent per step, not the whole stack's)
    xs = ((jnp.arange(start, cfg.num_layers), None if start else layers),
          None if buf is None else buf[0][sl], None if buf is None else buf[1][sl])
    return jax.lax.scan(body, x_r, xs)


def _readout(params, cfg, x_r, r, valid, logit_ids, out_rows):
    """The answer's logits at the last valid suffix row (only `logit_ids`, if given), or the
    final-normed hidden states of the `out_rows` (score slots)."""
    if out_rows is None:
        last = jnp.maximum(jnp.sum(valid) - 1, 0)
        return lm_head(params, cfg, x_r[0, jnp.argmax(r == last)], logit_ids)
    rows = jnp.argmax(r[None, :] == out_rows[:, None], axis=1)  # where each slot sits in the recompute set
    return rms_norm(x_r[0, rows], params["final_norm"], cfg.rms_eps)
