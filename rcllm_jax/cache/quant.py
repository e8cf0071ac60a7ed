"""int8 cached KV: symmetric quantization with one scale per token and KV head.

A row x [..., H] (one token's key or value of one head in one layer) is held as
q = round(x / s) in int8 with s = max|x| / 127 in f32 (s = 0 for an all-zero row), and read
back as q * s: the error of an element is at most s / 2. Re-quantizing a dequantized row gives
the same q and s (its largest element is exactly 127 s), so laying a store out again changes
nothing. Cost per token: L x K x (2 H bytes + 2 x 4 bytes of scales) for K and V together.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

QMAX = 127


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., H] (float, host) -> (q [..., H] int8, scale [...] float32), computed one slice of
    the leading axis at a time (f32 temporaries of one layer, not of the whole store)."""
    q = np.empty(x.shape, np.int8)
    s = np.empty(x.shape[:-1], np.float32)
    for i in range(x.shape[0]) if x.ndim > 1 else ():
        xi = np.asarray(x[i], np.float32)
        s[i] = np.max(np.abs(xi), axis=-1) / QMAX
        safe = np.where(s[i] > 0, s[i], 1.0)[..., None]
        q[i] = np.clip(np.rint(xi / safe), -QMAX, QMAX)
    return q, s


def dequantize(q, s, dtype=jnp.float32):
    """(q [..., H] int8, scale [...]) -> q * scale [..., H] in `dtype` (numpy in, numpy out;
    jax in, jax out)."""
    if isinstance(q, np.ndarray):
        return (q.astype(np.float32) * np.asarray(s, np.float32)[..., None]).astype(dtype)
    return (q.astype(jnp.float32) * s.astype(jnp.float32)[..., None]).astype(dtype)
