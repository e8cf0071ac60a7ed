"""Masked attention: the pure-JAX definition the kernels and the engine's XLA paths share.

Queries q [B, T, N, H] at positions q_pos [B, T] over keys k, v [B, S, K, H] at positions
k_pos [B, S] (GQA: N = G * K), key s visible to query t iff valid[b, s] and k_pos <= q_pos
(causal by position, not by index: a stitched buffer need not be sorted), and with a window
(Mistral) q_pos - k_pos < window. Rows that are not valid are zeroed before use, so NaN or
garbage there cannot leak through a zero probability. Returns the output and its log-sum-exp,
so that attention over several key sets merges exactly (`rcllm_jax.engine.selective_recompute`).
"""

from __future__ import annotations

import jax.numpy as jnp


def masked_attention(q, k, v, valid, k_pos, q_pos, window: int | None = None):
    """The references' definition: dense f32 softmax attention of q [B, T, N, H] over k, v
    [B, S, K, H], key s visible to query t iff valid[b, s], k_pos <= q_pos (and within the window).
    -> (out [B, T, N, H] f32, 0 where no key is visible; log-sum-exp [B, T, N], -inf there)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    mask = valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    if window is not None:
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    kz = jnp.where(valid[:, :, None, None], k, 0).astype(jnp.float32)
    vz = jnp.where(valid[:, :, None, None], v, 0).astype(jnp.float32)
    qg = q.reshape(b, t, kh, g, h).astype(jnp.float32)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, kz) * h ** -0.5
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, None, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bskh->btkgh", p / jnp.where(l > 0, l, 1.0), vz).reshape(b, t, n, h)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]  # [B, K, G, T]
    return o, lse.transpose(0, 3, 1, 2).reshape(b, t, n)
