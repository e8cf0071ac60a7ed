"""The user store (per-user instruction + history prefixes) and the prefix cache (the vLLM-style
baseline), both in pages of one replicated `KVPool`. Reusable blocks live in
`rcllm_jax.cache.block_store`."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.buckets import bucket, coarse_bucket, coarse_buckets
from rcllm_jax.cache.keys import chain_hash
from rcllm_jax.cache.pool import PAGE, KVPool, PageAllocator
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import KVCache, Params, forward


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
        slots = self.alloc.slots(e.pages, len(tokens))
        for a in range(keep, len(tokens), EXTEND_CHUNK):  # chunked: a few programs for any history
            self._extend_chunk(params, cfg, slots[:a], tokens[a:a + EXTEND_CHUNK], slots[a:a + EXTEND_CHUNK])
        e.tokens = tokens
        return len(new)

    def _extend_chunk(self, params: Params, cfg: ModelConfig, old_slots, new_tokens, new_slots):
        """Compute the KV of up to EXTEND_CHUNK tokens after the prefix at `old_slots` and write it
        to `new_slots`. Shapes: the prefix's slots padded to a power of two (they are only read),
        the chunk to EXTEND_CHUNK rows (padding rows land in the scratch slot 0)."""
        keep, n = len(old_slots), len(new_tokens)
        old = np.zeros(coarse_bucket(keep) if keep else 0, np.int32)
        old[:keep] = old_slots
        toks, dst = np.zeros(EXTEND_CHUNK, np.int32), np.zeros(EXTEND_CHUNK, np.int32)
        toks[:n], dst[:n] = new_tokens, new_slots
        k, v = _extend(params, self.pool.k, self.pool.v, jnp.asarray(old), keep, jnp.asarray(toks), n, cfg=cfg)
        self.pool.scatter(dst, k, v)

    def warm(self, params: Params, cfg: ModelConfig, max_tokens: int) -> int:
        """Compile every program `ensure` runs for prefixes of up to max_tokens tokens (each
        prefix bucket with one chunk, written to the scratch slot: nothing stored changes).
        Returns how many were run."""
        olds = [0] + coarse_buckets(1, max(1, max_tokens - 1))
        for pb in olds:
            self._extend_chunk(params, cfg, np.zeros(min(pb, max_tokens - 1), np.int32), [0], [0])
        jax.block_until_ready((self.pool.k, self.pool.v))
        return len(olds)

    def export(self):
        """([[user id, prefix tokens]] in LRU order (oldest first), k, v: their KV concatenated
        [L, u, K, H]; u >= 1: an empty store exports the scratch slot)."""
        index, slots = [], []
        for uid, e in self.users.items():
            index.append([uid if isinstance(uid, str) else int(uid), [int(t) for t in e.tokens]])
            slots.append(self.slots(uid))
        sl = np.concatenate(slots) if slots else np.zeros(1, np.int32)
        return index, self.pool.k[:, sl], self.pool.v[:, sl]

    def load(self, index, k, v):
        """Replace the whole store by exported prefixes (`export`'s output)."""
        for e in self.users.values():
            self.alloc.release(e.pages)
        self.users.clear()
        off = 0
        for uid, toks in index:
            n = len(toks)
            self.restore_user(uid, tuple(toks), k[:, off:off + n], v[:, off:off + n])
            off += n

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


EXTEND_CHUNK = 64  # tokens of a user prefix computed per program call (chunked prefill)


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

    def lookup(self, tokens, count: bool = True) -> tuple[list[int], int]:
        """Pages of the longest cached chain from the start, and the tokens they cover. The last
        token is never served from cache (its logits must be computed). count=False: a look that
        is not a request (event-time warming), left out of the hit statistics."""
        pages = []
        for h in self._hashes(tokens[:len(tokens) - 1]):
            page = self.pages.get(h)
            if page is None:
                break
            self.pages.move_to_end(h)
            pages.append(page)
        if count:
            self.stats["hit_tokens"] += len(pages) * PAGE
            self.stats["lookup_tokens"] += len(tokens)
        return pages, len(pages) * PAGE

    def insert(self, tokens, kv_k, kv_v, start: int, n: int | None = None, row0: int = 0):
        """Store every full page of `tokens` not cached yet; rows row0 + j of kv_k/v [L, R, K, H]
        hold the KV of tokens[start + j] for j < n (default: every row from row0). The new pages
        are copied by one compiled gather + scatter whose row count is bucketed (padding rows go
        to the scratch slot), so requests of new lengths compile nothing (the server's prefix
        baselines)."""
        n = kv_k.shape[1] - row0 if n is None else n
        new = {}  # page -> first row of kv_k holding it
        for i, h in enumerate(self._hashes(tokens)):
            s = i * PAGE
            if h in self.pages or s < start or s + PAGE > start + n:
                continue
            used = self.alloc.num_pages - self.alloc.free_pages
            if used >= self.budget or self.alloc.free_pages == 0:
                _, old = self.pages.popitem(last=False)
                self.alloc.release([old])
                new.pop(old, None)  # a page of this very insert, evicted again (a budget below one prompt)
                self.stats["evictions"] += 1
            page = self.alloc.alloc()
            new[page] = row0 + s - start
            self.pages[h] = page
        if not new:
            return
        m = bucket(len(new), 1)
        src = np.zeros((m, PAGE), np.int32)
        dst = np.zeros((m, PAGE), np.int32)  # padding: row 0 into the scratch slot 0
        src[:len(new)] = np.asarray(list(new.values()), np.int32)[:, None] + np.arange(PAGE)
        dst[:len(new)] = (self.alloc.first_slot + np.asarray(list(new), np.int32) * PAGE)[:, None] + np.arange(PAGE)
        self.pool.copy_rows(kv_k, kv_v, src.ravel(), dst.ravel())
