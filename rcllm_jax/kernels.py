"""Kernel dispatch for the block modes: `--attention_impl=auto|pallas|xla`.

xla: the pure-JAX references (what XLA fuses on its own). pallas: the `pallas_kernels` kernels,
compiled, in the variant of the backend: on TPU the Mosaic kernels (scalar-prefetched block
tables), on GPU the Triton ones (block tables read from refs inside the kernel); on CPU the
Pallas interpreter runs the TPU variant (slow, for tests; `resolve(..., variant="gpu")` runs the
GPU one). auto: XLA on every backend until its kernels have been compiled and checked against the
references there (`launch/device_check.py`; `VERIFIED_BACKENDS` lists the backends where they
were: none yet, no GPU or TPU has been lent to this project). Both variants of each kernel are
lowered for their platform on CPU by the tests (Triton IR, Mosaic), so what a device call finds
is compile-time or numeric, not a missing lowering.

Resolved implementations: "xla"; "pallas" (compiled, the backend's variant); "interpret" (the TPU
variant interpreted); "interpret:gpu" (the GPU variant interpreted).

The engine's attention reads a request's prefix from the pool's pages and its suffix buffer in
pages through `paged_attention`; the cached rows arrive through `gather_rerotate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gather_rerotate import gather_rerotate as gather_kernel
from pallas_kernels.gather_rerotate import gather_rerotate_gpu as gather_kernel_gpu
from pallas_kernels.gather_rerotate import gather_rerotate_reference
from pallas_kernels.paged_attention import paged_attention as paged_kernel
from pallas_kernels.paged_attention import paged_attention_gpu as paged_kernel_gpu
from pallas_kernels.paged_attention import paged_attention_reference

IMPLS = ("auto", "pallas", "xla")
VARIANTS = ("tpu", "gpu")  # a kernel's variants, by the backend it compiles for
VERIFIED_BACKENDS: frozenset[str] = frozenset()  # backends where `auto` may pick the Pallas kernels
GPU_PAGE = 16  # rows per page the GPU paged kernel reads (Triton's dot tiles: >= 16)


def resolve(impl: str, platform: str | None = None, variant: str = "tpu") -> str:
    """-> "xla", "pallas" (compiled, the backend's variant), or on CPU "interpret" / "interpret:gpu"
    (the Pallas interpreter running `variant`'s kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if variant not in VARIANTS:
        raise ValueError(f"kernel variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    platform = platform or jax.default_backend()
    if impl == "xla" or (impl == "auto" and platform not in VERIFIED_BACKENDS):
        return "xla"
    if platform == "cpu":
        return "interpret" if variant == "tpu" else f"interpret:{variant}"
    return "pallas"


def variant_of(impl: str, platform: str | None = None) -> tuple[str, bool] | None:
    """A resolved implementation -> (kernel variant, interpreted), or None for the XLA references
    (also "pallas" on a backend with no variant of its own)."""
    if impl.startswith("interpret"):
        return impl.partition(":")[2] or "tpu", True
    platform = platform or jax.default_backend()
    if impl == "pallas" and platform in VARIANTS:
        return platform, False
    return None


def check_model(cfg, impl: str) -> None:
    """Refuse a Pallas attention path for a model the paged kernel does not compute: it takes one
    static window, one RoPE table and 1/sqrt(head_dim) scores (Gemma 3 runs on the XLA path)."""
    picked = variant_of(impl)
    if picked is None:
        return
    h = cfg.head_dim
    missing = [what for what, on in (("per-layer sliding / global attention", cfg.mixed_layers),
                                     ("query_pre_attn_scalar scaling", cfg.query_scale is not None),
                                     (f"head dim {h} (the GPU kernels need a power of two >= 32)",
                                      picked[0] == "gpu" and (h < 32 or h & (h - 1)))) if on]
    if missing:
        from rcllm_jax.model.config import UnsupportedModelError
        raise UnsupportedModelError(f"the Pallas attention kernels do not implement {' or '.join(missing)} "
                                    f"({cfg.arch}): use --attention_impl=xla")


def paged_attention(q, k_rows, v_rows, q_pos, table, span_start, span_len, span_pos, span_delta, inv, *,
                    impl: str, window: int | None = None, page: int = 16):
    """q [B, T, N, H] over one layer's stored rows k_rows, v_rows [S, K, H], read in place as pages
    of `page` rows addressed by a block table (`pallas_kernels/paged_attention.py`, spans [B, M])
    -> (out [B, T, N, H], log-sum-exp [B, T, N]). impl: a resolved implementation."""
    picked = variant_of(impl)
    if picked is not None and picked[0] == "gpu" and page < GPU_PAGE:
        # Triton's dot wants >= 16 rows: read 16-row pages. A span inside one `page`-row page lies
        # inside one 16-row page too (16 a multiple of page), so only its page and start change
        if GPU_PAGE % page:
            raise ValueError(f"pages of {page} rows: the GPU kernel reads pages of {GPU_PAGE} (a multiple of them)")
        first = table * page + span_start
        table, span_start, page = first // GPU_PAGE, first % GPU_PAGE, GPU_PAGE
    if k_rows.shape[0] % page:  # whole pages (a small request buffer; the pool is page-aligned)
        pad = ((0, page - k_rows.shape[0] % page), (0, 0), (0, 0))
        k_rows, v_rows = jnp.pad(k_rows, pad), jnp.pad(v_rows, pad)
    kp, vp = (a.reshape(-1, page, *a.shape[1:]) for a in (k_rows, v_rows))
    args = (q, kp, vp, q_pos, table, span_start, span_len, span_pos, span_delta, inv)
    if picked is None:
        return paged_attention_reference(*args, window=window)
    kernel = paged_kernel if picked[0] == "tpu" else paged_kernel_gpu
    return kernel(*args, window=window, interpret=picked[1])


def gather_rerotate(rows, slots, delta, inv, *, impl: str):
    """rows [L, P, K, H] at `slots` [T], rotated by `delta` [T] -> [L, T, K, H]."""
    picked = variant_of(impl)
    if picked is None:
        return gather_rerotate_reference(rows, slots, delta, inv)
    kernel = gather_kernel if picked[0] == "tpu" else gather_kernel_gpu
    return kernel(rows, slots, delta, inv, interpret=picked[1])
