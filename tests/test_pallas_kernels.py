"""Pallas kernels in interpret mode on CPU against their pure-JAX references and against the
decoder's dense attention: seeded random shapes (odd and ragged lengths), GQA ratios 1, 3, 7,
head dims 64 and 128, f32 and bf16, padding poisoned with NaN. The gather runs in its TPU (Mosaic)
and GPU (Triton) variants (`kernel_variants`: interpreted here, compiled by
launch/device_check.py on a device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_variants import run, variants
from pallas_kernels.gather_rerotate import gather_rerotate, gather_rerotate_gpu
from rcllm_jax.model import ModelConfig
from rcllm_jax.model.decoder import SEG_SHARED, attend, attention_mask
from pallas_kernels.masked_attention import masked_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
GATHERS = variants(tpu=gather_rerotate, gpu=gather_rerotate_gpu)


def _case(seed, b, t, s, kh, g, h, dtype):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, kh * g, h))
    k, v = rng.normal(size=(2, b, s, kh, h))
    kv_len = rng.integers(max(1, s // 3), s + 1, size=b)
    kv_len[0] = s  # one full row
    k_pos = np.stack([rng.permutation(s) for _ in range(b)])  # stitched: not sorted by position
    q_pos = rng.integers(0, s + 3, size=(b, t))
    for i, n in enumerate(kv_len):  # padding rows hold NaN: must never be read as data
        k[i, n:], v[i, n:] = np.nan, np.nan
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32), \
        jnp.asarray(kv_len, jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-9))


def _masked(q, k, v, q_pos, k_pos, kv_len, window=None):
    valid = jnp.arange(k.shape[1])[None] < kv_len[:, None]
    return masked_attention(q, k, v, valid, k_pos, q_pos, window)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("g", [1, 3, 7])
def test_masked_attention_matches_the_decoders_dense_attention(g, h, dtype):
    """The shared reference (stitched, unsorted positions, ragged lengths, NaN padding) against
    the decoder's dense attention under its own attention_mask; a query that sees no key gets 0
    and a log-sum-exp of -inf; the log-sum-exp is the dense scores' own."""
    seed = g * 1000 + h
    b, t, s, kh = 3, 1 + (seed % 9), 37 + (seed % 29), 2
    q, k, v, q_pos, k_pos, kv_len = _case(seed, b, t, s, kh, g, h, dtype)
    got, lse = _masked(q, k, v, q_pos, k_pos, kv_len)
    assert got.shape == q.shape and not np.isnan(np.asarray(got)).any()
    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=kh * g * h, intermediate_size=8, num_layers=1,
                      num_heads=kh * g, num_kv_heads=kh, head_dim=h)
    valid = jnp.arange(s)[None] < kv_len[:, None]
    seg_q, seg_k = jnp.full(q_pos.shape, SEG_SHARED), jnp.full(k_pos.shape, SEG_SHARED)
    mask = attention_mask(q_pos, seg_q, k_pos, seg_k, valid)
    z = lambda a: jnp.where(valid[:, :, None, None], a.astype(jnp.float32), 0.0)  # noqa: E731
    dense = attend(cfg, q.astype(jnp.float32), z(k), z(v), mask).reshape(q.shape)
    seen = np.asarray(mask.any(-1))  # queries with no visible key: dense averages, the reference gives 0
    assert _rel(np.asarray(got)[seen], np.asarray(dense)[seen]) <= TOL[dtype]
    assert np.all(np.asarray(got)[~seen] == 0) and np.all(np.isneginf(np.asarray(lse)[~seen]))
    qf, kf = np.asarray(q, np.float64), np.nan_to_num(np.asarray(k, np.float64))
    scores = np.einsum("btkgh,bskh->btkgs", qf.reshape(b, t, kh, g, h), kf) / np.sqrt(h)
    m = np.asarray(mask)[:, :, None, None, :]
    want = np.log(np.sum(np.where(m, np.exp(np.where(m, scores, 0)), 0), -1)).reshape(b, t, kh * g)
    assert np.allclose(np.asarray(lse)[seen], want[seen], atol=1e-3 if dtype == jnp.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("kernel", GATHERS)
def test_gather_rerotate_matches_rerotation(kernel, h, dtype):
    from pallas_kernels.gather_rerotate import gather_rerotate_reference
    from rcllm_jax.model.rope import inv_freq, rerotate
    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=2 * h, intermediate_size=8, num_layers=3,
                      num_heads=2, num_kv_heads=2, head_dim=h, rope_theta=50000.0)
    inv = inv_freq(cfg)
    rng = np.random.default_rng(h)
    pool = jnp.asarray(rng.normal(size=(3, 61, 2, h)), dtype)
    t = 13  # odd
    slots = jnp.asarray(rng.integers(0, 61, t), jnp.int32)
    canon = jnp.asarray(rng.integers(0, 40, t), jnp.int32)
    real = canon + jnp.asarray(rng.integers(0, 3000, t), jnp.int32)
    want = rerotate(pool[:, slots].astype(jnp.float32), canon[None], real[None], inv)
    got = run(kernel, pool, slots, real - canon, inv)
    assert got.dtype == dtype and got.shape == (3, t, 2, h)
    assert _rel(got, want) <= TOL[dtype]
    assert _rel(gather_rerotate_reference(pool, slots, real - canon, inv), want) <= TOL[dtype]


def test_dispatch():
    from rcllm_jax.kernels import VERIFIED_BACKENDS, resolve, variant_of
    # auto stays on XLA on every backend where no kernel has been compiled and verified yet
    assert not VERIFIED_BACKENDS
    assert resolve("auto", "cpu") == "xla" and resolve("auto", "gpu") == "xla" and resolve("auto", "tpu") == "xla"
    assert resolve("pallas", "cpu") == "interpret" and resolve("xla", "gpu") == "xla"
    assert resolve("pallas", "cpu", variant="gpu") == "interpret:gpu" and resolve("pallas", "gpu") == "pallas"
    # compiled: the backend's own variant; interpreted: the one asked for
    assert variant_of("pallas", "gpu") == ("gpu", False) and variant_of("pallas", "tpu") == ("tpu", False)
    assert variant_of("interpret") == ("tpu", True) and variant_of("interpret:gpu") == ("gpu", True)
    assert variant_of("xla", "gpu") is None
    with pytest.raises(ValueError, match="attention_impl"):
        resolve("triton")
    with pytest.raises(ValueError, match="variant"):
        resolve("pallas", "cpu", variant="rocm")


LOWERED = {"gpu": ("cuda", "triton"), "tpu": ("tpu", "tpu_custom_call")}  # platform, what its kernel lowers to


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
@pytest.mark.parametrize("shape", ["smollm2", "llama3_8b"])
def test_every_kernel_variant_lowers_for_its_platform(variant, shape):
    """Both kernels of each variant lower on this CPU for their platform: the GPU ones to Triton
    IR (Pallas' Triton backend; its checks: no scalar prefetch or scratch, power-of-two tiles),
    the TPU ones to Mosaic (Pallas' TPU block rules: a block's last two dims divisible by (8, 128)
    or whole). At the default model's attention shape (9 query / 3 KV heads, head dim 64) and
    Llama-3-8B's (32 / 8, 128), bf16 pages of 16 rows, with and without a window. What a device
    call can still find is the compiler's or the numbers', not a lowering that does not exist."""
    from pallas_kernels.gather_rerotate import gather_rerotate_gpu
    from pallas_kernels.paged_attention import paged_attention, paged_attention_gpu
    n, kh, h = {"smollm2": (9, 3, 64), "llama3_8b": (32, 8, 128)}[shape]
    platform, marker = LOWERED[variant]
    paged = paged_attention if variant == "tpu" else paged_attention_gpu
    gather = gather_rerotate if variant == "tpu" else gather_rerotate_gpu
    i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
    bf = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    inv = jnp.zeros((h // 2,), jnp.float32)
    for window in (None, 4096):
        low = paged.trace(bf(2, 5, n, h), bf(12, 16, kh, h), bf(12, 16, kh, h), i32(2, 5), i32(2, 7), i32(2, 7),
                          i32(2, 7), i32(2, 7), i32(2, 7), inv, window=window).lower(lowering_platforms=(platform,))
        assert marker in low.as_text()
    low = gather.trace(bf(4, 40, kh, h), i32(13), i32(13), inv).lower(lowering_platforms=(platform,))
    assert marker in low.as_text()


def test_engine_block_modes_through_kernels(smollm2, monkeypatch):
    """The engine's block modes give the same scores through the kernels (interpret) as through XLA,
    in both variants; the GPU one reads the block store's 8-row pages as 16-row ones (counted at
    trace time: the store read in place and the gather both reach the GPU kernels)."""
    from rcllm_jax import kernels
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.selective_recompute import Policy
    from rcllm_jax.model import init_params
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=128, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32, max_position=4096)  # the GPU kernels: head dim >= 32
    split = LeaveOneOut(load_dataset("ml-100k"))
    params = init_params(cfg, jax.random.key(0), scale=0.1)
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=3)
    reqs = list(eval_requests(split, num_users=2, num_candidates=5, seed=3))
    items = sorted({i for r in reqs for i in r.candidates})
    engines = [Engine(params, cfg, builder, item_ids=items, user_pages=64, prefix_pages=8, attention_impl=impl)
               for impl in ("xla", "pallas")]
    assert engines[1].impl == "interpret"
    for e in engines:
        e.build_store()
    pages = []
    real_paged, real_gather = kernels.paged_kernel_gpu, kernels.gather_kernel_gpu
    monkeypatch.setattr(kernels, "paged_kernel_gpu",
                        lambda *a, **kw: pages.append(a[1].shape[1]) or real_paged(*a, **kw))
    monkeypatch.setattr(kernels, "gather_kernel_gpu",
                        lambda *a, **kw: pages.append("gather") or real_gather(*a, **kw))
    jax.clear_caches()
    for impl in ("interpret", "interpret:gpu"):  # the TPU and the GPU kernels, interpreted
        engines[1].impl = impl
        for policy in (Policy(), Policy(sink=2, ratio=0.3, check_layer=1)):
            for r in reqs:
                p = builder.build(r.history, r.candidates)
                a, b = (e.rank(p, policy, r.user_id).scores for e in engines)
                assert _rel(b, a) <= 1e-5, impl
    assert pages and set(pages) == {16, "gather"}


@pytest.mark.parametrize("window", [5, 17])
def test_masked_attention_sliding_window_matches_dense(window):
    """Mistral's sliding window: the decoder's attention_mask with the same window is the
    independent definition."""
    q, k, v, q_pos, k_pos, kv_len = _case(window, 2, 9, 50, 2, 2, 64, jnp.float32)
    got = _masked(q, k, v, q_pos, k_pos, kv_len, window)[0]
    cfg = ModelConfig(arch="mistral", vocab_size=8, hidden_size=4 * 64, intermediate_size=8, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=64, sliding_window=window)
    valid = jnp.arange(50)[None] < kv_len[:, None]
    seg_q, seg_k = jnp.full(q_pos.shape, SEG_SHARED), jnp.full(k_pos.shape, SEG_SHARED)
    mask = attention_mask(q_pos, seg_q, k_pos, seg_k, valid, window)
    z = lambda a: jnp.where(valid[:, :, None, None], a, 0.0)  # noqa: E731
    dense = attend(cfg, q, z(k), z(v), mask).reshape(q.shape)
    seen = np.asarray(mask.any(-1))
    assert _rel(np.asarray(got)[seen], np.asarray(dense)[seen]) <= 2e-5
    assert not np.allclose(np.asarray(got), np.asarray(_masked(q, k, v, q_pos, k_pos, kv_len)[0]))


def test_bf16_rerotation_rounds_once():
    """The re-rotation of bf16 keys is computed in f32 and rounded to bf16 once (cos/sin are not
    rounded to bf16 first): the reference equals that definition bit for bit, and so does the
    Pallas kernel."""
    from pallas_kernels.gather_rerotate import gather_rerotate, gather_rerotate_reference
    from rcllm_jax.model.rope import inv_freq, rerotate
    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=128, intermediate_size=8, num_layers=2,
                      num_heads=2, num_kv_heads=2, head_dim=64)
    inv = inv_freq(cfg)
    rng = np.random.default_rng(5)
    pool = jnp.asarray(rng.normal(size=(2, 40, 2, 64)), jnp.bfloat16)
    slots = jnp.asarray(rng.integers(0, 40, size=23), jnp.int32)
    delta = jnp.asarray(rng.integers(200, 3000, size=23), jnp.int32)  # large angles: rounding shows
    want = rerotate(pool[:, slots].astype(jnp.float32), jnp.zeros((2, 23), jnp.int32),
                    jnp.broadcast_to(delta[None], (2, 23)), inv).astype(jnp.bfloat16)
    ref = gather_rerotate_reference(pool, slots, delta, inv)
    assert ref.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(ref, np.float32), np.asarray(want, np.float32))
    got = run(gather_rerotate, pool, slots, delta, inv)
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("kernel", GATHERS)
def test_bf16_rerotation_is_within_half_an_ulp(kernel):
    """Each variant's bf16 output is the exact rotation (float64, numpy) rounded once: within half a
    bf16 ulp of it (f32 arithmetic adds ~1e-7 relative; rounding twice, e.g. through bf16 cos/sin,
    would miss by up to a whole ulp). The GPU variant's compiler may contract multiply-adds
    differently from XLA's, so it is held to this, not to the reference's bits."""
    rng = np.random.default_rng(9)
    h = 64
    pool = jnp.asarray(rng.normal(size=(2, 40, 3, h)), jnp.bfloat16)
    slots = jnp.asarray(rng.integers(0, 40, size=29), jnp.int32)
    delta = jnp.asarray(rng.integers(200, 3000, size=29), jnp.int32)
    inv = 10000.0 ** (-np.arange(0, h, 2) / h)
    got = np.asarray(run(kernel, pool, slots, delta, jnp.asarray(inv, jnp.float32)), np.float64)
    x = np.asarray(pool, np.float64)[:, np.asarray(slots)]  # [L, T, K, H]
    # the angle as both define it: delta * inv rounded to f32 (at |angle| ~ 3000 its rounding moves a
    # value by ~1e-4 of |x|); cos, sin and the rotation exact from there
    ang = (np.asarray(delta, np.float32)[:, None] * np.asarray(inv, np.float32)[None, :]).astype(np.float64)
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    exact = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    scale = np.concatenate([np.abs(x1) + np.abs(x2)] * 2, axis=-1)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)  # bf16: 8 significant bits
    assert np.all(np.abs(got - exact) <= 0.5 * ulp + 1e-6 * scale)


def test_engine_impl_switch_reaches_the_block_store_gather(smollm2, monkeypatch):
    """Switching `engine.impl` (what bench.py --compare_impl does) reads the cached rows in place
    when stitching (the paged kernel: nothing gathered) and runs the Pallas gather + re-rotation
    where a deviation check needs them fetched, counted at trace time; the same scores."""
    from rcllm_jax import kernels
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import init_params
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position=4096)
    split = LeaveOneOut(load_dataset("ml-100k"))
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=3)
    r = next(iter(eval_requests(split, num_users=1, num_candidates=4, seed=5)))
    eng = Engine(init_params(cfg, jax.random.key(0), scale=0.1), cfg, builder, item_ids=r.candidates,
                 user_pages=32, prefix_pages=1, max_candidates=4)
    eng.build_store()
    calls = []
    real = kernels.gather_kernel
    monkeypatch.setattr(kernels, "gather_kernel", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    p = builder.build(r.history, r.candidates)
    xla = {mode: eng.rank(p, mode, r.user_id).scores for mode in ("stitch", "deviation")}
    assert calls == []
    eng.impl = kernels.resolve("pallas")
    jax.clear_caches()  # counted at trace time: an earlier test may have traced these shapes already
    for mode, gathered in (("stitch", []), ("deviation", [{"interpret": True}])):
        pallas = eng.rank(p, mode, r.user_id).scores
        assert calls == gathered, mode
        assert _rel(pallas, xla[mode]) <= 1e-5
