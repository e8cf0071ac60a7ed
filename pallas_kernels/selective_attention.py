"""Selective attention: a few query tokens at arbitrary global positions over a stitched, ragged
KV buffer (cached blocks re-rotated into place + fresh rows), GQA, online softmax over KV tiles.

  q      [B, T, N, H]   queries (the recomputed tokens), at positions q_pos [B, T]
  k, v   [B, S, K, H]   the stitched KV of each request, at positions k_pos [B, S]
  kv_len [B]            optional: rows of k/v that hold data; rows >= kv_len are padding, never
                        read as data (tiles past it are skipped); None = all S rows
  k_valid [B, S]        optional: rows below kv_len that are padding too (a bucketed prefix)
  window                optional sliding window (Mistral): a key further back than window - 1
                        positions is not attended
  -> out [B, T, N, H]   softmax(q k^T / sqrt(H), causal by global position) v

A query attends key s iff s < kv_len, k_valid[s], k_pos[s] <= q_pos and (with a window)
q_pos - k_pos[s] < window (causal by position, not by index: the stitched buffer need not be
sorted). A query that sees no key gets 0.

`selective_attention_reference` is the pure-JAX definition; `selective_attention` the Pallas
kernel: grid (batch, kv head, query tile), the G = N / K query heads of one kv head folded into
the tile's rows, a loop over KV tiles up to kv_len keeping the running max, denominator and
accumulator in f32 (flash attention's online softmax). Padding rows of V are zeroed before use, so
NaN or garbage there cannot leak through a zero probability.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_NEG = -1e30


def selective_attention_reference(q, k, v, q_pos, k_pos, kv_len=None, k_valid=None, window: int | None = None):
    """Pure JAX: dense scores with the same mask (f32 softmax)."""
    b = q.shape[0]
    valid = jnp.ones((b, k.shape[1]), bool)  # [B, S]
    if kv_len is not None:
        valid &= jnp.arange(k.shape[1])[None, :] < kv_len[:, None]
    if k_valid is not None:
        valid &= k_valid
    return masked_attention(q, k, v, valid, k_pos, q_pos, window)[0].astype(q.dtype)


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


def _kernel(len_ref, qpos_ref, kpos_ref, kval_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, scale: float,
            window: int | None):
    # len_ref [1, 1]; qpos_ref [bq, 1]; kpos_ref, kval_ref [1, S]; q_ref [bq, H]; k_ref, v_ref [S, H]
    kv_len = len_ref[0, 0]
    q = q_ref[...].astype(jnp.float32) * scale
    qp = qpos_ref[...]  # [bq, 1]
    bq, h = q.shape

    def body(i, carry):
        m, l, acc = carry
        start = pl.multiple_of(i * block_k, block_k)
        ks = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        vs = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        kp = kpos_ref[:, pl.ds(start, block_k)]  # [1, bk]
        valid = (start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < kv_len  # [1, bk]
        valid &= kval_ref[:, pl.ds(start, block_k)] != 0
        mask = valid & (kp <= qp)  # [bq, bk]
        if window is not None:
            mask &= (qp - kp) < window
        vs = jnp.where(valid.reshape(block_k, 1), vs, 0.0)
        ks = jnp.where(valid.reshape(block_k, 1), ks, 0.0)
        s = jnp.where(mask, jax.lax.dot_general(q, ks, (((1,), (1,)), ((), ()))), _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * alpha + jnp.dot(p, vs)
        return m_new, l, acc

    init = (jnp.full((bq, 1), _NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, h), jnp.float32))
    n_tiles = (kv_len + block_k - 1) // block_k
    _, l, acc = jax.lax.fori_loop(0, n_tiles, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("window", "block_q", "block_k", "interpret"))
def selective_attention(q, k, v, q_pos, k_pos, kv_len=None, k_valid=None, *, window: int | None = None,
                        block_q: int = 64, block_k: int = 128, interpret: bool = False):
    """Pallas kernel; same contract as `selective_attention_reference`. T and S are padded to
    tiles here (padding keys are beyond kv_len; padding queries are dropped)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    rows = t * g
    bq = min(block_q, pl.next_power_of_2(rows)) if rows < block_q else block_q
    rows_p = pl.cdiv(rows, bq) * bq
    bk = min(block_k, max(8, pl.next_power_of_2(s)))
    s_p = pl.cdiv(s, bk) * bk
    # [B, T, K, G, H] -> [B, K, T*G, H]: a tile holds the G heads of some queries
    qh = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    qp = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)
    qp = jnp.pad(qp, ((0, 0), (0, rows_p - rows)), constant_values=-1)[..., None]  # [B, R, 1]
    kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_p - s), (0, 0)))  # [B, K, S, H]
    vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_p - s), (0, 0)))
    kp = jnp.pad(k_pos.astype(jnp.int32), ((0, 0), (0, s_p - s)))[:, None, :]  # [B, 1, S]
    kv_len = jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len
    kl = jnp.minimum(kv_len.astype(jnp.int32), s).reshape(b, 1, 1)
    kval = jnp.ones((b, s), jnp.int32) if k_valid is None else k_valid.astype(jnp.int32)
    kval = jnp.pad(kval, ((0, 0), (0, s_p - s)))[:, None, :]  # [B, 1, S]
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, scale=h ** -0.5, window=window),
        grid=(b, kh, rows_p // bq),
        in_specs=[
            pl.BlockSpec((None, 1, 1), lambda i, j, r: (i, 0, 0)),
            pl.BlockSpec((None, bq, 1), lambda i, j, r: (i, r, 0)),
            pl.BlockSpec((None, 1, s_p), lambda i, j, r: (i, 0, 0)),
            pl.BlockSpec((None, 1, s_p), lambda i, j, r: (i, 0, 0)),
            pl.BlockSpec((None, None, bq, h), lambda i, j, r: (i, j, r, 0)),
            pl.BlockSpec((None, None, s_p, h), lambda i, j, r: (i, j, 0, 0)),
            pl.BlockSpec((None, None, s_p, h), lambda i, j, r: (i, j, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bq, h), lambda i, j, r: (i, j, r, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
        interpret=interpret,
    )(kl, qp, kp, kval, qh, kt, vt)
    out = out[:, :, :rows].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n, h)
