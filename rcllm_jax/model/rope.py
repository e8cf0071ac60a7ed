"""Rotary position embedding (HF "rotate_half" layout), incl. linear and llama3 scaling.

Keys are stored post-RoPE; `rerotate` moves them from one position to another, which is exact in
exact arithmetic because rotations compose: R(q) = R(q - p) R(p).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from rcllm_jax.model.config import ModelConfig, RopeScaling


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies in float32, computed the way transformers computes them: [H/2], or
    [L, H/2] for a model whose layers differ in RoPE base (Gemma 3's sliding layers use
    `local_rope_theta`, unscaled); `layer_inv` picks one layer's."""
    glob = _inv(cfg, cfg.rope_theta, scaled=True)
    if not cfg.mixed_layers:
        return glob
    local = _inv(cfg, cfg.local_rope_theta or cfg.rope_theta, scaled=False)
    return np.stack([local if s else glob for s in cfg.sliding_layers])


def layer_inv(inv, i):
    """Layer i's inverse frequencies [H/2] from `inv_freq`'s table (i may be traced)."""
    return inv if np.ndim(inv) == 1 else jnp.asarray(inv)[i]


def _inv(cfg: ModelConfig, theta: float, scaled: bool) -> np.ndarray:
    h = cfg.head_dim
    exps = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exps)).astype(np.float32)
    rs = cfg.rope_scaling if scaled else RopeScaling()
    if rs.rope_type == "linear":
        inv = (inv / np.float32(rs.factor)).astype(np.float32)
    elif rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position / rs.low_freq_factor
        high_wavelen = rs.original_max_position / rs.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(rs.factor), inv)
        smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    if cfg.rope_freq_factors is not None:
        inv = (inv / np.asarray(cfg.rope_freq_factors, np.float32)).astype(np.float32)
    return inv


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _cos_sin(positions, inv, dtype):
    # positions [B, T] -> cos, sin [B, T, 1, H]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [B, T, H/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, positions, inv):
    """x [B, T, N, H] rotated to positions [B, T]."""
    cos, sin = _cos_sin(positions, inv, x.dtype)
    return x * cos + _rotate_half(x) * sin


def rerotate(k, from_positions, to_positions, inv):
    """Post-RoPE keys k [B, T, K, H] at from_positions moved to to_positions (both [B, T])."""
    return apply_rope(k, to_positions - from_positions, inv)
