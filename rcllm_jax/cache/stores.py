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
    tokens: tuple[int, ...]  # instruction + history block tokens (the entry's key once computed)
    pages: list[int]
    users: set = dataclasses.field(default_factory=set)  # users whose latest prefix this is
    pins: int = 0  # leases held on it (requests of the running step): never evicted while > 0


class UserStore:
    """Instruction + history prefix KV in pool pages, keyed by the prefix's content (its tokens),
    LRU under a page budget; each user points at its latest prefix.

    `ensure` makes a prefix present, computing only what is missing: nothing on a hit (any user's
    entry with the same tokens), the new tokens when the user's latest prefix grew by appending
    (extended in place when no other request or user holds it), the whole prefix otherwise.
    With `pin=True` it is a lease: the entry is kept (never evicted, never extended in place)
    until `release`, so every request of a serving step reads exactly the prefix it was built
    from, whatever the other requests of the step (the same user with another history included)
    did to the store.
    """

    def __init__(self, pool: KVPool, alloc: PageAllocator, budget_pages: int | None = None):
        self.pool, self.alloc = pool, alloc
        self.budget = budget_pages or alloc.num_pages
        self.entries: collections.OrderedDict[tuple[int, ...], UserEntry] = collections.OrderedDict()
        self.latest: dict = {}  # user id (an opaque string) -> its latest prefix's tokens (a key of `entries`)
        self.versions: dict = {}  # user id -> the history version its latest prefix was computed from
        self.stats = collections.Counter()

    @property
    def users(self) -> dict:
        """user id -> the entry of its latest prefix (LRU order of the entries)."""
        rank = {k: j for j, k in enumerate(self.entries)}
        return {u: self.entries[k] for u, k in sorted(self.latest.items(), key=lambda x: rank[x[1]])}

    def _drop(self, key):
        e = self.entries.pop(key)
        self.alloc.release(e.pages)
        for u in e.users:
            if self.latest.get(u) == key:
                del self.latest[u]
                self.versions.pop(u, None)

    def _pages_for(self, entry: UserEntry, length: int):
        need = -(-length // PAGE) - len(entry.pages)
        while need > 0:
            used = self.alloc.num_pages - self.alloc.free_pages
            page = self.alloc.alloc() if used < self.budget else None
            if page is None:
                victim = next((k for k, e in self.entries.items() if e is not entry and not e.pins), None)
                if victim is None:
                    raise MemoryError(f"user store budget ({self.budget} pages) too small for the prefixes leased "
                                      f"now ({sum(1 for e in self.entries.values() if e.pins)} held by the running "
                                      "step) and one more")
                self._drop(victim)
                self.stats["evictions"] += 1
                continue
            entry.pages.append(page)
            need -= 1

    def slots(self, user_id) -> np.ndarray:
        """Pool slots of the user's latest prefix."""
        e = self.entries[self.latest[str(user_id)]]
        return self.alloc.slots(e.pages, len(e.tokens))

    def slots_of(self, tokens) -> np.ndarray:
        """Pool slots of the prefix with exactly these tokens (KeyError when it is not stored)."""
        e = self.entries.get(tuple(int(t) for t in tokens))
        if e is None:
            raise KeyError("no cached user prefix with this prompt's instruction + history "
                           "(bring it up to date first: Engine.update_user)")
        return self.alloc.slots(e.pages, len(e.tokens))

    def _link(self, user_id, key, version):
        user_id = str(user_id)  # opaque: 7 and "7" are one user, "007" another
        old = self.latest.get(user_id)
        if old is not None and old != key and old in self.entries:
            prev = self.entries[old]
            prev.users.discard(user_id)
            if not prev.users and not prev.pins:  # nobody's prefix any more
                self._drop(old)
        self.latest[user_id] = key
        self.entries[key].users.add(user_id)
        if version is None:
            self.versions.pop(user_id, None)
        else:
            self.versions[user_id] = version

    def ensure(self, params: Params, cfg: ModelConfig, user_id, tokens: tuple[int, ...], *, pin: bool = False,
               version: int | None = None) -> int:
        """Make the prefix with these tokens present and the user's latest; returns how many tokens
        were computed. pin: lease it (until `release`). version: the history version it stands for."""
        tokens, user_id = tuple(int(t) for t in tokens), str(user_id)
        e = self.entries.get(tokens)
        if e is not None:
            self.entries.move_to_end(tokens)
            self.stats["hits"] += 1
            e.pins += pin
            self._link(user_id, tokens, version)
            return 0
        old = self.entries.get(self.latest.get(user_id, ()))
        if (old is not None and not old.pins and old.users <= {user_id} and len(old.tokens) < len(tokens)
                and tokens[:len(old.tokens)] == old.tokens):
            del self.entries[old.tokens]  # extended in place: rekeyed once computed
            e, keep = old, len(old.tokens)
            self.stats["extensions"] += 1
        else:
            e, keep = UserEntry(tokens=(), pages=[]), 0
            self.stats["misses"] += 1
        e.pins += 1  # not a victim of its own page allocation
        try:
            self._pages_for(e, len(tokens))
            slots = self.alloc.slots(e.pages, len(tokens))
            for a in range(keep, len(tokens), EXTEND_CHUNK):  # chunked: a few programs for any history
                self._extend_chunk(params, cfg, slots[:a], tokens[a:a + EXTEND_CHUNK], slots[a:a + EXTEND_CHUNK])
        except BaseException:
            self.alloc.release(e.pages)
            for u in e.users:
                self.latest.pop(u, None)
                self.versions.pop(u, None)
            raise
        e.pins -= 1 - pin
        e.tokens = tokens
        self.entries[tokens] = e
        self._link(user_id, tokens, version)
        return len(tokens) - keep

    def release(self, tokens):
        """End a lease taken by `ensure(..., pin=True)` on the prefix with these tokens."""
        key = tuple(int(t) for t in tokens)
        e = self.entries[key]
        if e.pins < 1:
            raise RuntimeError("release of a user prefix that is not leased")
        e.pins -= 1
        if not e.pins and not e.users:
            self._drop(key)

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
        """([[{user id: history version or None}, prefix tokens]] in LRU order (oldest first), k, v:
        their KV concatenated [L, u, K, H] on the host; u >= 1: an empty store exports the scratch
        slot). Only prefixes that are some user's latest are exported (`export_pages`, gathered into
        one host array each)."""
        index, pages = self.export_pages()
        shape = list(self.pool.k.shape)
        shape[1] = max(1, sum(len(toks) for _, toks in index))
        k, v = np.zeros(shape, self.pool.k.dtype), np.zeros(shape, self.pool.v.dtype)
        off = 0
        for pk, pv in pages:
            rows = pk.shape[1]
            k[:, off:off + rows], v[:, off:off + rows] = pk, pv
            off += rows
        return index, k, v

    def export_pages(self):
        """(the index `export` returns, an iterator of host (k, v) [L, rows, K, H]: every exported
        prefix's rows in index order, a page at a time). A streamed save holds one page on the host,
        never the store; copied out by one compiled slice per page."""
        index, held = [], []
        for key, e in self.entries.items():
            owners = {str(u): self.versions.get(u) for u in sorted(e.users, key=str) if self.latest.get(u) == key}
            if owners:
                index.append([owners, [int(t) for t in e.tokens]])
                held.append(e)

        def pages():
            for e in held:
                for j, page in enumerate(e.pages):
                    rows = min(PAGE, len(e.tokens) - j * PAGE)
                    if rows <= 0:
                        break
                    pk, pv = jax.device_get(_page(self.pool.k, self.pool.v, self.alloc.first_slot + page * PAGE))
                    yield pk[:, :rows], pv[:, :rows]
        return index, pages()

    def pages_needed(self, index) -> int:
        """Pages `load` of this exported index takes."""
        return sum(-(-len(toks) // PAGE) for _, toks in index)

    def load(self, index, rows, keep=None):
        """Replace the whole store by exported prefixes (`export`'s index; an entry's owners are a
        {user: version} map, or one user id in snapshots before content keys). rows(off, n): (k, v)
        [L, n, K, H] of the n saved rows from row `off` (the prefixes concatenated in index order).
        keep(user, version): whether a saved owner still stands (its history unchanged); a prefix
        nobody keeps is not loaded (nor read). Refused (MemoryError, nothing changed) when the budget
        cannot hold them."""
        owners_of = [{str(o): None} if not isinstance(o, dict) else o for o, _ in index]
        if keep is not None:
            owners_of = [{u: ver for u, ver in o.items() if keep(u, ver)} for o in owners_of]
        need = self.pages_needed([(o, toks) for o, (_, toks) in zip(owners_of, index) if o])
        if need > min(self.budget, self.alloc.num_pages):
            raise MemoryError(f"the saved user prefixes need {need} pages; this user store holds {self.budget}")
        for key in list(self.entries):
            self._drop(key)
        off = 0
        for owners, (_, toks) in zip(owners_of, index):
            n = len(toks)
            if owners:
                k, v = rows(off, n)
                for u, ver in owners.items():  # the first writes the KV, the others share its entry
                    self.restore_user(u, tuple(toks), k, v, version=ver)
            off += n

    def restore_user(self, user_id, tokens: tuple[int, ...], k, v, version: int | None = None):
        """Put a saved prefix ([L, n, K, H] KV of `tokens`) back as the user's latest, most recently used."""
        tokens = tuple(int(t) for t in tokens)
        if tokens not in self.entries:  # (an entry with these tokens holds this very KV already)
            e = UserEntry(tokens=(), pages=[], pins=1)
            try:
                self._pages_for(e, len(tokens))
            except BaseException:
                self.alloc.release(e.pages)
                raise
            self.pool.scatter(self.alloc.slots(e.pages, len(tokens)), k, v)
            e.tokens, e.pins = tokens, 0
            self.entries[tokens] = e
        self.entries.move_to_end(tokens)
        self._link(user_id, tokens, version)


EXTEND_CHUNK = 64  # tokens of a user prefix computed per program call (chunked prefill)


@jax.jit
def _page(pool_k, pool_v, start):
    """The PAGE rows of the pool from slot `start` (one program for every page)."""
    return (jax.lax.dynamic_slice_in_dim(pool_k, start, PAGE, axis=1),
            jax.lax.dynamic_slice_in_dim(pool_v, start, PAGE, axis=1))


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

    def page_hashes(self, tokens):
        """The chain hash of each full page of `tokens` (a page's key: it and every page before it)."""
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
        for h in self.page_hashes(tokens[:len(tokens) - 1]):
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
        for i, h in enumerate(self.page_hashes(tokens)):
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
