"""Kernel dispatch for the block modes: `--attention_impl=auto|pallas|xla`.

xla: the pure-JAX references (what XLA fuses on its own). pallas: the `pallas_kernels` kernels
(compiled on GPU/TPU; on CPU the Pallas interpreter: slow, for tests). auto: XLA on every
backend, until a kernel has been compiled and verified on that backend (none has been yet: no
GPU or TPU was lent to this project; WORKSPACE_NOTES.md records it when one is).

The gather + re-rotation kernel uses scalar-prefetched block indices (a Mosaic TPU feature);
`pallas` on GPU runs it as XLA.
"""

from __future__ import annotations

import jax

from pallas_kernels.gather_rerotate import gather_rerotate as _gather_kernel
from pallas_kernels.gather_rerotate import gather_rerotate_reference
from pallas_kernels.selective_attention import selective_attention as _attn_kernel
from pallas_kernels.selective_attention import selective_attention_reference

IMPLS = ("auto", "pallas", "xla")
VERIFIED_BACKENDS: frozenset[str] = frozenset()  # backends where `auto` may pick the Pallas kernels


def resolve(impl: str, platform: str | None = None) -> str:
    """-> "xla", "pallas" (compiled) or "interpret" (Pallas interpreter, CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    platform = platform or jax.default_backend()
    if impl == "xla" or (impl == "auto" and platform not in VERIFIED_BACKENDS):
        return "xla"
    return "interpret" if platform == "cpu" else "pallas"


def selective_attention(q, k, v, q_pos, k_pos, k_valid, *, impl: str, window: int | None = None):
    """q [B, T, N, H] over k, v [B, S, K, H] (causal by position, k_valid [B, S], optional sliding
    window) -> [B, T, N*H]. impl: a resolved implementation."""
    b, t, n, h = q.shape
    if impl == "xla":
        out = selective_attention_reference(q, k, v, q_pos, k_pos, k_valid=k_valid, window=window)
    else:
        out = _attn_kernel(q, k, v, q_pos, k_pos, k_valid=k_valid, window=window, interpret=impl == "interpret")
    return out.reshape(b, t, n * h)


def gather_rerotate(rows, slots, delta, inv, *, impl: str):
    """rows [L, P, K, H] at `slots` [T], rotated by `delta` [T] -> [L, T, K, H]."""
    if impl == "interpret" or (impl == "pallas" and jax.default_backend() == "tpu"):
        return _gather_kernel(rows, slots, delta, inv, interpret=impl == "interpret")
    return gather_rerotate_reference(rows, slots, delta, inv)
