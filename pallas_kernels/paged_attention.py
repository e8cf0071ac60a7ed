"""Paged selective attention: a few query tokens over cached KV read where it is stored (pages of
a pool or a block store, addressed by a block table), streamed page by page with online softmax.

  q          [B, T, N, H]   queries, RoPE applied at their real positions q_pos [B, T]
  k_pages    [P, page, K, H] one layer's stored keys (RoPE applied at their stored positions)
  v_pages    [P, page, K, H]
  table      [B, M] int32   page of the request's m-th span
  span_start [B, M]         first row of the span in its page
  span_len   [B, M]         rows in the span (0: an unused entry, nothing of its page is used)
  span_pos   [B, M]         real position of the span's first row (its rows are consecutive)
  span_delta [B, M]         real - stored position of the span's keys (0 where keys are stored at
                            their real positions, e.g. a user's history prefix in the pool)
  inv        [H/2]          the model's RoPE inverse frequencies (HF rotate_half layout)
  window                    optional sliding window (a key window or more positions back is not attended)
  -> out [B, T, N, H], lse [B, T, N] (f32 log-sum-exp of the visible scores; -inf where none)

A query attends row s of a span iff s is inside the span, its real position <= q_pos (and within
the window). Scores are those of keys re-rotated to their real positions; instead of rotating the
keys (a copy of every cached row, what `gather_rerotate` does) the kernel rotates the query by
-delta per span: RoPE is a rotation per frequency pair, so <rot(q, p), rot(k, c + d)> =
<rot(q, p - d), rot(k, c)> (exact in real arithmetic; float rounding differs from re-rotating
keys at the 1e-6 relative level in f32). `lse` lets a caller merge this with attention over
other keys (the request's fresh rows): `merge_attention`.

`paged_attention_reference` is the definition: gather the spans into a dense buffer, re-rotate the
keys to their real positions, dense masked softmax. `paged_attention` is the Pallas TPU kernel (Mosaic): grid
(batch, kv head, query tile, span) with the span axis a reduction; the block table, span starts,
lengths, positions and deltas are scalar-prefetched and drive which page each grid step reads,
so a page is read once per (kv head, query tile) straight from the store and never copied into a
stitched buffer; running max, denominator and accumulator stay in f32 scratch (flash attention).
Rows outside a span are zeroed before use, so NaN or garbage there cannot leak through a zero
probability. `paged_attention_gpu` is the GPU kernel (Pallas' Triton backend, which has no scalar
prefetch and no scratch): grid (batch, kv head, query tile); each program reads its request's span
table from refs and loops over the spans itself, carrying the online-softmax state in registers,
and reads each span's page from the store by a dynamic index. Triton wants every tile a power of
two in size and has no in-register concatenation, so each key and query is read as its two RoPE
halves (the rotation is then two multiply-adds, the score two dots of H/2); the span table is
padded to a power of two with empty spans.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gather_rerotate import rotate_by
from pallas_kernels.masked_attention import masked_attention

_NEG = -1e30


def paged_attention_reference(q, k_pages, v_pages, q_pos, table, span_start, span_len, span_pos, span_delta, inv,
                              window: int | None = None):
    """Pure JAX: gather every span's page, re-rotate its keys by delta, dense masked softmax."""
    b, h = q.shape[0], q.shape[3]
    page, kh = k_pages.shape[1], k_pages.shape[2]
    m = table.shape[1]
    rows = jnp.arange(page)[None, None, :]  # [1, 1, page]
    valid = (rows >= span_start[..., None]) & (rows < (span_start + span_len)[..., None])  # [B, M, page]
    k_pos = span_pos[..., None] + rows - span_start[..., None]  # [B, M, page]
    kg = k_pages[table].astype(jnp.float32)  # [B, M, page, K, H]
    vg = v_pages[table].astype(jnp.float32)
    ang = span_delta.astype(jnp.float32)[..., None, None, None] * jnp.asarray(inv, jnp.float32)  # [B, M, 1, 1, H/2]
    kg = rotate_by(kg, ang)
    kg, vg = kg.reshape(b, m * page, kh, h), vg.reshape(b, m * page, kh, h)
    o, lse = masked_attention(q, kg, vg, valid.reshape(b, m * page), k_pos.reshape(b, m * page), q_pos, window)
    return o.astype(q.dtype), lse


def merge_attention(o1, lse1, o2, lse2):
    """Softmax attention over the union of two disjoint key sets from each one's output [..., H]
    and log-sum-exp [...] (-inf: no key seen; the merge then is the other one)."""
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)  # 0 where a side saw nothing
    den = w1 + w2
    out = (o1.astype(jnp.float32) * w1[..., None] + o2.astype(jnp.float32) * w2[..., None]) / jnp.where(
        den > 0, den, 1.0)[..., None]
    return out.astype(o1.dtype), jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)


def _kernel(table_ref, start_ref, len_ref, pos_ref, delta_ref,  # scalar prefetch [B, M]
            inv_ref, qpos_ref, q_ref, k_ref, v_ref,  # inv [1, H/2]; qpos [bq, 1]; q [bq, H]; k, v [page, H]
            o_ref, lse_ref,  # [bq, H], [bq, 1]
            m_sc, l_sc, acc_sc, *, scale: float, window: int | None, head_lanes: int | None):
    b, span = pl.program_id(0), pl.program_id(3)
    if head_lanes is not None:  # k, v blocks hold every KV head's lanes [page, K * H]: take this head's
        cols = pl.ds(pl.multiple_of(pl.program_id(1) * head_lanes, head_lanes), head_lanes)
        k_ref, v_ref = k_ref.at[:, cols], v_ref.at[:, cols]

    @pl.when(span == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    n = len_ref[b, span]

    @pl.when(n > 0)
    def _step():
        start, pos0 = start_ref[b, span], pos_ref[b, span]
        q = q_ref[...].astype(jnp.float32)
        # the query turned back by the span's delta instead of its keys turned forward
        q = rotate_by(q, -delta_ref[b, span].astype(jnp.float32) * inv_ref[...]) * scale
        page = k_ref.shape[0]
        rows = jax.lax.broadcasted_iota(jnp.int32, (1, page), 1)
        valid = (rows >= start) & (rows < start + n)  # [1, page]
        kp = pos0 + rows - start
        mask = valid & (kp <= qpos_ref[...])  # [bq, page]
        if window is not None:
            mask &= (qpos_ref[...] - kp) < window
        col = valid.reshape(page, 1)
        k = jnp.where(col, k_ref[...].astype(jnp.float32), 0.0)
        v = jnp.where(col, v_ref[...].astype(jnp.float32), 0.0)
        s = jnp.where(mask, jax.lax.dot_general(q, k, (((1,), (1,)), ((), ()))), _NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + jnp.dot(p, v)
        m_sc[...] = m_new

    @pl.when(span == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0
        o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("window", "block_q", "interpret"))
def paged_attention(q, k_pages, v_pages, q_pos, table, span_start, span_len, span_pos, span_delta, inv, *,
                    window: int | None = None, block_q: int = 64, interpret: bool = False):
    """Pallas kernel; same contract as `paged_attention_reference`. Query rows are padded to the
    tile here (padding queries are dropped)."""
    b, t, n, h = q.shape
    page, kh = k_pages.shape[1], k_pages.shape[2]
    g = n // kh
    m = table.shape[1]
    rows = t * g
    bq = min(block_q, max(8, pl.next_power_of_2(rows)))
    rows_p = pl.cdiv(rows, bq) * bq
    # [B, T, K, G, H] -> [B, K, T*G, H]: a query tile holds the G heads of some queries
    qh = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    qp = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)
    qp = jnp.pad(qp, ((0, 0), (0, rows_p - rows)), constant_values=-1)[..., None]  # [B, R, 1]: pads see nothing
    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    # Mosaic tiles a block's last two dims (8, 128): pages are viewed as [P, page, K * H] (a free
    # reshape) and a grid step reads its KV head's H lanes (H a multiple of 128), or every head's
    # lanes when H is smaller (the kernel slices its head out)
    per_head = h % 128 == 0
    kp, vp = (a.reshape(a.shape[0], page, kh * h) for a in (k_pages, v_pages))
    lanes = h if per_head else kh * h
    page_spec = pl.BlockSpec((None, page, lanes), lambda i, j, r, s, tbl, *_: (tbl[i, s], 0, j if per_head else 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(b, kh, rows_p // bq, m),
        in_specs=[
            pl.BlockSpec((1, h // 2), lambda i, j, r, s, *_: (0, 0)),
            pl.BlockSpec((None, bq, 1), lambda i, j, r, s, *_: (i, r, 0)),
            pl.BlockSpec((None, None, bq, h), lambda i, j, r, s, *_: (i, j, r, 0)),
            page_spec, page_spec,
        ],
        out_specs=[pl.BlockSpec((None, None, bq, h), lambda i, j, r, s, *_: (i, j, r, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda i, j, r, s, *_: (i, j, r, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, scale=h ** -0.5, window=window, head_lanes=None if per_head else h),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
                   jax.ShapeDtypeStruct((b, kh, rows_p, 1), jnp.float32)],
        interpret=interpret,
    )(i32(table), i32(span_start), i32(span_len), i32(span_pos), i32(span_delta),
      jnp.asarray(inv, jnp.float32).reshape(1, h // 2), qp, qh, kp, vp)
    out = out[:, :, :rows].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    lse = lse[:, :, :rows, 0].reshape(b, kh, t, g).transpose(0, 2, 1, 3).reshape(b, t, n)
    return out, lse


def _gpu_kernel(tbl_ref, start_ref, len_ref, pos_ref, delta_ref,  # [M] (one request's span table)
                inv_ref, qpos_ref, q_ref, k_ref, v_ref,  # inv [H/2]; qpos [bq]; q [bq, H]; k, v [P, page, H]
                o_ref, lse_ref,  # [bq, H], [bq]
                *, scale: float, window: int | None):
    bq, h = q_ref.shape
    half, page = h // 2, k_ref.shape[1]
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    q1, q2 = q_ref[:, lo].astype(jnp.float32), q_ref[:, hi].astype(jnp.float32)  # [bq, H/2] each
    inv = inv_ref[...]
    qpos = qpos_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (page,), 0)

    def span(s, carry):
        def attend(carry):
            m_prev, l_prev, acc1, acc2 = carry
            pid, start, n = tbl_ref[s], start_ref[s], len_ref[s]
            ang = -delta_ref[s].astype(jnp.float32) * inv  # the query turned back by the span's delta
            c, sn = jnp.cos(ang)[None, :], jnp.sin(ang)[None, :]
            r1, r2 = (q1 * c - q2 * sn) * scale, (q2 * c + q1 * sn) * scale
            valid = (rows >= start) & (rows < start + n)  # [page]
            kp = pos_ref[s] + rows - start
            mask = valid[None, :] & (kp[None, :] <= qpos[:, None])  # [bq, page]
            if window is not None:
                mask &= (qpos[:, None] - kp[None, :]) < window
            col = valid[:, None]
            part = lambda ref, hs: jnp.where(col, ref[pid, :, hs].astype(jnp.float32), 0.0)  # noqa: E731
            k1, k2 = part(k_ref, lo), part(k_ref, hi)
            sc = jnp.dot(r1, k1.T) + jnp.dot(r2, k2.T)
            sc = jnp.where(mask, sc, _NEG)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
            p = jnp.where(mask, jnp.exp(sc - m_new[:, None]), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            v1, v2 = part(v_ref, lo), part(v_ref, hi)
            return (m_new, l_prev * alpha + jnp.sum(p, axis=1),
                    acc1 * alpha[:, None] + jnp.dot(p, v1), acc2 * alpha[:, None] + jnp.dot(p, v2))
        return jax.lax.cond(len_ref[s] > 0, attend, lambda c: c, carry)

    init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, half), jnp.float32), jnp.zeros((bq, half), jnp.float32))
    m_i, l_i, acc1, acc2 = jax.lax.fori_loop(0, tbl_ref.shape[0], span, init)
    seen = l_i > 0
    den = jnp.where(seen, l_i, 1.0)[:, None]
    o_ref[:, lo] = (acc1 / den).astype(o_ref.dtype)
    o_ref[:, hi] = (acc2 / den).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_i + jnp.log(jnp.where(seen, l_i, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("window", "block_q", "interpret"))
def paged_attention_gpu(q, k_pages, v_pages, q_pos, table, span_start, span_len, span_pos, span_delta, inv, *,
                        window: int | None = None, block_q: int = 64, interpret: bool = False):
    """Pallas GPU (Triton) kernel; same contract as `paged_attention_reference`. Needs a page of at
    least 16 rows and a head dim of at least 32, both powers of two (Triton's dot tiles)."""
    b, t, n, h = q.shape
    page, kh = k_pages.shape[1], k_pages.shape[2]
    if page < 16 or page & (page - 1) or h < 32 or h & (h - 1):
        raise ValueError(f"the GPU paged kernel needs pages of 16, 32, ... rows and a head dim of 32, 64, ... "
                         f"(got page {page}, head dim {h})")
    g = n // kh
    rows = t * g
    bq = max(16, min(pl.next_power_of_2(block_q), pl.next_power_of_2(rows)))  # Triton's dot: >= 16 rows
    rows_p = pl.cdiv(rows, bq) * bq
    qh = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    qp = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)
    qp = jnp.pad(qp, ((0, 0), (0, rows_p - rows)), constant_values=-1)  # [B, R]: pads see nothing
    m = table.shape[1]
    m_p = pl.next_power_of_2(m)
    spans = [jnp.pad(a.astype(jnp.int32), ((0, 0), (0, m_p - m))) for a in
             (table, span_start, span_len, span_pos, span_delta)]  # padding spans are empty (length 0)
    span_spec = pl.BlockSpec((None, m_p), lambda i, j, r: (i, 0))
    page_spec = pl.BlockSpec((k_pages.shape[0], page, None, h), lambda i, j, r: (0, 0, j, 0))
    out, lse = pl.pallas_call(
        functools.partial(_gpu_kernel, scale=h ** -0.5, window=window),
        grid=(b, kh, rows_p // bq),
        in_specs=[span_spec] * 5 + [
            pl.BlockSpec((h // 2,), lambda i, j, r: (0,)),
            pl.BlockSpec((None, bq), lambda i, j, r: (i, r)),
            pl.BlockSpec((None, None, bq, h), lambda i, j, r: (i, j, r, 0)),
            page_spec, page_spec],
        out_specs=[pl.BlockSpec((None, None, bq, h), lambda i, j, r: (i, j, r, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, j, r: (i, j, r))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
                   jax.ShapeDtypeStruct((b, kh, rows_p), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(*spans, jnp.asarray(inv, jnp.float32).reshape(h // 2), qp, qh, k_pages, v_pages)
    out = out[:, :, :rows].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    lse = lse[:, :, :rows].reshape(b, kh, t, g).transpose(0, 2, 1, 3).reshape(b, t, n)
    return out, lse
