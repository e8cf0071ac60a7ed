"""The paged attention kernel (interpret mode on CPU) against its pure-JAX reference, and the
reference against an independent definition: the spans gathered into a stitched buffer, keys
re-rotated by `rope.rerotate`, the decoder's dense attention. Seeded random page stores whose
unused pages and rows outside every span hold NaN; spans unaligned to pages; GQA 1, 3, 7; head
dims 64 and 128; f32 and bf16. Each kernel test runs the TPU (Mosaic) and the GPU (Triton)
variant (`kernel_variants`: interpreted here, compiled by launch/device_check.py on a device)."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_variants import run, variants
from pallas_kernels.paged_attention import (merge_attention, paged_attention, paged_attention_gpu,
                                            paged_attention_reference)
from rcllm_jax.model import ModelConfig
from rcllm_jax.model.decoder import SEG_SHARED, attend, attention_mask
from rcllm_jax.model.rope import inv_freq, rerotate

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
PAGE = 16
KERNELS = variants(tpu=paged_attention, gpu=paged_attention_gpu)


def _cfg(kh, g, h, window=None):
    return ModelConfig(arch="mistral" if window else "llama", vocab_size=8, hidden_size=kh * g * h,
                       intermediate_size=8, num_layers=1, num_heads=kh * g, num_kv_heads=kh, head_dim=h,
                       rope_theta=10000.0, sliding_window=window)


def _case(seed, b, t, m, kh, g, h, dtype, num_pages=23):
    """A page store, and per request m spans (one of them unused: length 0 on a NaN page)."""
    rng = np.random.default_rng(seed)
    k, v = rng.normal(size=(2, num_pages, PAGE, kh, h))
    poisoned = np.ones((num_pages, PAGE), bool)  # rows no span covers: NaN
    table = np.zeros((b, m), np.int32)
    start, length, pos, delta = (np.zeros((b, m), np.int32) for _ in range(4))
    for i in range(b):
        pages = rng.choice(num_pages - 1, size=m, replace=False) + 1  # page 0 is never used: NaN throughout
        at = 0
        for j in range(m):
            s0 = int(rng.integers(0, PAGE))
            n = int(rng.integers(1, PAGE - s0 + 1))
            if j == m // 2:  # an unused entry: it points at a NaN page and covers nothing
                table[i, j], n = 0, 0
            else:
                table[i, j] = pages[j]
                poisoned[pages[j], s0:s0 + n] = False
            start[i, j], length[i, j], pos[i, j] = s0, n, at
            delta[i, j] = 0 if j == 0 else int(rng.integers(-40, 3000))  # span 0 stored at its real positions
            at += n + int(rng.integers(0, 3))
    k[poisoned], v[poisoned] = np.nan, np.nan
    q = rng.normal(size=(b, t, kh * g, h))
    q_pos = rng.integers(-2, at + 3, size=(b, t))
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    return (cast(q), cast(k), cast(v), i32(q_pos), i32(table), i32(start), i32(length), i32(pos), i32(delta))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-9))


def _stitched(k, v, table, start, length, pos, delta, cfg):
    """Independent: the spans copied into one buffer per request (numpy), keys re-rotated from
    their stored to their real positions with the engine's `rerotate`."""
    ks, vs, kp = [], [], []
    for i in range(table.shape[0]):
        rk, rv, rp, rs = [], [], [], []
        for j in range(table.shape[1]):
            n = int(length[i, j])
            if not n:
                continue
            sl = slice(int(start[i, j]), int(start[i, j]) + n)
            rk.append(np.asarray(k[int(table[i, j]), sl], np.float32))
            rv.append(np.asarray(v[int(table[i, j]), sl], np.float32))
            real = int(pos[i, j]) + np.arange(n)
            rp.append(real)
            rs.append(real - int(delta[i, j]))
        kk = jnp.asarray(np.concatenate(rk))[None]  # [1, S, K, H]
        kk = rerotate(kk, jnp.asarray(np.concatenate(rs))[None], jnp.asarray(np.concatenate(rp))[None], inv_freq(cfg))
        ks.append(np.asarray(kk[0]))
        vs.append(np.concatenate(rv))
        kp.append(np.concatenate(rp))
    s = max(len(x) for x in kp)
    pad = lambda a: np.concatenate([a, np.zeros((s - len(a),) + a.shape[1:], a.dtype)])  # noqa: E731
    valid = np.stack([np.arange(s) < len(x) for x in kp])
    return (jnp.asarray(np.stack([pad(x) for x in ks])), jnp.asarray(np.stack([pad(x) for x in vs])),
            jnp.asarray(np.stack([pad(x) for x in kp]), jnp.int32), jnp.asarray(valid))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("g", [1, 3, 7])
@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_attention_matches_reference_and_stitched_dense(kernel, g, h, dtype):
    seed = 31 * g + h
    b, t, m, kh = 2, 1 + seed % 7, 5, 2
    q, k, v, q_pos, table, start, length, pos, delta = _case(seed, b, t, m, kh, g, h, dtype)
    cfg = _cfg(kh, g, h)
    inv = inv_freq(cfg)
    ref, ref_lse = paged_attention_reference(q, k, v, q_pos, table, start, length, pos, delta, inv)
    got, lse = run(kernel, q, k, v, q_pos, table, start, length, pos, delta, inv, block_q=8)
    assert got.shape == q.shape and got.dtype == q.dtype and lse.shape == q.shape[:3]
    assert not np.isnan(np.asarray(got, np.float32)).any()
    assert _rel(got, ref) <= TOL[dtype]
    seen = np.isfinite(np.asarray(ref_lse))
    assert np.array_equal(np.isfinite(np.asarray(lse)), seen)
    assert np.max(np.abs(np.asarray(lse)[seen] - np.asarray(ref_lse)[seen])) <= 10 * TOL[dtype]
    # independent: the stitched buffer and the decoder's dense attention under its own mask
    sk, sv, kp, valid = _stitched(k, v, table, start, length, pos, delta, cfg)
    mask = attention_mask(q_pos, jnp.full(q_pos.shape, SEG_SHARED), kp, jnp.full(kp.shape, SEG_SHARED), valid)
    dense = np.asarray(attend(cfg, q.astype(jnp.float32), sk, sv, mask).reshape(q.shape))
    rows = np.asarray(mask.any(-1))
    assert np.array_equal(rows[..., None].repeat(q.shape[2], -1), seen)
    assert _rel(np.asarray(ref, np.float32)[rows], dense[rows]) <= TOL[dtype]
    assert _rel(np.asarray(got, np.float32)[rows], dense[rows]) <= TOL[dtype]
    assert np.all(np.asarray(got, np.float32)[~rows] == 0)  # a query that sees no key gets 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_merge_of_two_span_sets_is_attention_over_both(kernel):
    """Attention over spans A and, separately, spans B, merged by log-sum-exp, equals attention
    over A and B at once (what a caller does with cached pages + fresh rows)."""
    q, k, v, q_pos, table, start, length, pos, delta = _case(3, 2, 6, 6, 1, 3, 64, jnp.float32)
    inv = inv_freq(_cfg(1, 3, 64))
    part = lambda sl: run(kernel, q, k, v, q_pos, table[:, sl], start[:, sl], length[:, sl], pos[:, sl],  # noqa: E731
                          delta[:, sl], inv, block_q=16)
    whole, whole_lse = part(slice(None))
    (a, la), (b_, lb) = part(slice(0, 2)), part(slice(2, None))
    merged, lse = merge_attention(a, la, b_, lb)
    assert _rel(merged, whole) <= 2e-5
    seen = np.isfinite(np.asarray(whole_lse))
    assert np.allclose(np.asarray(lse)[seen], np.asarray(whole_lse)[seen], atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_query_tiles_do_not_matter(kernel):
    q, k, v, q_pos, table, start, length, pos, delta = _case(11, 1, 13, 4, 2, 2, 64, jnp.float32)
    inv = inv_freq(_cfg(2, 2, 64))
    outs = [run(kernel, q, k, v, q_pos, table, start, length, pos, delta, inv, block_q=bq)[0]
            for bq in (8, 16, 64)]
    for o in outs[1:]:
        assert _rel(o, outs[0]) <= 1e-6


@pytest.mark.parametrize("window", [4, 19])
@pytest.mark.parametrize("kernel", KERNELS)
def test_sliding_window_matches_stitched_dense(kernel, window):
    q, k, v, q_pos, table, start, length, pos, delta = _case(window, 2, 9, 5, 2, 2, 64, jnp.float32)
    cfg = _cfg(2, 2, 64, window)
    inv = inv_freq(cfg)
    got, _ = run(kernel, q, k, v, q_pos, table, start, length, pos, delta, inv, window=window, block_q=8)
    ref, _ = paged_attention_reference(q, k, v, q_pos, table, start, length, pos, delta, inv, window=window)
    assert _rel(got, ref) <= 2e-5
    sk, sv, kp, valid = _stitched(k, v, table, start, length, pos, delta, cfg)
    mask = attention_mask(q_pos, jnp.full(q_pos.shape, SEG_SHARED), kp, jnp.full(kp.shape, SEG_SHARED), valid, window)
    dense = np.asarray(attend(cfg, q, sk, sv, mask).reshape(q.shape))
    rows = np.asarray(mask.any(-1))
    assert _rel(np.asarray(got)[rows], dense[rows]) <= 2e-5
    unwindowed, _ = paged_attention_reference(q, k, v, q_pos, table, start, length, pos, delta, inv)
    assert not np.allclose(np.asarray(got), np.asarray(unwindowed))
