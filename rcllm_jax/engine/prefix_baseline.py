"""The prefix-caching baseline (vLLM / SGLang automatic prefix caching) on the engine's own pool.

`rank_prefix` serves a prompt's longest cached run of full pages from the prefix cache and
computes the rest (the `prefix` mode); `warm_prefix` computes a prompt's instruction + history
pages at event time (the `prefix_warm` mode: a warmed radix tree, the strongest prefix baseline).
Both read the engine through its public interface only.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from rcllm_jax.cache.pool import PAGE
from rcllm_jax.data.prompt import Prompt
from rcllm_jax.engine.plan import fresh_layout, history_prefix, query_rows
from rcllm_jax.engine.ranking import (
    EngineResult,
    answer_logit_ids,
    query_pass,
    slot_rows,
)
from rcllm_jax.engine.selective_recompute import blended_prefill


def warm_prefix(engine, prompt: Prompt, shard: int = 0) -> int:
    """Event-time warming of the prefix cache: the full pages of the prompt's instruction + history
    that are not cached yet are computed and inserted now, so a request computes only what follows.
    Returns the number of tokens computed (0 on a hit)."""
    toks = np.asarray(history_prefix(prompt), np.int32)
    n_full = len(toks) // PAGE * PAGE
    cache = engine.prefix
    pages, hit = cache.lookup(np.append(toks[:n_full], 0), count=False)  # the pages a request can hit
    if hit >= n_full:
        return 0
    lay = fresh_layout(cache.alloc.slots(pages, hit) if pages else np.zeros(0, np.int32), toks[hit:n_full],
                       hit, shard)
    pk, pv = engine.pool_on(shard)
    _, _, _, kv = blended_prefill(engine.weights(shard), pk, pv, *lay.arrays(), cfg=engine.cfg,
                                  n_select=len(lay.tokens), all_fresh=True, return_kv=True)
    cache.insert(toks[:n_full], kv.k[:, 0], kv.v[:, 0], hit, n=lay.n_suffix, row0=len(lay.prefix_slots))
    jax.block_until_ready((engine.pool.k, engine.pool.v))
    return n_full - hit


def rank_prefix(engine, prompt: Prompt, shard: int = 0) -> EngineResult:
    """Rank with prefix caching: the prompt's cached full pages are read, everything after them
    computed, and its new full pages inserted after the answer (vLLM writes them during prefill).
    A slot prompt never hits beyond its first score slot (nor, with a query adapter, beyond its
    first query row: those rows are the adapter's)."""
    if jax.process_count() > 1:
        raise ValueError("prefix mode is a single-process baseline (its pages are written from one device)")
    t0 = time.perf_counter()
    toks = prompt.tokens
    cache = engine.prefix
    pages, hit = cache.lookup(toks)
    if prompt.head == "slot":
        first = int(np.argmax(query_rows(prompt))) if engine.has_query_adapter else int(prompt.slot_positions[0])
        keep = min(len(pages), first // PAGE)
        pages, hit = pages[:keep], keep * PAGE
    lay = fresh_layout(cache.alloc.slots(pages, hit) if pages else np.zeros(0, np.int32),
                       np.asarray(toks[hit:]), hit, shard)
    pk, pv = engine.pool_on(shard)
    logits, _, _, kv = blended_prefill(
        engine.weights(shard), pk, pv, *lay.arrays(), answer_logit_ids(prompt), out_rows=slot_rows(prompt, hit),
        cfg=engine.cfg, n_select=len(lay.tokens), all_fresh=True, return_kv=True)
    pb = len(lay.prefix_slots)
    requeried = 0
    if prompt.head == "slot" and engine.has_query_adapter:  # the query rows again, adapted, over that KV
        query = np.zeros(len(lay.tokens), bool)
        query[:lay.n_suffix] = query_rows(prompt)[hit:]
        logits = query_pass(engine.weights(shard, query=True), engine.cfg, pk, pv, lay.prefix_slots,
                            lay.prefix_valid, lay.tokens, lay.real_pos, kv.k[:, 0, pb:], kv.v[:, 0, pb:], query,
                            lay.valid, slot_rows(prompt, hit))
        requeried = int(query.sum())
    scores, extra = engine.answer_scores(prompt, logits, kv, shard)
    scores = np.asarray(scores)
    ttft = time.perf_counter() - t0
    cache.insert(toks, kv.k[:, 0], kv.v[:, 0], hit, n=lay.n_suffix, row0=pb)
    return EngineResult(scores=scores, ttft_s=ttft, prompt_tokens=len(prompt),
                        computed_tokens=len(prompt) - hit + extra + requeried, cache_hit_tokens=hit, shard=shard)
