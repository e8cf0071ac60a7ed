"""Gather of cached block KV from the pool into the stitched buffer, fused with the RoPE
re-rotation from canonical to real positions.

  pool   [L, P, K, H]  post-RoPE keys of every cached token (the KV pool, one side)
  slots  [T]           pool row of each stitched token
  delta  [T]           real position - canonical position of each token
  -> out [L, T, K, H]  out[l, t] = rotate(pool[l, slots[t]], by delta[t])   (HF rotate_half layout)

Rotation by delta composes with the rotation already in the key (RoPE is a rotation per frequency
pair), so this equals rotating the gathered keys from their canonical to their real positions.
The rotation is computed in f32 (angles, cos/sin and the product) and rounded to the KV dtype
once, in both implementations. `inv` [H/2]: the model's RoPE inverse frequencies (the caller's;
this package depends on nothing of the engine's), or [L, H/2], one row per layer (a model whose
layers differ in RoPE base, e.g. Gemma 3's sliding and global layers). `gather_rerotate_reference` is
that XLA path; `gather_rerotate` the Pallas TPU kernel (Mosaic): scalar-prefetched slots and deltas
drive the block index of the pool (one row per grid step, so only the rows used are read, once),
the rotation happens on the row in VMEM and the rotated row is written once.
`gather_rerotate_gpu` the GPU kernel (Pallas' Triton backend, no scalar prefetch): grid (layer, kv
head, tile of 16 tokens); a program reads its tile's slots and deltas from refs, gathers the 16
rows of one KV head by those slots and writes them rotated, as two RoPE halves (Triton tiles are
powers of two in size and cannot be concatenated in registers). Values (V) need no rotation:
gather them with the same slots and `jnp.take`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def rotate_by(x, ang):
    """x [..., H] (f32) rotated by the angles ang [..., H/2] of each frequency pair (HF
    rotate_half layout; ang broadcasts against x's leading dimensions)."""
    return rotate_cs(x, jnp.cos(ang), jnp.sin(ang))


def rotate_cs(x, cos, sin):
    """`rotate_by` given the angles' cos and sin [..., H/2] (a table computed once: fused into the
    rotation of many rows, XLA recomputes them per element)."""
    cos, sin = jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def gather_rerotate_reference(pool, slots, delta, inv):
    """XLA: gather, then rotate by delta in f32, one rounding to the pool's dtype."""
    g = pool[:, slots].astype(jnp.float32)  # [L, T, K, H]
    inv = jnp.asarray(inv, jnp.float32).reshape(-1, pool.shape[-1] // 2)  # [1 or L, H/2]
    ang = delta.astype(jnp.float32)[None, :, None] * inv[:, None, :]  # [1 or L, T, H/2]
    return rotate_by(g, ang[:, :, None, :]).astype(pool.dtype)


def _kernel(slots_ref, delta_ref, inv_ref, k_ref, o_ref):
    # k_ref, o_ref [K, H] (one token of one layer); inv_ref [1, H/2]
    t = pl.program_id(1)
    ang = delta_ref[t].astype(jnp.float32) * inv_ref[...]  # [1, H/2]
    o_ref[...] = rotate_by(k_ref[...].astype(jnp.float32), ang).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rerotate(pool, slots, delta, inv, *, interpret: bool = False):
    """Pallas kernel; same contract as `gather_rerotate_reference`."""
    n_layers, _, kh, h = pool.shape
    t = slots.shape[0]
    inv = jnp.asarray(inv, jnp.float32).reshape(-1, h // 2)  # [1 or L, H/2]
    per_layer = int(inv.shape[0] > 1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n_layers, t),
        in_specs=[pl.BlockSpec((1, h // 2), lambda l, i, s, d: (l * per_layer, 0)),
                  pl.BlockSpec((None, None, kh, h), lambda l, i, s, d: (l, s[i], 0, 0))],
        out_specs=pl.BlockSpec((None, None, kh, h), lambda l, i, s, d: (l, i, 0, 0)),
    )
    return pl.pallas_call(_kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((n_layers, t, kh, h), pool.dtype),
                          interpret=interpret)(slots.astype(jnp.int32), delta.astype(jnp.int32), inv, pool)


def _gpu_kernel(slots_ref, delta_ref, inv_ref, pool_ref, o_ref):
    # slots, delta [bt]; inv [H/2]; pool [P, H] (one layer's one KV head); o [bt, H]
    half = o_ref.shape[1] // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    slots = slots_ref[...]
    ang = delta_ref[...].astype(jnp.float32)[:, None] * inv_ref[...][None, :]  # [bt, H/2]
    c, sn = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = pool_ref[slots, lo].astype(jnp.float32), pool_ref[slots, hi].astype(jnp.float32)
    o_ref[:, lo] = (x1 * c - x2 * sn).astype(o_ref.dtype)
    o_ref[:, hi] = (x2 * c + x1 * sn).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def gather_rerotate_gpu(pool, slots, delta, inv, *, block_t: int = 16, interpret: bool = False):
    """Pallas GPU (Triton) kernel; same contract as `gather_rerotate_reference` (head dim a power
    of two of at least 2; `block_t` tokens per program, a power of two)."""
    n_layers, n_slots, kh, h = pool.shape
    if h < 2 or h & (h - 1) or block_t & (block_t - 1):
        raise ValueError(f"the GPU gather kernel needs a head dim and block_t that are powers of two "
                         f"(got head dim {h}, block_t {block_t})")
    t = slots.shape[0]
    t_p = pl.cdiv(t, block_t) * block_t
    pad = lambda a: jnp.pad(a.astype(jnp.int32), (0, t_p - t))  # noqa: E731  (padding rows read slot 0, dropped)
    inv = jnp.asarray(inv, jnp.float32).reshape(-1, h // 2)  # [1 or L, H/2]
    per_layer = int(inv.shape[0] > 1)
    tok = pl.BlockSpec((block_t,), lambda l, j, i: (i,))
    out = pl.pallas_call(
        _gpu_kernel,
        grid=(n_layers, kh, t_p // block_t),
        in_specs=[tok, tok, pl.BlockSpec((None, h // 2), lambda l, j, i: (l * per_layer, 0)),
                  pl.BlockSpec((None, n_slots, None, h), lambda l, j, i: (l, 0, j, 0))],
        out_specs=pl.BlockSpec((None, block_t, None, h), lambda l, j, i: (l, i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((n_layers, t_p, kh, h), pool.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
    )(pad(slots), pad(delta), inv, pool)
    return out[:, :t]
