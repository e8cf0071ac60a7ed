"""The key sets a recomputed row attends, each read where it lies, and the one merge.

A block-mode request's recomputed rows attend the user's prefix (in the pool), the cached item and
glue rows of its suffix, and each other. No key set is copied next to another: each kind below has
its own attention, returning (out [B, T, N, H], log-sum-exp [B, T, N]), and `attend` merges them by
log-sum-exp (`pallas_kernels.paged_attention.merge_attention`).

- `DenseRows`: rows addressed one by one, each set with its mask (the XLA backend: the prefix read
  by slot from the pool and the suffix buffer, as one softmax through `decoder.attend_parts`).
- `PagedRows`: one layer's rows stored as whole pages, read through a block table by the paged
  kernel (`kernels.paged_attention`): the pool's pages of the prefix, the suffix buffer in pages,
  or the block store's spans read in place (the query rotated back by each span's delta).
- `FreshRows`: the recomputed rows' own K/V, when the cached rows are read in place instead of
  being overwritten in a suffix buffer.

Which sets a request reads is decided by `RequestKeys.layer` from the engine's kernel choice (made
once, `Engine(attention_impl=)`) and whether the request's cached rows are read in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.masked_attention import masked_attention
from pallas_kernels.paged_attention import merge_attention
from rcllm_jax import kernels
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import attend_parts, layer_mask


@dataclasses.dataclass(frozen=True)
class DenseRows:
    """Key sets addressed row by row: ((k, v [B, S_i, K, H], mask [B, T, S_i]), ...), one softmax."""

    parts: tuple

    def attend(self, cfg: ModelConfig, q, q_pos, inv, impl: str):
        return attend_parts(cfg, q, self.parts, with_lse=True)


@dataclasses.dataclass(frozen=True)
class PagedRows:
    """One layer's rows k, v [S, K, H] read as pages of `page` rows through a block table
    (table, span_start, span_len, span_pos, span_delta [B, M]: `kernels.paged_attention`)."""

    k: jax.Array
    v: jax.Array
    table: tuple
    page: int

    def attend(self, cfg: ModelConfig, q, q_pos, inv, impl: str):
        return kernels.paged_attention(q, self.k, self.v, q_pos, *self.table, inv, impl=impl,
                                       window=cfg.sliding_window, page=self.page)


@dataclasses.dataclass(frozen=True)
class FreshRows:
    """The recomputed rows' own k, v [B, n, K, H]; row j is a key where `visible` [B, n]."""

    k: jax.Array
    v: jax.Array
    visible: jax.Array

    def attend(self, cfg: ModelConfig, q, q_pos, inv, impl: str):
        return masked_attention(q, self.k, self.v, self.visible, q_pos, q_pos, cfg.sliding_window)


def attend(cfg: ModelConfig, q, q_pos, inv, impl: str, key_sets) -> jax.Array:
    """Attention of q [B, T, N, H] at positions q_pos [B, T] over the union of `key_sets` (each
    attended where it lies, merged by log-sum-exp in order) -> out [B, T, N, H]."""
    o, lse = key_sets[0].attend(cfg, q, q_pos, inv, impl)
    for s in key_sets[1:]:
        o_s, lse_s = s.attend(cfg, q, q_pos, inv, impl)
        o, lse = merge_attention(o_s, lse_s, o.astype(o_s.dtype), lse)
    return o


@dataclasses.dataclass(frozen=True)
class RequestKeys:
    """Where a request's keys lie, for every layer: the pool (its prefix by slot or by page
    table), the suffix buffer (by the recompute rows' mask or by page table), and, when its cached
    rows are read in place, the block store's spans. `layer` gives one layer's key sets."""

    impl: str
    pool_k: jax.Array  # [L, S, K, H]
    pool_v: jax.Array
    prefix_slots: jax.Array  # [P]
    prefix_pages: tuple | None  # the prefix's page table (paged reads), else None
    page: int  # rows per page of the pool and of the suffix buffer
    mask_p: jax.Array  # [1, n, P] the recompute rows' mask over the prefix (dense reads; per layer
    mask_t: jax.Array  # [1, n, T] ... over the suffix buffer           kind: `decoder.layer_masks`)
    suffix_pages: tuple | None  # the suffix buffer's page table (paged reads without a store)
    store: tuple | None  # (store_k, store_v [L, S, K, H], spans [1, M] x 5, page): rows read in place

    def layer(self, cfg: ModelConfig, i, buf_k, buf_v, k, v, sel) -> list:
        """Layer i's key sets: buf_k/v [1, T, K, H] the suffix buffer (fresh rows written over
        cached ones; None when the cached rows are read in place), k, v [1, n, K, H] the recompute
        rows' own, sel [n] which of them are real."""
        pk, pv = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (self.pool_k, self.pool_v))
        if self.impl == "xla" and self.store is None:
            return [DenseRows(((pk[self.prefix_slots][None], pv[self.prefix_slots][None],
                                layer_mask(self.mask_p, cfg, i)), (buf_k, buf_v, layer_mask(self.mask_t, cfg, i))))]
        if self.store is None:
            sets = [PagedRows(buf_k[0], buf_v[0], self.suffix_pages, self.page)]
        else:
            store_k, store_v, spans, page = self.store
            sk, sv = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (store_k, store_v))
            sets = [FreshRows(k, v, sel[None]), PagedRows(sk, sv, spans, page)]
        if self.prefix_slots.shape[0]:  # no prefix: nothing to merge
            sets.append(PagedRows(pk, pv, self.prefix_pages, self.page))
        return sets


def page_spans(pages, n_rows, first_pos, page: int):
    """(table, span_start, span_len, span_pos, span_delta) [1, M] of rows stored as whole pages in
    order (`pages` [M]), the `n_rows` valid rows first, consecutive in position from each page's
    `first_pos` [M]; stored at their real positions (no offset)."""
    zero = jnp.zeros(pages.shape[0], jnp.int32)
    rows = jnp.clip(n_rows - jnp.arange(pages.shape[0]) * page, 0, page)
    return tuple(a[None].astype(jnp.int32) for a in (pages, zero, rows, first_pos, zero))


def prefix_page_table(prefix_slots, prefix_valid, page: int):
    """`page_spans` of a request's prefix in the pool: its slots are whole pages in order
    (`PageAllocator.slots`); padding slots point at the scratch page and have no rows."""
    n = -(-prefix_slots.shape[0] // page)
    slots = jnp.pad(prefix_slots, (0, n * page - prefix_slots.shape[0]))
    return page_spans(slots[::page] // page, jnp.sum(prefix_valid), jnp.arange(n) * page, page)


def suffix_page_table(q_pos, valid, page: int):
    """`page_spans` of a request's suffix buffer [T, K, H], read in pages of `page` rows (padded to
    whole pages by `kernels.paged_attention`)."""
    return page_spans(jnp.arange(-(-valid.shape[0] // page)), jnp.sum(valid), q_pos[0, ::page], page)
