"""Kernel dispatch for the block modes: `--attention_impl=auto|pallas|xla`.

xla: the pure-JAX references (what XLA fuses on its own). pallas: the `pallas_kernels` kernels
(compiled on GPU/TPU; on CPU the Pallas interpreter: slow, for tests). auto: XLA on every
backend, until a kernel has been compiled and verified on that backend (none has been yet: no
GPU or TPU was lent to this project; WORKSPACE_NOTES.md records it when one is).

The engine's attention reads a request's prefix from the pool's pages and its suffix buffer in
pages through `paged_attention`; the cached rows arrive through `gather_rerotate`. Both kernels
use scalar-prefetched block indices (a Mosaic TPU feature): `pallas` on GPU runs them as XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gather_rerotate import gather_rerotate as gather_kernel
from pallas_kernels.gather_rerotate import gather_rerotate_reference
from pallas_kernels.paged_attention import paged_attention as paged_kernel
from pallas_kernels.paged_attention import paged_attention_reference

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


def check_model(cfg, impl: str) -> None:
    """Refuse a Pallas attention path for a model the paged kernel does not compute: it takes one
    static window, one RoPE table and 1/sqrt(head_dim) scores (Gemma 3 runs on the XLA path)."""
    if impl == "xla":
        return
    missing = [what for what, on in (("per-layer sliding / global attention", cfg.mixed_layers),
                                     ("query_pre_attn_scalar scaling", cfg.query_scale is not None)) if on]
    if missing:
        from rcllm_jax.model.config import UnsupportedModelError
        raise UnsupportedModelError(f"the Pallas attention kernels do not implement {' or '.join(missing)} "
                                    f"({cfg.arch}): use --attention_impl=xla")


def paged_attention(q, k_rows, v_rows, q_pos, table, span_start, span_len, span_pos, span_delta, inv, *,
                    impl: str, window: int | None = None, page: int = 16):
    """q [B, T, N, H] over one layer's stored rows k_rows, v_rows [S, K, H], read in place as pages
    of `page` rows addressed by a block table (`pallas_kernels/paged_attention.py`, spans [B, M])
    -> (out [B, T, N, H], log-sum-exp [B, T, N]). impl: a resolved implementation."""
    if k_rows.shape[0] % page:  # whole pages (a small request buffer; the pool is page-aligned)
        pad = ((0, page - k_rows.shape[0] % page), (0, 0), (0, 0))
        k_rows, v_rows = jnp.pad(k_rows, pad), jnp.pad(v_rows, pad)
    kp, vp = (a.reshape(-1, page, *a.shape[1:]) for a in (k_rows, v_rows))
    args = (q, kp, vp, q_pos, table, span_start, span_len, span_pos, span_delta, inv)
    if impl == "interpret" or (impl == "pallas" and jax.default_backend() == "tpu"):
        return paged_kernel(*args, window=window, interpret=impl == "interpret")
    return paged_attention_reference(*args, window=window)


def gather_rerotate(rows, slots, delta, inv, *, impl: str):
    """rows [L, P, K, H] at `slots` [T], rotated by `delta` [T] -> [L, T, K, H]."""
    if impl == "interpret" or (impl == "pallas" and jax.default_backend() == "tpu"):
        return gather_kernel(rows, slots, delta, inv, interpret=impl == "interpret")
    return gather_rerotate_reference(rows, slots, delta, inv)
