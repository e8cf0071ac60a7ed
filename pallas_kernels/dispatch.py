"""Backend dispatch for the kernels: `--attention_impl=auto|pallas|xla`.

auto: the Pallas kernels where they compile (GPU: Triton lowering; TPU: Mosaic), the XLA
reference on CPU. pallas: the kernels everywhere (on CPU in interpret mode: slow, for tests).
xla: the pure-JAX references everywhere. The gather + re-rotation kernel uses scalar-prefetched
block indices (a Mosaic TPU feature); on GPU it runs as XLA, which fuses the gather and the
rotation into one pass anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gather_rerotate import gather_rerotate as _gather_kernel
from pallas_kernels.gather_rerotate import gather_rerotate_reference
from pallas_kernels.selective_attention import selective_attention as _attn_kernel
from pallas_kernels.selective_attention import selective_attention_reference

IMPLS = ("auto", "pallas", "xla")


def resolve(impl: str, platform: str | None = None) -> str:
    """-> "xla", "pallas" (compiled) or "interpret" (Pallas interpreter, CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    platform = platform or jax.default_backend()
    if impl == "xla" or (impl == "auto" and platform == "cpu"):
        return "xla"
    return "interpret" if platform == "cpu" else "pallas"


def selective_attention(q, k, v, q_pos, k_pos, k_valid, *, impl: str):
    """q [B, T, N, H] over k, v [B, S, K, H] (causal by position, k_valid [B, S]) -> [B, T, N*H].
    impl: a resolved implementation."""
    b, t, n, h = q.shape
    kv_len = jnp.full((b,), k.shape[1], jnp.int32)
    if impl == "xla":
        out = selective_attention_reference(q, k, v, q_pos, k_pos, kv_len, k_valid)
    else:
        out = _attn_kernel(q, k, v, q_pos, k_pos, kv_len, k_valid, interpret=impl == "interpret")
    return out.reshape(b, t, n * h)


def gather_rerotate(pool, slots, delta, inv, *, impl: str):
    """pool [L, P, K, H] rows `slots` [T] rotated by `delta` [T] -> [L, T, K, H]."""
    if impl == "interpret" or (impl == "pallas" and jax.default_backend() == "tpu"):
        return _gather_kernel(pool, slots, delta, inv, interpret=impl == "interpret")
    return gather_rerotate_reference(pool, slots, delta, inv)
