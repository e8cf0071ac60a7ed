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
model's sliding window), so with R = the whole suffix the result is a full prefill. They read the
prefix where it lies in the pool (by slot, one layer at a time; the Pallas path: the pool's pages
by page table) and the suffix buffer, one softmax over both without a stitched copy. `all_fresh`
runs the suffix as a plain prefill (full and prefix modes: nothing to gather or select).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import merge_attention
from pallas_kernels.masked_attention import masked_attention
from rcllm_jax import kernels
from rcllm_jax.buckets import bucket
from rcllm_jax.cache.block_store import PAD as STORE_PAGE
from rcllm_jax.cache.pool import PAGE
from rcllm_jax.engine.plan import pad_arrays, span_entries
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import (SEG_SHARED, KVCache, Params, _layer, attend_parts, attention_mask,
                                     attn_mlp, forward, lm_head, out_mlp, qkv, rms_norm)
from rcllm_jax.model.rope import inv_freq


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


def _page_spans(pages, n_rows, first_pos):
    """(table, span_start, span_len, span_pos, span_delta) [1, M] of rows stored as whole pages in
    order (`pages` [M]), the `n_rows` valid rows first, consecutive in position from each page's
    `first_pos` [M]; stored at their real positions (no offset)."""
    zero = jnp.zeros(pages.shape[0], jnp.int32)
    rows = jnp.clip(n_rows - jnp.arange(pages.shape[0]) * PAGE, 0, PAGE)
    return tuple(a[None].astype(jnp.int32) for a in (pages, zero, rows, first_pos, zero))


def _prefix_page_table(prefix_slots, prefix_valid):
    """`_page_spans` of a request's prefix in the pool: its slots are whole pages in order
    (`PageAllocator.slots`); padding slots point at the scratch page and have no rows."""
    n = -(-prefix_slots.shape[0] // PAGE)
    slots = jnp.pad(prefix_slots, (0, n * PAGE - prefix_slots.shape[0]))
    return _page_spans(slots[::PAGE] // PAGE, jnp.sum(prefix_valid), jnp.arange(n) * PAGE)


def _suffix_page_table(q_pos, valid):
    """`_page_spans` of a request's suffix buffer [T, K, H], read in pages of PAGE rows (padded to
    whole pages by `kernels.paged_attention`)."""
    return _page_spans(jnp.arange(-(-valid.shape[0] // PAGE)), jnp.sum(valid), q_pos[0, ::PAGE])


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
    ("xla", "pallas", "interpret").
    """
    inv = inv_freq(cfg)
    p_len, t_len = prefix_slots.shape[0], tokens.shape[0]
    p_pos = jnp.arange(p_len, dtype=jnp.int32)[None]
    seg_p = jnp.full((1, p_len), SEG_SHARED, jnp.int32)
    seg_t = jnp.full((1, t_len), SEG_SHARED, jnp.int32)
    q_pos = real_pos[None]
    last = jnp.maximum(jnp.sum(valid) - 1, 0)

    if all_fresh:
        prefix = KVCache(k=pool_k[:, prefix_slots][:, None], v=pool_v[:, prefix_slots][:, None], pos=p_pos,
                         seg=seg_p, valid=prefix_valid[None])
        hidden, kv = forward(params, tokens[None], q_pos, cfg=cfg, valid=valid[None], cache=prefix,
                             return_hidden=True if out_rows is None else "all")
        idx = jnp.arange(t_len, dtype=jnp.int32)
        if out_rows is None:
            logits = lm_head(params, cfg, hidden[0], logit_ids)
        else:
            logits = rms_norm(hidden[0, jnp.maximum(out_rows, 0)], params["final_norm"], cfg.rms_eps)
        return logits, idx, valid, (prefix.concat(kv) if return_kv else None)

    k_pos = jnp.concatenate([p_pos, q_pos], axis=1)
    k_valid = jnp.concatenate([prefix_valid, valid])[None]
    mask = attention_mask(q_pos, seg_t, k_pos, jnp.concatenate([seg_p, seg_t], 1), k_valid,
                          cfg.sliding_window)  # [1, T, P+T]
    if store is not None:
        if check_layer is not None or return_kv:
            raise ValueError("cached rows read in place (store=...) serve neither a deviation check nor return_kv")
        store_k, store_v, *spans = store
        spans = tuple(a[None].astype(jnp.int32) for a in spans)  # [1, T]
        ck = cv = None
    else:
        ck = cached_k[:, None].astype(pool_k.dtype)  # [L, 1, T, K, H]
        cv = cached_v[:, None].astype(pool_v.dtype)
    x = params["embed"][tokens][None]  # [1, T, D]
    layers = params["layers"]
    neg = jnp.float32(-jnp.inf)
    full_k = full_v = None

    if check_layer is not None:
        c = check_layer
        pk, pv = (pool[:c + 1, prefix_slots][:, None] for pool in (pool_k, pool_v))  # [c+1, 1, P, K, H]

        def full_body(x, xs):
            i, lk, lv = xs
            x, k, v = _layer(cfg, inv, x, _layer_params(layers, i), q_pos, lk, lv, mask)
            return x, (k, v)

        x, (full_k, full_v) = jax.lax.scan(full_body, x, (jnp.arange(c), pk[:c], pv[:c]))
        p_c = _layer_params(layers, c)
        q, k, v = qkv(cfg, inv, x, p_c, q_pos)
        fresh, old = (k, ck[c]) if deviation_on == "k" else (v, cv[c])
        dev = jnp.sum(jnp.square((fresh - old).astype(jnp.float32)), axis=(0, 2, 3))  # [T]
        score = jnp.where(forced, jnp.inf, jnp.where(cached & valid, dev, neg))
        top, r = jax.lax.top_k(score, n_select)
        if n_keep is not None:  # only the best n_keep of the n_select rows (a request padded into a batch)
            top = jnp.where(jnp.arange(n_select) < n_keep, top, neg)
        order = jnp.argsort(r)
        r, sel = r[order], top[order] > neg
        keys = jnp.concatenate([pk[c], k], axis=1)
        vals = jnp.concatenate([pv[c], v], axis=1)
        x_r = attn_mlp(cfg, x[:, r], p_c, q[:, r], keys, vals, mask[:, r])
        full_k = jnp.concatenate([full_k, k[None]], axis=0)  # layers 0..c are fresh for the whole suffix
        full_v = jnp.concatenate([full_v, v[None]], axis=0)
        start = c + 1
    else:
        score = jnp.where(forced & valid, jnp.inf, neg)
        top, r = jax.lax.top_k(score, n_select)
        if n_keep is not None:  # only the best n_keep of the n_select rows (a request padded into a batch)
            top = jnp.where(jnp.arange(n_select) < n_keep, top, neg)
        order = jnp.argsort(r)
        r, sel = r[order], top[order] > neg
        x_r = x[:, r]
        start = 0

    pos_r, mask_r = q_pos[:, r], mask[:, r]
    mask_p, mask_t = mask_r[..., :p_len], mask_r[..., p_len:]
    write = sel[None, :, None, None]
    if impl != "xla" or store is not None:  # the pool's pages of the prefix, by page table
        prefix_pages = _prefix_page_table(prefix_slots, prefix_valid)
    if impl != "xla" and store is None:  # the suffix buffer's pages
        suffix_pages = _suffix_page_table(q_pos, valid)

    def body(x_r, xs):
        (i, p), lck, lcv = xs
        if p is None:  # from a check layer on the weights are read by index (slicing the stack would copy it)
            p = _layer_params(layers, i)
        q, k, v = qkv(cfg, inv, x_r, p, pos_r)
        if store is None:
            lck = lck.at[:, r].set(jnp.where(write, k, lck[:, r]))
            lcv = lcv.at[:, r].set(jnp.where(write, v, lcv[:, r]))
        # each key set read where it lies: no stitched [prefix + suffix] copy
        if impl == "xla" and store is None:  # this layer's stored prefix rows by slot, the suffix buffer
            lpool_k, lpool_v = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (pool_k, pool_v))
            parts = ((lpool_k[prefix_slots][None], lpool_v[prefix_slots][None], mask_p), (lck, lcv, mask_t))
            return out_mlp(cfg, x_r, p, attend_parts(cfg, q, parts)), ((lck, lcv) if return_kv else None)
        if store is None:  # the suffix buffer through its page table
            o, lse = kernels.paged_attention(q, lck[0], lcv[0], pos_r, *suffix_pages, inv, impl=impl,
                                             window=cfg.sliding_window, page=PAGE)
            paged = []
        else:  # the fresh rows (dense), then the store's spans
            o, lse = masked_attention(q, k, v, sel[None], pos_r, pos_r, cfg.sliding_window)
            paged = [(store_k, store_v, spans, STORE_PAGE)]
        if p_len:  # the prefix's pool pages (no prefix: nothing to merge)
            paged.append((pool_k, pool_v, prefix_pages, PAGE))
        for rows_k, rows_v, table, page in paged:  # merged by log-sum-exp
            lk, lv = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (rows_k, rows_v))
            o_s, lse_s = kernels.paged_attention(q, lk, lv, pos_r, *table, inv, impl=impl,
                                                 window=cfg.sliding_window, page=page)
            o, lse = merge_attention(o_s, lse_s, o.astype(o_s.dtype), lse)
        x_r = out_mlp(cfg, x_r, p, o.astype(x_r.dtype).reshape(*o.shape[:2], -1))
        return x_r, ((lck, lcv) if return_kv else None)

    sl = slice(start, cfg.num_layers)
    idx = jnp.arange(start, cfg.num_layers)
    # from layer 0 the weights are scanned over as they are stacked (no copy; a differentiated call
    # then accumulates one layer's cotangent per step, not the whole stack's)
    x_r, out = jax.lax.scan(body, x_r, ((idx, None if start else layers), None if ck is None else ck[sl],
                                        None if cv is None else cv[sl]))
    if out_rows is None:
        logits = lm_head(params, cfg, x_r[0, jnp.argmax(r == last)], logit_ids)
    else:
        rows = jnp.argmax(r[None, :] == out_rows[:, None], axis=1)  # where each slot sits in the recompute set
        logits = rms_norm(x_r[0, rows], params["final_norm"], cfg.rms_eps)
    kv = None
    if return_kv:
        sk, sv = out
        if full_k is not None:
            sk, sv = jnp.concatenate([full_k, sk], 0), jnp.concatenate([full_v, sv], 0)
        kv = KVCache(k=jnp.concatenate([pool_k[:, prefix_slots][:, None], sk], 2),
                     v=jnp.concatenate([pool_v[:, prefix_slots][:, None], sv], 2), pos=k_pos,
                     seg=jnp.concatenate([seg_p, seg_t], 1), valid=k_valid)
    return logits, r, sel, kv
