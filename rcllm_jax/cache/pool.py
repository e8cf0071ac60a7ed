"""A device pool of KV token slots, replicated on every device: per-user prefixes (the user store)
and prefix-cache pages, in 16-token pages handed out by a `PageAllocator`. A request gathers its
prefix by slot index inside its jitted prefill. (Item and glue blocks live in the block store.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.model.config import ModelConfig

PAGE = 16  # tokens per page (vLLM's default block size)


@functools.partial(jax.jit, donate_argnames=("pool_k", "pool_v"))
def _scatter(pool_k, pool_v, k, v, slots):
    # k, v [L, n, K, H] written at arbitrary slots [n]
    return pool_k.at[:, slots].set(k.astype(pool_k.dtype)), pool_v.at[:, slots].set(v.astype(pool_v.dtype))


@functools.partial(jax.jit, donate_argnames=("pool_k", "pool_v"))
def _copy_rows(pool_k, pool_v, k, v, rows, slots):
    # rows [n] of k, v [L, R, K, H] written at pool slots [n]
    return (pool_k.at[:, slots].set(k[:, rows].astype(pool_k.dtype)),
            pool_v.at[:, slots].set(v[:, rows].astype(pool_v.dtype)))


class KVPool:
    """k, v: [L, S, K, H] device arrays; slot 0 is a scratch slot that never holds data."""

    def __init__(self, cfg: ModelConfig, num_slots: int, dtype=None, sharding=None):
        """sharding: where the pool lives (e.g. on every items-shard of a mesh, its KV heads split
        over `model`); every write is placed there first (its slot indices on every device of that
        mesh), so KV computed on one device or row reaches every replica."""
        shape = (cfg.num_layers, num_slots, cfg.num_kv_heads, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        self.sharding = sharding
        self.k = self._place(jnp.zeros(shape, dt))
        self.v = self._place(jnp.zeros(shape, dt))

    def _place(self, a):
        return a if self.sharding is None else jax.device_put(a, self.sharding)

    def _place_index(self, a):
        if self.sharding is None:
            return a
        return jax.device_put(a, jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec()))

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def scatter(self, slots: np.ndarray, k, v):
        """Write tokens' KV ([L, n, K, H]) at the given slots (slot 0, the scratch slot, takes
        padding rows)."""
        slots = np.asarray(slots, np.int32)
        if slots.min() < 0 or slots.max() >= self.num_slots:
            raise IndexError("slot outside the pool")
        self.k, self.v = _scatter(self.k, self.v, self._place(k), self._place(v), self._place_index(jnp.asarray(slots)))

    def copy_rows(self, k, v, rows: np.ndarray, slots: np.ndarray):
        """Write rows `rows` of k, v ([L, R, K, H]) at the given slots, in one compiled program
        per (R, len(rows)) (slot 0, the scratch slot, takes padding rows)."""
        rows, slots = np.asarray(rows, np.int32), np.asarray(slots, np.int32)
        if slots.min() < 0 or slots.max() >= self.num_slots or rows.min() < 0 or rows.max() >= k.shape[1]:
            raise IndexError("row or slot outside its array")
        self.k, self.v = _copy_rows(self.k, self.v, self._place(k), self._place(v),
                                    self._place_index(jnp.asarray(rows)), self._place_index(jnp.asarray(slots)))


class PageAllocator:
    """Hands out 16-token pages of the pool region [first_slot, first_slot + num_pages * PAGE)."""

    def __init__(self, first_slot: int, num_pages: int):
        self.first_slot = first_slot
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, pages):
        self._free.extend(pages)

    def slots(self, pages, length: int) -> np.ndarray:
        """Slot index of each of the first `length` tokens stored in `pages` (in order)."""
        pages = np.asarray(pages, np.int64)
        base = self.first_slot + pages[:, None] * PAGE + np.arange(PAGE)[None]
        return base.reshape(-1)[:length].astype(np.int32)
