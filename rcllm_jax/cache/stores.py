"""Block stores (items, glue), the user store and the prefix cache, all backed by one `KVPool`."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.buckets import bucket
from rcllm_jax.cache.keys import block_key, chain_hash
from rcllm_jax.cache.pool import PAGE, KVPool, PageAllocator
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import KVCache, Params, forward


@dataclasses.dataclass(frozen=True)
class BlockEntry:
    key: str
    slot: int  # first pool slot
    length: int
    canon_start: int  # position of the block's first token when it was encoded


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_after(params, ctx: KVCache, tokens, positions, valid, *, cfg: ModelConfig):
    """KV of a batch of blocks [B, n], each encoded after the same context (ctx has B = 1)."""
    b = tokens.shape[0]
    ctx_b = jax.tree.map(lambda a: jnp.broadcast_to(a, (a.shape[0], b) + a.shape[2:]) if a.ndim == 5
                         else jnp.broadcast_to(a, (b,) + a.shape[1:]), ctx)
    _, kv = forward(params, tokens, positions, cfg=cfg, valid=valid, cache=ctx_b)
    return kv.k, kv.v  # [L, B, n, K, H]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_prefix(params, tokens, valid, *, cfg: ModelConfig):
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return forward(params, tokens, pos, cfg=cfg, valid=valid)[1]


def padded_batch(blocks, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as one [batch, n] array (n: their longest length's bucket) and its valid mask."""
    n = bucket(max(len(t) for t in blocks), 8)
    toks = np.zeros((batch, n), np.int32)
    valid = np.zeros((batch, n), bool)
    for row, t in enumerate(blocks):
        toks[row, :len(t)] = t
        valid[row, :len(t)] = True
    return toks, valid


class BlockStore:
    """KV of reusable blocks (item blocks, and label / question glue), each encoded once after a
    canonical context, in the pool's block region. Content-addressed: key = hash(model
    fingerprint, context tokens, block tokens), so a block of another model or text never matches."""

    def __init__(self, pool: KVPool, fingerprint: str, context: tuple[int, ...], first_slot: int, capacity: int):
        self.pool, self.fingerprint, self.context = pool, fingerprint, tuple(context)
        self.entries: dict[str, BlockEntry] = {}
        self.next_slot, self.end_slot = first_slot, first_slot + capacity

    def key(self, tokens) -> str:
        return block_key(self.fingerprint, self.context, tuple(int(t) for t in tokens))

    def build(self, params: Params, cfg: ModelConfig, blocks, batch: int = 32, progress=None):
        """Encode every block (a sequence of token tuples) not stored yet, in batches of similar length."""
        ctx_tokens = np.asarray([self.context], np.int32)
        ctx = _encode_prefix(params, jnp.asarray(ctx_tokens), jnp.ones(ctx_tokens.shape, bool), cfg=cfg)
        c = len(self.context)
        todo = {}
        for toks in blocks:
            k = self.key(toks)
            if k not in self.entries and toks:
                todo[k] = tuple(toks)
        need = sum(len(t) for t in todo.values())
        if self.next_slot + need > self.end_slot:
            raise MemoryError(f"block region full: {need} more tokens, {self.end_slot - self.next_slot} free")
        order = sorted(todo, key=lambda k: len(todo[k]))
        for s in range(0, len(order), batch):
            chunk = order[s:s + batch]
            toks, valid = padded_batch([todo[k] for k in chunk], batch)
            n = toks.shape[1]
            pos = np.broadcast_to(c + np.arange(n, dtype=np.int32), (batch, n))
            kk, vv = _encode_after(params, ctx, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(valid), cfg=cfg)
            for row, k in enumerate(chunk):
                length = len(todo[k])
                self.pool.write(self.next_slot, kk[:, row, :length], vv[:, row, :length])
                self.entries[k] = BlockEntry(k, self.next_slot, length, c)
                self.next_slot += length
            if progress is not None:
                progress(len(chunk))

    def lookup(self, tokens) -> BlockEntry | None:
        return self.entries.get(self.key(tokens))


@dataclasses.dataclass
class UserEntry:
    tokens: tuple[int, ...]  # instruction + history block tokens
    pages: list[int]


class UserStore:
    """Per-user exact prefix KV (instruction + history block) in pool pages, LRU under a page budget.

    `ensure` returns the slots of a user's prefix, computing only what is missing: nothing on a hit,
    the new tokens when the history block grew by appending, the whole history block otherwise.
    """

    def __init__(self, pool: KVPool, alloc: PageAllocator, budget_pages: int | None = None):
        self.pool, self.alloc = pool, alloc
        self.budget = budget_pages or alloc.num_pages
        self.users: collections.OrderedDict[int, UserEntry] = collections.OrderedDict()
        self.stats = collections.Counter()

    def _pages_for(self, entry: UserEntry, length: int):
        need = -(-length // PAGE) - len(entry.pages)
        while need > 0:
            used = self.alloc.num_pages - self.alloc.free_pages
            page = self.alloc.alloc() if used < self.budget else None
            if page is None:
                victim = next((u for u in self.users if self.users[u] is not entry), None)
                if victim is None:
                    raise MemoryError("user store budget too small for one user's prefix")
                self.alloc.release(self.users.pop(victim).pages)
                self.stats["evictions"] += 1
                continue
            entry.pages.append(page)
            need -= 1

    def slots(self, user_id: int) -> np.ndarray:
        e = self.users[user_id]
        return self.alloc.slots(e.pages, len(e.tokens))

    def ensure(self, params: Params, cfg: ModelConfig, user_id: int, tokens: tuple[int, ...]) -> int:
        """Make the user's prefix KV equal `tokens`; returns how many tokens were computed."""
        tokens = tuple(tokens)
        e = self.users.get(user_id)
        if e is not None and e.tokens == tokens:
            self.users.move_to_end(user_id)
            self.stats["hits"] += 1
            return 0
        if e is not None and len(e.tokens) < len(tokens) and tokens[:len(e.tokens)] == e.tokens:
            keep = len(e.tokens)
            self.stats["extensions"] += 1
        else:
            if e is not None:
                self.alloc.release(e.pages)
                del self.users[user_id]
            e = UserEntry(tokens=(), pages=[])
            keep = 0
            self.stats["misses"] += 1
        self.users[user_id] = e
        self.users.move_to_end(user_id)
        self._pages_for(e, len(tokens))
        new = tokens[keep:]
        pb, tb = bucket(keep, 16) if keep else 0, bucket(len(new), 16)
        old_slots = np.zeros(pb, np.int32)
        old_slots[:keep] = self.alloc.slots(e.pages, keep) if keep else []
        k, v = _extend(params, self.pool.k, self.pool.v, jnp.asarray(old_slots), keep,
                       jnp.asarray(np.pad(np.asarray(new, np.int32), (0, tb - len(new)))), len(new), cfg=cfg)
        self.pool.scatter(self.alloc.slots(e.pages, len(tokens))[keep:], k[:, :len(new)], v[:, :len(new)])
        e.tokens = tokens
        return len(new)


    def restore_user(self, user_id: int, tokens: tuple[int, ...], k, v):
        """Put a saved prefix ([L, n, K, H] KV of `tokens`) back, as most recently used."""
        e = self.users.pop(user_id, None)
        if e is not None:
            self.alloc.release(e.pages)
        e = UserEntry(tokens=(), pages=[])
        self.users[user_id] = e
        self._pages_for(e, len(tokens))
        self.pool.scatter(self.alloc.slots(e.pages, len(tokens)), k, v)
        e.tokens = tuple(tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _extend(params, pool_k, pool_v, old_slots, n_old, new_tokens, n_new, *, cfg: ModelConfig):
    """KV of new_tokens at positions n_old.. given the KV of the first n_old tokens (pool slots)."""
    pb, tb = old_slots.shape[0], new_tokens.shape[0]
    cache = KVCache(k=pool_k[:, old_slots][:, None], v=pool_v[:, old_slots][:, None],
                    pos=jnp.arange(pb, dtype=jnp.int32)[None], seg=jnp.zeros((1, pb), jnp.int32),
                    valid=(jnp.arange(pb) < n_old)[None])
    pos = (n_old + jnp.arange(tb, dtype=jnp.int32))[None]
    _, kv = forward(params, new_tokens[None], pos, cfg=cfg, valid=(jnp.arange(tb) < n_new)[None], cache=cache)
    return kv.k[:, 0], kv.v[:, 0]  # [L, tb, K, H]


class PrefixCache:
    """vLLM-style automatic prefix caching: full 16-token pages keyed by hash(parent hash, tokens),
    LRU eviction under a page budget. Only a chain of hits from the first token is reusable."""

    def __init__(self, pool: KVPool, alloc: PageAllocator, fingerprint: str, budget_pages: int | None = None):
        self.pool, self.alloc, self.root = pool, alloc, fingerprint
        self.budget = budget_pages or alloc.num_pages
        self.pages: collections.OrderedDict[str, int] = collections.OrderedDict()  # hash -> page
        self.stats = collections.Counter()

    def _hashes(self, tokens):
        h, out = self.root, []
        for s in range(0, len(tokens) - len(tokens) % PAGE, PAGE):
            h = chain_hash(h, tuple(int(t) for t in tokens[s:s + PAGE]))
            out.append(h)
        return out

    def lookup(self, tokens) -> tuple[list[int], int]:
        """Pages of the longest cached chain from the start, and the tokens they cover. The last
        token is never served from cache (its logits must be computed)."""
        pages = []
        for h in self._hashes(tokens[:len(tokens) - 1]):
            page = self.pages.get(h)
            if page is None:
                break
            self.pages.move_to_end(h)
            pages.append(page)
        self.stats["hit_tokens"] += len(pages) * PAGE
        self.stats["lookup_tokens"] += len(tokens)
        return pages, len(pages) * PAGE

    def insert(self, tokens, kv_k, kv_v, start: int):
        """Store every full page of `tokens` not cached yet; kv_k/v [L, n, K, H] hold the KV of
        tokens[start:start + n]."""
        for i, h in enumerate(self._hashes(tokens)):
            s = i * PAGE
            if h in self.pages or s < start or s + PAGE > start + kv_k.shape[1]:
                continue
            used = self.alloc.num_pages - self.alloc.free_pages
            if used >= self.budget or self.alloc.free_pages == 0:
                _, old = self.pages.popitem(last=False)
                self.alloc.release([old])
                self.stats["evictions"] += 1
            page = self.alloc.alloc()
            self.pool.write(self.alloc.first_slot + page * PAGE, kv_k[:, s - start:s - start + PAGE],
                            kv_v[:, s - start:s - start + PAGE])
            self.pages[h] = page
