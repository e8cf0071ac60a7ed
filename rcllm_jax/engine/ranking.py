"""Rank candidates from the answer's first token (single-token labels), by teacher forcing
(multi-token labels), or from score slots (slot prompts + a trained `SlotHead`), after a full
prefill of the prompt.

Scores are log-probabilities normalised over the candidates: log P(label_j | prompt, the answer is
one of the labels). Multi-token labels: log P(t_1..t_m, ")" | prompt), all labels scored in one
extra forward pass where each label's tokens form their own segment over the prompt KV.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import log_softmax

from rcllm_jax.buckets import bucket, coarse_bucket
from rcllm_jax.data.prompt import Prompt, check_prompt_length
from rcllm_jax.engine.plan import query_rows
from rcllm_jax.engine.selective_recompute import blended_prefill
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import (
    SEG_SHARED,
    KVCache,
    Params,
    forward,
    lm_head,
    rms_norm,
)


@dataclasses.dataclass(frozen=True)
class RankResult:
    scores: np.ndarray  # [K] log-probabilities over candidates, prompt order
    ttft_s: float  # prompt tokens in -> candidate scores out (host to host)
    prompt_tokens: int
    computed_tokens: int  # tokens run through the model (incl. label scoring)

    @property
    def order(self) -> np.ndarray:
        """[K] candidate indices, best first (ties keep prompt order)."""
        return np.argsort(-self.scores, kind="stable")


@dataclasses.dataclass(frozen=True)
class EngineResult(RankResult):
    """An `Engine`'s ranking: the scores and what the request computed, read from caches, fetched."""

    recomputed_block_tokens: int = 0  # cached block tokens recomputed (sink + deviation picks)
    cached_block_tokens: int = 0  # suffix tokens served from the block store
    cache_hit_tokens: int = 0  # prompt tokens whose KV came from a cache and was not computed now
    selected: np.ndarray | None = None  # [n] suffix indices recomputed (block modes)
    shard: int = 0  # items-shard that served the request
    local_item_blocks: int = 0  # cached item blocks held by that shard (hot replicas included)
    remote_item_blocks: int = 0  # cached item blocks fetched from other shards
    local_item_bytes: int = 0
    remote_item_bytes: int = 0


@functools.partial(jax.jit, static_argnames=("cfg", "return_kv"))
def _full_prefill(params: Params, tokens, n_valid, logit_ids=None, *, cfg: ModelConfig, return_kv: bool):
    # tokens [1, Tb] right-padded -> the next token's logits [V] (or at logit_ids) and the prompt KV
    tb = tokens.shape[1]
    positions = jnp.arange(tb, dtype=jnp.int32)[None]
    hidden, kv = forward(params, tokens, positions, cfg=cfg, valid=positions < n_valid, return_hidden=True)
    logits = lm_head(params, cfg, hidden[0], logit_ids)
    return (logits, kv) if return_kv else (logits, None)


@functools.partial(jax.jit, static_argnames=("cfg", "num_labels"))
def _label_logprobs(params: Params, first_logits, kv: KVCache, tokens, positions, segments, valid,
                    targets, owner, first_ids, *, cfg: ModelConfig, num_labels: int):
    """Teacher-forced log P(label_j, close) for every label j in one pass.

    tokens/positions/segments/valid/targets/owner [M]: the label tokens fed after the prompt, each
    label in its own segment; first_ids [K]: each label's first token (scored from first_logits).
    """
    kv = kv.replace(seg=jnp.full_like(kv.seg, SEG_SHARED))  # every label sees the whole prompt
    logits, _ = forward(params, tokens[None], positions[None], cfg=cfg, segments=segments[None],
                        valid=valid[None], cache=kv, all_logits=True)
    lp = jax.nn.log_softmax(logits[0], axis=-1)  # [M, V]
    tok_lp = jnp.where(valid, jnp.take_along_axis(lp, targets[:, None], axis=1)[:, 0], 0.0)
    per_label = jax.ops.segment_sum(tok_lp, owner, num_segments=num_labels)
    return per_label + jax.nn.log_softmax(first_logits)[first_ids]


def _label_batch(prompt: Prompt, start: int):
    """Flatten the labels' teacher-forcing inputs: label j = tokens t1..tm fed at start..start+m-1
    in segment j+1, predicting t2..tm and the closing token."""
    toks, pos, seg, tgt, own = [], [], [], [], []
    for j, lt in enumerate(prompt.label_tokens):
        for i, t in enumerate(lt):
            toks.append(t)
            pos.append(start + i)
            seg.append(j + 1)
            tgt.append(lt[i + 1] if i + 1 < len(lt) else prompt.close_token)
            own.append(j)
    m, mb = len(toks), bucket(len(toks))
    pad = lambda xs, v: np.asarray(xs + [v] * (mb - m), np.int32)  # noqa: E731
    valid = np.arange(mb) < m
    return pad(toks, 0), pad(pos, start), pad(seg, 1), valid, pad(tgt, 0), pad(own, 0), m


@functools.partial(jax.jit, static_argnames=("cfg",))
def _full_slots(params: Params, tokens, n_valid, slot_pos, *, cfg: ModelConfig):
    # tokens [1, Tb] right-padded -> final-normed hidden states at slot_pos [K] ([K, D])
    tb = tokens.shape[1]
    positions = jnp.arange(tb, dtype=jnp.int32)[None]
    hidden, _ = forward(params, tokens, positions, cfg=cfg, valid=positions < n_valid, return_hidden="all")
    return rms_norm(hidden[0, jnp.maximum(slot_pos, 0)], params["final_norm"], cfg.rms_eps)


def slot_rows(prompt: Prompt, start: int = 0) -> np.ndarray | None:
    """Indices (from token `start` on) of a slot prompt's score slots, padded with -1 to
    `output_rows(prompt)` (one program per bucket); None for label prompts."""
    if prompt.head != "slot":
        return None
    rows = prompt.slot_positions - start
    out = np.full(output_rows(prompt), -1, np.int32)
    out[:len(rows)] = rows
    return out


def answer_logit_ids(prompt: Prompt):
    """Vocabulary ids whose first-token logits rank the candidates, or None (full vocabulary)
    when labels take several tokens and their log-probabilities need the full normaliser (or the
    prompt is scored by slots)."""
    if prompt.head == "slot":
        return None
    if prompt.single_token_labels:  # padded to `output_rows` with the first id (the extra logits are dropped)
        ids = [lt[0] for lt in prompt.label_tokens]
        return jnp.asarray(ids + ids[:1] * (output_rows(prompt) - len(ids)), jnp.int32)
    return None


def output_rows(prompt: Prompt) -> int:
    """Rows of a prefill's answer output (score slots, or single-token labels' logits): the number
    of candidates rounded up to a power of two (`buckets.coarse_bucket`)."""
    return coarse_bucket(len(prompt.candidates), 16)


def candidate_scores(params: Params, cfg: ModelConfig, prompt: Prompt, first_logits, kv: KVCache | None):
    """Log-probabilities over the candidates from the answer's first-token logits, computed at
    `answer_logit_ids(prompt)` (and the prompt KV for multi-token labels).
    Returns (scores [K]: a host array for single-token labels, else a jax array; label tokens computed)."""
    if prompt.single_token_labels:  # on the host: no program per candidate count
        return log_softmax(np.asarray(first_logits, np.float64)[:len(prompt.labels)]).astype(np.float32), 0
    first_ids = jnp.asarray([lt[0] for lt in prompt.label_tokens], jnp.int32)
    if kv is None:
        raise ValueError("multi-token labels need the prompt KV")
    toks, pos, seg, valid, tgt, own, m = _label_batch(prompt, len(prompt))
    seq_lp = _label_logprobs(params, first_logits, kv, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg),
                             jnp.asarray(valid), jnp.asarray(tgt), jnp.asarray(own), first_ids,
                             cfg=cfg, num_labels=len(prompt.labels))
    return jax.nn.log_softmax(seq_lp), m


@functools.partial(jax.jit, static_argnames=("cfg",))
def _full_kv(params: Params, tokens, n_valid, *, cfg: ModelConfig):
    # tokens [1, Tb] right-padded -> the base model's KV of the whole prompt ([L, Tb, K, H] each)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    _, kv = forward(params, tokens, positions, cfg=cfg, valid=positions < n_valid, return_hidden=True)
    return kv.k[:, 0], kv.v[:, 0]


def query_pass(query_params: Params, cfg: ModelConfig, pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos,
               base_k, base_v, query, valid, out_rows):
    """A query adapter's rows recomputed over the base model's KV: the suffix rows `query` [T] run
    with `query_params` over the exact prefix (pool slots) and the base KV of the other suffix
    rows (base_k/v [L, T, K, H]). Returns the final-normed hidden states at out_rows [C, D]."""
    query = np.asarray(query) & np.asarray(valid)
    hidden, *_ = blended_prefill(query_params, pool_k, pool_v, prefix_slots, prefix_valid, tokens, real_pos,
                                 np.asarray(valid) & ~query, query, valid, None, base_k, base_v, out_rows,
                                 cfg=cfg, n_select=bucket(int(query.sum()), 16))
    return hidden


def rank_full(params: Params, cfg: ModelConfig, prompt: Prompt, head=None, query_params: Params | None = None
              ) -> RankResult:
    """Full prefill of the whole prompt (the reference every cached mode is compared with).
    head: the `SlotHead` that scores a slot prompt. query_params: its query adapter's weights (the
    base model reads the prompt, then they recompute the query rows over its KV)."""
    n = len(prompt)
    check_prompt_length(n, cfg.max_position, "the model's context")
    tb = bucket(n, 64)
    tokens = np.zeros((1, tb), np.int32)
    tokens[0, :n] = prompt.tokens
    t0 = time.perf_counter()
    if prompt.head == "slot":
        if head is None:
            raise ValueError("a slot prompt needs a trained ranking head (SlotHead)")
        computed = n
        if query_params is None:
            hidden = _full_slots(params, jnp.asarray(tokens), n, jnp.asarray(slot_rows(prompt)), cfg=cfg)
        else:
            bk, bv = _full_kv(params, jnp.asarray(tokens), n, cfg=cfg)
            pos = np.arange(tb, dtype=np.int32)
            query = np.zeros(tb, bool)
            query[:n] = query_rows(prompt)
            hidden = query_pass(query_params, cfg, bk, bv, np.zeros(0, np.int32), np.zeros(0, bool), tokens[0], pos,
                                bk, bv, query, pos < n, slot_rows(prompt))
            computed += int(query.sum())
        scores = head.scores(np.asarray(hidden)[:len(prompt.candidates)])
        return RankResult(scores=scores, ttft_s=time.perf_counter() - t0, prompt_tokens=n, computed_tokens=computed)
    first_logits, kv = _full_prefill(params, jnp.asarray(tokens), n, answer_logit_ids(prompt), cfg=cfg,
                                     return_kv=not prompt.single_token_labels)
    scores, extra = candidate_scores(params, cfg, prompt, first_logits, kv)
    scores = np.asarray(scores)
    ttft = time.perf_counter() - t0
    return RankResult(scores=scores, ttft_s=ttft,
                      prompt_tokens=n, computed_tokens=n + extra)
