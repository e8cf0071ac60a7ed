"""Greedy decoding over a fixed-capacity KV buffer (bucketed, so a process compiles few programs)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.buckets import bucket
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import KVCache, Params, forward


@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def _prefill(params, tokens, n_valid, *, cfg: ModelConfig, capacity: int):
    # tokens [1, Tb] right-padded; returns first generated token and the filled buffer.
    tb = tokens.shape[1]
    positions = jnp.arange(tb, dtype=jnp.int32)[None]
    valid = positions < n_valid
    logits, kv = forward(params, tokens, positions, cfg=cfg, valid=valid)
    buf = KVCache.empty(cfg, 1, capacity).write(kv, 0)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), buf


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("buf",))
def _decode_step(params, token, pos, buf: KVCache, *, cfg: ModelConfig):
    # token [1] at position pos (scalar); attends to buf, then is written into it at index pos.
    logits, kv = forward(params, token[:, None], jnp.full((1, 1), pos, jnp.int32), cfg=cfg, cache=buf)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), buf.write(kv, pos)


def greedy_generate(params: Params, cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy continuation of prompt_ids (stops at a stop id, which is not returned)."""
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("empty prompt")
    if n + max_new_tokens > cfg.max_position:
        raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {cfg.max_position} tokens")
    tb = bucket(n)
    capacity = bucket(tb + max_new_tokens)
    tokens = np.zeros((1, tb), np.int32)
    tokens[0, :n] = prompt_ids
    token, buf = _prefill(params, jnp.asarray(tokens), n, cfg=cfg, capacity=capacity)
    # Padding slots [n, tb) of the buffer are marked invalid and get overwritten by decoding.
    out: list[int] = []
    for i in range(max_new_tokens):
        t = int(token[0])
        if t in stop_ids:
            break
        out.append(t)
        if i + 1 == max_new_tokens:
            break
        token, buf = _decode_step(params, token, n + i, buf, cfg=cfg)
    return out
