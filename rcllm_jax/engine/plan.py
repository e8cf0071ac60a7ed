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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from rcllm_jax.data.prompt import Block, Prompt
from rcllm_jax.model.decoder import SEG_GLOBAL, SEG_SHARED, attention_mask

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


def stitch_plan(prompt: Prompt, canon_start: Callable[[Block], int | None], sink: int = 0) -> StitchPlan:
    """canon_start(block) -> the position the block's first token was encoded at if its KV comes
    from a cache, None if the block is computed fresh. Blocks 0 and 1 must be instruction, history."""
    kinds = [b.kind for b in prompt.blocks[:2]]
    if kinds != ["instruction", "history"]:
        raise ValueError(f"a stitched prompt starts with instruction + history blocks, not {kinds}")
    seg, canon, forced, owner = [], [], [], []
    pos = 0
    next_seg = HISTORY_SEG + 1
    for j, blk in enumerate(prompt.blocks):
        n = len(blk.tokens)
        start = canon_start(blk) if j >= 2 else None
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


def stitched_masks(real_pos, canon_pos, seg, forced, valid, sliding_window: int | None = None):
    """[B, T, S] masks of one forward pass that reproduces stitching, all through `attention_mask`:
    (block_mask: queries that are not forced vs keys at canonical positions,
     global_mask: forced queries vs keys at real positions). Arrays [B, T]."""
    block = attention_mask(canon_pos, seg, canon_pos, seg, valid, sliding_window) & ~forced[:, :, None]
    glob = attention_mask(real_pos, jnp.full_like(seg, SEG_GLOBAL), real_pos, seg, valid,
                          sliding_window) & forced[:, :, None]
    return block, glob
