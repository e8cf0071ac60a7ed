"""The stitching plan: which tokens of a prompt come from caches, where they were encoded, and
what each token attends to. One source of truth for the engine (what to gather and what to
recompute) and for block-aware training (the attention the model must learn to read).

Per prompt token:
  seg        SEG_SHARED for the instruction (every block's canonical context); a positive id for
             a block encoded apart (the history block = 1, each cached block its own id);
             SEG_GLOBAL for a block computed fresh over the whole prompt (glue, question).
  canon_pos  the position the token's KV was computed at (its real position unless it is cached).
  forced     recomputed over the whole prompt in every layer (fresh blocks, the first `sink`
             tokens of cached blocks, the last token: its logits are the answer).

What a token attends to (`stitched_masks`): a token that is not forced sees, at canonical
positions, the instruction and the earlier tokens of its own block (how its cached KV was made);
a forced token sees every earlier token at real positions, cached keys re-rotated there.

`device_layout` turns a plan and the block-store entries it was made from into the `Layout` the
jitted prefill takes: the exact prefix's pool slots, then per suffix token its id, real and
canonical position, and its block-store slot (-1: computed fresh).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from rcllm_jax.buckets import bucket, coarse_bucket

from rcllm_jax.data.prompt import Block, Prompt
import jax

from rcllm_jax.model.decoder import SEG_GLOBAL, SEG_SHARED, attention_mask, layer_masks

HISTORY_SEG = 1


def served_from_cache(block: Block, cached_glue: bool) -> bool:
    """Is this suffix block's KV taken from a block store? Items always; glue if the policy says so."""
    return block.kind == "item" or (cached_glue and block.kind == "glue")


@dataclasses.dataclass(frozen=True)
class StitchPlan:
    seg: np.ndarray  # [n] int32
    canon_pos: np.ndarray  # [n] int32
    forced: np.ndarray  # [n] bool
    block: np.ndarray  # [n] index of the token's block in prompt.blocks
    n_prefix: int  # instruction + history tokens (exact, from the user store)

    @property
    def real_pos(self) -> np.ndarray:
        return np.arange(len(self.seg), dtype=np.int32)

    @property
    def cached(self) -> np.ndarray:
        """[n] suffix tokens whose KV comes from a block store."""
        return (self.seg > 0) & (self.real_pos >= self.n_prefix)


def history_prefix(prompt: Prompt) -> tuple[int, ...]:
    """A prompt's instruction + history block tokens: the exact prefix the user store and the
    prefix cache's event-time warming key by; a ValueError when the prompt does not start so."""
    b0, b1 = prompt.blocks[0], prompt.blocks[1]
    if (b0.kind, b1.kind) != ("instruction", "history"):
        raise ValueError("prompt does not start with instruction + history blocks")
    return b0.tokens + b1.tokens


def stitch_plan(prompt: Prompt, canon_starts: Sequence[int | None], sink: int = 0) -> StitchPlan:
    """canon_starts[j]: the position block j's first token was encoded at if its KV comes from a
    cache (a lookup made before), None if the block is computed fresh (entries 0 and 1 are
    ignored: blocks 0 and 1 must be instruction and history, the user store's exact prefix)."""
    kinds = [b.kind for b in prompt.blocks[:2]]
    if kinds != ["instruction", "history"]:
        raise ValueError(f"a stitched prompt starts with instruction + history blocks, not {kinds}")
    seg, canon, forced, owner = [], [], [], []
    pos = 0
    next_seg = HISTORY_SEG + 1
    for j, blk in enumerate(prompt.blocks):
        n = len(blk.tokens)
        start = canon_starts[j] if j >= 2 else None
        if j == 0:
            s, c, f = SEG_SHARED, pos, False
        elif j == 1:
            s, c, f = HISTORY_SEG, pos, False
        elif start is None:
            s, c, f = SEG_GLOBAL, pos, True
        else:
            s, c, f = next_seg, start, False
            next_seg += 1
        for i in range(n):
            seg.append(s)
            canon.append(c + i)
            forced.append(f or (start is not None and i < sink))
            owner.append(j)
        pos += n
    forced[-1] = True
    n_prefix = len(prompt.blocks[0].tokens) + len(prompt.blocks[1].tokens)
    return StitchPlan(seg=np.asarray(seg, np.int32), canon_pos=np.asarray(canon, np.int32),
                      forced=np.asarray(forced, bool), block=np.asarray(owner, np.int32), n_prefix=n_prefix)


def query_rows(prompt: Prompt) -> np.ndarray:
    """[n] bool: the rows every block mode computes per request (blocks after the history that are
    not items: glue, score slots, question; and the last token), where a query adapter applies.
    The same set as `stitch_plan(...).forced` with every item block cached and no sink."""
    rows = np.zeros(len(prompt), bool)
    for j, (a, b) in enumerate(prompt.spans()):
        rows[a:b] = j >= 2 and prompt.blocks[j].kind != "item"
    rows[-1] = True
    return rows


def stitched_masks(real_pos, canon_pos, seg, forced, valid, cfg=None):
    """[B, T, S] masks of one forward pass that reproduces stitching, all through `attention_mask`
    (under `cfg`'s windows, per layer kind as `decoder.layer_masks` gives them; None: no window):
    (block_mask: queries that are not forced vs keys at canonical positions,
     global_mask: forced queries vs keys at real positions). Arrays [B, T]."""
    masks = attention_mask if cfg is None else (lambda *a: layer_masks(*a, cfg))
    block = masks(canon_pos, seg, canon_pos, seg, valid)
    glob = masks(real_pos, jnp.full_like(seg, SEG_GLOBAL), real_pos, seg, valid)
    return (jax.tree.map(lambda m: m & ~forced[:, :, None], block),
            jax.tree.map(lambda m: m & forced[:, :, None], glob))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Device-side description of one request (numpy, bucketed shapes)."""

    prefix_slots: np.ndarray  # [Pb] pool slots of the exact prefix (positions 0..P-1)
    prefix_valid: np.ndarray  # [Pb] bool
    tokens: np.ndarray  # [Tb] suffix token ids
    real_pos: np.ndarray  # [Tb] positions in the prompt
    canon_pos: np.ndarray  # [Tb] positions the cached KV was computed at (= real_pos if fresh)
    block_slots: np.ndarray  # [Tb] block-store slot of each cached token, as read by `shard` (-1: fresh)
    forced: np.ndarray  # [Tb] bool: always recomputed
    valid: np.ndarray  # [Tb] bool
    n_prefix: int
    n_suffix: int
    shard: int = 0  # the items-shard the slots are addressed for

    @property
    def cached(self) -> np.ndarray:
        """[Tb] bool: KV comes from the block store."""
        return self.block_slots >= 0

    def arrays(self):
        """The arrays `blended_prefill` takes, in its order."""
        return self.prefix_slots, self.prefix_valid, self.tokens, self.real_pos, self.cached, self.forced, self.valid


def span_entries(suffix_rows: int) -> int:
    """Span entries of a request with `suffix_rows` suffix rows (a static shape: the paged kernel's
    grid runs over them, so fewer than one per row): a quarter of the rows. The default prompts
    need about one per five (history 50 / 50 candidates: 162-176 spans over 778-874 rows read,
    ~3.5 per candidate: its "-", its title over one or two pages); a request needing more fetches
    its rows instead."""
    return max(1, suffix_rows // 4)


def store_spans(lay: Layout, shard_slots: int, page: int) -> tuple | None:
    """Where the request's cached rows lie in its serving shard's block store, for attention that
    reads them in place (`kernels.paged_attention`): (table, start, len, pos, delta), each
    [span_entries(Tb)] int32, one entry per span of rows that are consecutive in the prompt and in
    the store, inside one `page`-row page of the shard's rows and one block (one position offset
    delta = real - canonical). Rows read: cached, valid and not recomputed (`forced`); entries past
    the spans have no rows. None when a cached row lives on another shard or the spans do not fit
    (such a request fetches its rows)."""
    t = np.flatnonzero(lay.cached & lay.valid & ~lay.forced)
    local = lay.block_slots[t].astype(np.int64) - lay.shard * shard_slots
    if ((local < 0) | (local >= shard_slots)).any():
        return None
    delta = (lay.real_pos - lay.canon_pos)[t]
    new = np.ones(len(t), bool)
    new[1:] = ((t[1:] != t[:-1] + 1) | (local[1:] != local[:-1] + 1) | (local[1:] // page != local[:-1] // page)
               | (delta[1:] != delta[:-1]))
    first = np.flatnonzero(new)
    n, m = len(first), span_entries(len(lay.tokens))
    if n > m:
        return None
    out = np.zeros((5, m), np.int32)
    out[0, :n], out[1, :n] = local[first] // page, local[first] % page
    out[2, :n] = np.diff(np.r_[first, len(t)])
    out[3, :n], out[4, :n] = lay.real_pos[t[first]], delta[first]
    return tuple(out)


def pad_arrays(arrays, prefix: int, suffix: int) -> tuple:
    """`Layout.arrays()` of a request in larger shapes (prefix slots, suffix rows), as numpy:
    padding is never attended and never selected (invalid, not cached, not forced; positions go
    on past the end), so a prefill's outputs are unchanged."""
    ps, pvd, tok, pos, cached, forced, valid = (np.asarray(a) for a in arrays)
    p0, t0 = len(ps), len(tok)
    if prefix < p0 or suffix < t0:
        raise ValueError(f"cannot pad a request of {p0} prefix / {t0} suffix rows to {prefix} / {suffix}")

    def pad(a, n):
        return np.concatenate([a, np.zeros(n - len(a), a.dtype)])
    more = pos[-1] + 1 + np.arange(suffix - t0, dtype=pos.dtype)
    return (pad(ps, prefix), pad(pvd, prefix), pad(tok, suffix), np.concatenate([pos, more]), pad(cached, suffix),
            pad(forced, suffix), pad(valid, suffix))


def _layout(prefix_slots, tokens, canon, block_slots, forced, shard=0, buckets=bucket) -> Layout:
    n_p, n_t = len(prefix_slots), len(tokens)
    pb, tb = buckets(n_p, 16), buckets(n_t, 16)
    ps = np.zeros(pb, np.int32)
    ps[:n_p] = prefix_slots

    def pad(a, dtype, fill=0):
        out = np.full(tb, fill, dtype)
        out[:n_t] = a
        return out
    real = n_p + np.arange(tb, dtype=np.int32)
    valid = np.arange(tb) < n_t
    return Layout(prefix_slots=ps, prefix_valid=np.arange(pb) < n_p, tokens=pad(tokens, np.int32),
                  real_pos=real, canon_pos=np.where(valid, pad(canon, np.int32), real),
                  block_slots=pad(block_slots, np.int32, -1), forced=pad(forced, bool), valid=valid,
                  n_prefix=n_p, n_suffix=n_t, shard=shard)


def device_layout(prompt: Prompt, plan: StitchPlan, prefix_slots, slots_of: Sequence[int | None],
                  shard: int) -> Layout:
    """The layout of a stitched request served on `shard`. slots_of[j]: block-store slot (as read
    by `shard`) of block j's first token where the plan serves it from the store, else None."""
    if len(prefix_slots) != plan.n_prefix:
        raise RuntimeError("user store prefix does not match the prompt's instruction + history")
    t = np.arange(plan.n_prefix, len(prompt.tokens))
    starts = np.array([-1 if s is None else s for s in slots_of], np.int64)
    at = np.minimum(np.searchsorted(plan.block, np.arange(len(prompt.blocks))), len(plan.block) - 1)
    first = plan.canon_pos[at].astype(np.int64)  # canonical position of each block's first token
    blk = plan.block[t]
    cached = plan.cached[t]
    slot = np.where(cached, starts[blk] + plan.canon_pos[t] - first[blk], -1)
    # prefix and suffix rows are read (gathered, attended), only the recompute set is computed:
    # power-of-two buckets (`buckets.coarse_bucket`) keep the set of request shapes small
    return _layout(prefix_slots, np.asarray(prompt.tokens)[t], plan.canon_pos[t], slot, plan.forced[t], shard,
                   coarse_bucket)


def fresh_layout(prefix_slots, tokens, start: int, shard: int = 0) -> Layout:
    """A plain prefill of `tokens` at positions start.. after an exact prefix (prefix mode): every
    suffix row is computed, so the fine buckets."""
    n = len(tokens)
    pos = start + np.arange(n)
    return _layout(prefix_slots, tokens, pos, np.full(n, -1), np.ones(n, bool), shard)
