"""The retrieval stage: a user's top-K candidates from the whole catalog, for the LLM to rerank.

`ItemKNN` is item-to-item collaborative filtering: two items are similar when the same users
interacted with both. Built from training sequences only:

  C[i, j] = number of users whose training sequence holds both i and j (i != j)
  sim(i, j) = C[i, j] / sqrt(n_i * n_j)          (cosine of the binary user vectors)

Each item keeps its `neighbours` most similar items (a sparse table [items, M]). A user's score
for item j is sum_a decay^a * sim(h_a, j) over the user's `recent` latest history items, h_0 the
newest; items of the history are never returned; items no history item links to follow in order of training
popularity, so a request always gets K candidates. A user with no history gets the K most popular
items (the documented cold-start fallback). Retrieval is a gather and a scatter-add over
recent x M entries: well under a millisecond for ML-100k.

Defaults measured on ML-100k (leave-one-out test targets, all 943 users, history before the
target, fit on the training part): recall@20 / @50 = 0.231 / 0.352 with 50 neighbours and decay
0.5, vs 0.124 / 0.248 without recency decay (recent 20), and 0.080 / 0.141 for popularity.

It also keeps a **follow table**, the sequential signal co-occurrence lacks: F[i, j] = how often
j comes within the next `window` items after i in a training sequence, divided by (the number of
such successors of i + `smoothing`), the `neighbours` largest per item. `candidate_features` turns
both tables into per-candidate features for the reranker's head (`engine/ranking_head.py`).
Measured on ML-100k (validation targets within the retrieved top-20, a linear listwise reranker
over these features): the follow score is what moves NDCG@10 past the retriever's own order; the
other co-occurrence variants, popularity, genre overlap and release year added nothing.

**The content path** (fitted when the items' texts are given, as every launcher does): items
nobody interacted with in the training data (a new item) have no neighbours, so kNN cannot propose
them. Each item's prompt text is a TF-IDF vector (words and years of its title, its genres; L2
normalised); a user's content profile is the decayed sum of the vectors of the `content_recent`
latest history items (decay `content_decay`), and `content_scores` is the cosine of every item to
it. `retrieve` gives the cold items (no training interaction) some of the K slots, as many as the
user's recent history asks for: m = ceil(cold_share * K * f), f the share of the `cold_recent`
latest history items that are cold themselves (a user watching new items gets new items); the m
cold items of best content score replace the tail of kNN's list. A user whose recent items are
all known keeps kNN's list unchanged. Chosen on ML-100k's cold slices (`data/slices.py`,
test positions 1-3, `launch/bench_retrieval.py`, BENCHMARKS.md): recall@20 on new-item targets
0.000 -> 0.110, warm targets 0.275 -> 0.271, all 0.257 -> 0.262 (cold_share 0.5, cold_recent 10);
reserving fixed slots or adding the two scores lost more warm recall for less (the sweep there).
A ranking head may weigh two content features of each candidate too (`FEATURES`: its content score
relative to the best candidate's, and whether it is cold), so a cold candidate is not ranked last
for want of interactions (`launch/train.py --side_features`).

Persisted as one `.npz` (`save` / `load`) keyed by a digest of the training data and item texts
it was built from, so a retriever of other data is refused.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = 3
COLD_SHARE = 0.5  # the content path's default: up to half of the K slots for cold items (module docstring)
# every feature the retriever computes of a candidate for the reranker (`ItemKNN.candidate_features`);
# a head names the ones it weighs, in its order (`SlotHead.side_features`)
FEATURES = ("knn_relative", "knn_log", "follow_relative", "content_relative", "cold")
CANDIDATE_FEATURES = FEATURES[:3]  # the collaborative ones: the default head's (train.py --side_features)
KNN_LOG_FLOOR = 1e-3  # the knn_log feature is log(kNN score + this)
# the interaction-borne features of a candidate no history item links to (a cold item's): what
# `train/head_fit.drop_features` writes; the content score is the item's own text's, so it stays
UNLINKED = {"knn_relative": 0.0, "knn_log": float(np.log(KNN_LOG_FLOOR)), "follow_relative": 0.0, "cold": 1.0}
UNLINKED_FEATURES = tuple(UNLINKED[n] for n in CANDIDATE_FEATURES)


def check_features(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a tuple, each one of `FEATURES` and none twice (a ValueError naming the problem)."""
    names = tuple(names)
    unknown = [n for n in names if n not in FEATURES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"candidate features must be distinct names among {', '.join(FEATURES)}; got {list(names)}")
    return names


def data_digest(sequences: Iterable[Sequence[int]], item_ids: Sequence[int],
                texts: Sequence[str] | None = None) -> str:
    """Digest of the training sequences, the catalog and its item texts a retriever is built from."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(sorted(int(i) for i in item_ids), np.int64).tobytes())
    for s in sequences:
        h.update(np.asarray(list(s), np.int64).tobytes())
        h.update(b"|")
    for t in texts or ():
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()


def item_texts(ds, item_ids: Sequence[int] | None = None) -> list[str]:
    """The content path's text of each item (catalog order, or `item_ids`' order): the prompt's
    item text (a catalog's item_template, else MovieLens's title (year; genres))."""
    from rcllm_jax.data.prompt import movielens_text
    ids = sorted(ds.items) if item_ids is None else item_ids
    return [ds.items[i].text or movielens_text(ds.items[i]) for i in ids]


def content_vectors(texts: Sequence[str]):
    """[n, V] sparse L2-normalised TF-IDF vectors of the item texts (sublinear term frequency;
    words of two or more letters and numbers: titles, years, genres)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    if not any(t.strip() for t in texts):
        raise ValueError("no item has text for the content path")
    return TfidfVectorizer(sublinear_tf=True, dtype=np.float32).fit_transform(list(texts)).tocsr()


class RetrieverError(ValueError):
    """A retriever file that is missing, damaged, or built from other data."""


class ItemKNN:
    def __init__(self, item_ids, neighbours: np.ndarray, sims: np.ndarray, popularity: np.ndarray,
                 followers: np.ndarray, follow: np.ndarray, *, recent: int = 20, decay: float = 0.5,
                 follow_recent: int = 5, digest: str = "", content=None, content_recent: int = 20,
                 content_decay: float = 0.9, cold_share: float = COLD_SHARE, cold_recent: int = 10):
        """item_ids [n] (catalog order); neighbours [n, M] indices into item_ids (-1: none);
        sims [n, M] their similarities; popularity [n] training interactions; followers [n, M]
        and follow [n, M]: the follow table (the same layout); content: [n, V] sparse item
        vectors of the content path (None: kNN alone)."""
        self.item_ids = np.asarray(item_ids, np.int64)
        self.neighbours, self.sims = np.asarray(neighbours, np.int32), np.asarray(sims, np.float32)
        self.followers, self.follow = np.asarray(followers, np.int32), np.asarray(follow, np.float32)
        self.follow_recent = int(follow_recent)
        self.popularity = np.asarray(popularity, np.float64)
        self.recent, self.decay, self.digest = int(recent), float(decay), digest
        self.content = None if content is None else content.tocsr().astype(np.float32)
        if self.content is not None and self.content.shape[0] != len(self.item_ids):
            raise ValueError(f"{self.content.shape[0]} content vectors for {len(self.item_ids)} items")
        if not 0 <= cold_share <= 1:
            raise ValueError(f"cold_share must be in [0, 1], got {cold_share}")
        self.content_recent, self.content_decay = int(content_recent), float(content_decay)
        self.cold_share, self.cold_recent = float(cold_share), int(cold_recent)
        self.index = {int(i): j for j, i in enumerate(self.item_ids)}
        # popularity order, most popular first (ties by item id): the fill and the cold-start list
        self._by_popularity = np.lexsort((self.item_ids, -self.popularity))

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], item_ids: Sequence[int], *, neighbours: int = 50,
            recent: int = 20, decay: float = 0.5, window: int = 3, smoothing: float = 5.0,
            follow_recent: int = 5, texts: Sequence[str] | None = None, **content_kw) -> "ItemKNN":
        """Build from training sequences (oldest first); items outside `item_ids` are ignored.
        `texts` (one per item, in sorted `item_ids` order: `item_texts`) fits the content path."""
        import scipy.sparse as sp
        seqs = [list(s) for s in sequences]
        item_ids = sorted(int(i) for i in item_ids)
        index = {i: j for j, i in enumerate(item_ids)}
        rows, cols = [], []
        for u, s in enumerate(seqs):
            for j in {index[i] for i in s if i in index}:
                rows.append(u)
                cols.append(j)
        n = len(item_ids)
        x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(seqs), n))
        count = np.asarray(x.sum(axis=0)).ravel()  # n_i: users holding item i
        co = (x.T @ x).tocsr()  # C [n, n]
        co.setdiag(0)
        co.eliminate_zeros()
        m = max(1, min(neighbours, n - 1))
        norm = np.sqrt(np.maximum(count, 1.0))
        nb, sim = _top_per_row(co, m, lambda i, js, cs: cs / (norm[i] * norm[js]))
        src, dst = [], []  # (i, j): j within `window` items after i in one sequence
        for s in seqs:
            idx = [index[i] for i in s if i in index]
            for a in range(len(idx)):
                for b in range(a + 1, min(a + 1 + window, len(idx))):
                    if idx[a] != idx[b]:
                        src.append(idx[a])
                        dst.append(idx[b])
        fo = sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(n, n))  # duplicates summed
        out_deg = np.asarray(fo.sum(axis=1)).ravel() + smoothing
        fnb, fw = _top_per_row(fo, m, lambda i, js, cs: cs / out_deg[i])
        if texts is not None and len(texts) != n:
            raise ValueError(f"{len(texts)} item texts for {n} items")
        return cls(item_ids, nb, sim, count, fnb, fw, recent=recent, decay=decay, follow_recent=follow_recent,
                   digest=data_digest(seqs, item_ids, texts),
                   content=None if texts is None else content_vectors(texts), **content_kw)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def scores(self, history: Sequence[int]) -> np.ndarray:
        """[n] recency-weighted similarity of every catalog item to the user's `recent` latest items."""
        return self._spread(history, self.recent, self.neighbours, self.sims)

    def follow_scores(self, history: Sequence[int]) -> np.ndarray:
        """[n] how strongly each catalog item follows the user's `follow_recent` latest items
        (follow table, the same recency decay)."""
        return self._spread(history, self.follow_recent, self.followers, self.follow)

    def content_scores(self, history: Sequence[int]) -> np.ndarray:
        """[n] cosine of every item's content vector to the user's content profile (the decayed
        sum over the `content_recent` latest history items, newest weighing most); zeros without
        a content path or a known history item."""
        out = np.zeros(self.num_items, np.float64)
        if self.content is None:
            return out
        newest_first = [self.index.get(int(h)) for h in list(history)[-self.content_recent:]][::-1]
        rows = [(a, j) for a, j in enumerate(newest_first) if j is not None]
        if not rows:
            return out
        age, idx = (np.asarray(x) for x in zip(*rows))
        profile = np.asarray(self.content[idx].T @ (self.content_decay ** age)).ravel()
        norm = np.linalg.norm(profile)
        return out if norm == 0 else np.asarray(self.content @ (profile / norm), np.float64).ravel()

    def with_cold_share(self, cold_share: float) -> "ItemKNN":
        """This retriever (its tables shared, not copied) giving cold items `cold_share` of the slots
        instead (0: item-kNN's own list)."""
        if not 0 <= cold_share <= 1:
            raise ValueError(f"cold_share must be in [0, 1], got {cold_share}")
        other = copy.copy(self)
        other.cold_share = float(cold_share)
        return other

    def cold_slots(self, history: Sequence[int], k: int) -> int:
        """How many of k retrieved slots go to cold items: ceil(cold_share * k * f), f the share of
        the `cold_recent` latest history items with no training interaction (0 without a content
        path or a history)."""
        if self.content is None or not len(history):
            return 0
        recent = [self.index.get(int(h)) for h in list(history)[-self.cold_recent:]]
        f = float(np.mean([j is not None and self.popularity[j] == 0 for j in recent]))
        return min(k, math.ceil(self.cold_share * k * f - 1e-9))

    def _spread(self, history, recent: int, table: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum over the `recent` newest history items h_a (a = 0 newest) of decay^a * weights[h_a, j]."""
        out = np.zeros(self.num_items, np.float64)
        newest_first = [int(h) for h in list(history)[-recent:]][::-1]
        rows = [(a, self.index[h]) for a, h in enumerate(newest_first) if h in self.index]
        if rows:
            age, idx = (np.asarray(x) for x in zip(*rows))
            nb = table[idx]
            w = weights[idx].astype(np.float64) * (self.decay ** age)[:, None]
            ok = nb >= 0
            np.add.at(out, nb[ok], w[ok])
        return out

    def candidate_features(self, history: Sequence[int], candidates: Sequence[int],
                           names: Sequence[str] = CANDIDATE_FEATURES) -> np.ndarray:
        """[K, len(names)] the reranker's features of each candidate (`FEATURES`, in the order of
        `names`): knn_relative = its kNN score over the best candidate's; knn_log = log(kNN score +
        1e-3); follow_relative = its follow score over the best candidate's; content_relative = its
        content score (`content_scores`) over the best candidate's; cold = 1 for an item with no
        training interaction. A relative feature is 0 where no candidate scores; an unknown
        candidate scores 0 and is cold."""
        names = check_features(names)
        idx = np.array([self.index.get(int(c), -1) for c in candidates], np.int64).reshape(-1)
        ok = idx >= 0

        def at(s):
            return np.where(ok, s[np.maximum(idx, 0)], 0.0)

        def rel(x):
            return x / x.max() if len(x) and x.max() > 0 else np.zeros_like(x)
        knn = at(self.scores(history)) if {"knn_relative", "knn_log"} & set(names) else None
        columns = {
            "knn_relative": lambda: rel(knn),
            "knn_log": lambda: np.log(knn + KNN_LOG_FLOOR),
            "follow_relative": lambda: rel(at(self.follow_scores(history))),
            "content_relative": lambda: rel(np.maximum(at(self.content_scores(history)), 0.0)),
            "cold": lambda: (at(self.popularity) == 0).astype(np.float64),  # an unknown id scores 0: cold
        }
        return np.stack([columns[n]() for n in names], axis=1).reshape(len(idx), len(names)).astype(np.float32)

    def retrieve(self, history: Sequence[int], k: int) -> tuple[tuple[int, ...], np.ndarray]:
        """(the top-k item ids, best first, never an item of `history`; their kNN scores). Items
        with no similarity follow by popularity (score 0); the last `cold_slots` of them go to
        the cold items of best content score (module docstring)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = self.scores(history)
        seen = np.zeros(self.num_items, bool)
        for h in history:
            j = self.index.get(int(h))
            if j is not None:
                seen[j] = True
        if self.num_items - seen.sum() < k:
            raise ValueError(f"only {self.num_items - int(seen.sum())} items outside the history; cannot retrieve {k}")
        rank = np.empty(self.num_items, np.int64)
        rank[self._by_popularity] = np.arange(self.num_items)  # tie-break: popularity, then id
        order = np.lexsort((rank, -s))
        order = order[~seen[order]][:k]
        m = self.cold_slots(history, k)
        if m:
            c = self.content_scores(history)
            cold = np.flatnonzero((self.popularity == 0) & ~seen)
            cold = cold[np.lexsort((cold, -c[cold]))]
            keep = order[:k - m]
            extra = cold[~np.isin(cold, keep)][:m]
            fill = order[k - m:][~np.isin(order[k - m:], extra)][:m - len(extra)]
            order = np.concatenate([keep, extra, fill])
        return tuple(int(i) for i in self.item_ids[order]), s[order]

    def coaccess_requests(self, sequences: Iterable[Sequence[int]], k: int = 20,
                          per_sequence: int = 10) -> list[tuple[int, ...]]:
        """The co-access log of the retrieval stage: its top-k for each of the `per_sequence`
        latest prefixes of every sequence (the whole sequence included; at least one item long),
        the requests it would issue for those histories. The coaccess placement partitions what this returns
        (`parallel/placement.py`); give it training sequences only."""
        out = []
        for seq in sequences:
            seq = [int(i) for i in seq]
            for cut in range(max(1, len(seq) - per_sequence + 1), len(seq) + 1):
                if self.num_items - len(set(seq[:cut])) >= k:
                    out.append(self.retrieve(seq[:cut], k)[0])
        return out

    # --- persistence -------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the retriever as one .npz (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            content = {} if self.content is None else {
                "content_data": self.content.data, "content_indices": self.content.indices,
                "content_indptr": self.content.indptr, "content_columns": np.int64(self.content.shape[1])}
            np.savez(f, format=np.int64(FORMAT), item_ids=self.item_ids, neighbours=self.neighbours,
                     sims=self.sims, popularity=self.popularity, followers=self.followers, follow=self.follow,
                     recent=np.int64(self.recent), decay=np.float64(self.decay),
                     follow_recent=np.int64(self.follow_recent), content_recent=np.int64(self.content_recent),
                     content_decay=np.float64(self.content_decay), cold_share=np.float64(self.cold_share),
                     cold_recent=np.int64(self.cold_recent), digest=np.asarray(self.digest), **content)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, expect_digest: str | None = None) -> "ItemKNN":
        """Read a saved retriever; refused (RetrieverError) when damaged or, with expect_digest,
        built from other training data."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != FORMAT:
                    raise RetrieverError(f"retriever {path} has format {int(z['format'])}, expected {FORMAT}")
                content = None
                if "content_data" in z:
                    import scipy.sparse as sp
                    content = sp.csr_matrix((z["content_data"], z["content_indices"], z["content_indptr"]),
                                            shape=(len(z["item_ids"]), int(z["content_columns"])))
                r = cls(z["item_ids"], z["neighbours"], z["sims"], z["popularity"], z["followers"], z["follow"],
                        recent=int(z["recent"]), decay=float(z["decay"]), follow_recent=int(z["follow_recent"]),
                        digest=str(z["digest"]), content=content, content_recent=int(z["content_recent"]),
                        content_decay=float(z["content_decay"]), cold_share=float(z["cold_share"]),
                        cold_recent=int(z["cold_recent"]))
        except RetrieverError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure: a damaged file
            raise RetrieverError(f"retriever {path} is missing or damaged ({type(e).__name__}: {e})") from e
        n = len(r.item_ids)
        if any(t.shape != w.shape or t.shape[0] != n or (t >= n).any()
               for t, w in ((r.neighbours, r.sims), (r.followers, r.follow))):
            raise RetrieverError(f"retriever {path} is damaged (inconsistent arrays)")
        if expect_digest is not None and r.digest != expect_digest:
            raise RetrieverError(f"retriever {path} was built from other training data; rebuild it")
        return r


def _top_per_row(m, k: int, weigh) -> tuple[np.ndarray, np.ndarray]:
    """([n, k] column indices, [n, k] weights): each row's k largest weigh(i, cols, counts), best
    first, ties by column (deterministic); -1 / 0 where a row has fewer."""
    n = m.shape[0]
    cols, vals = np.full((n, k), -1, np.int32), np.zeros((n, k), np.float32)
    for i in range(n):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        js, cs = m.indices[lo:hi], m.data[lo:hi]
        if not len(js):
            continue
        w = weigh(i, js, cs)
        top = np.lexsort((js, -w))[:k]
        cols[i, :len(top)], vals[i, :len(top)] = js[top], w[top]
    return cols, vals


def load_or_fit(path, sequences, item_ids, *, save: bool = True, texts: Sequence[str] | None = None,
                **kw) -> tuple[ItemKNN, str]:
    """The retriever saved at `path` if it was built from exactly these sequences, catalog and item
    texts, else a new one fitted (and saved there, unless save=False: the caller saves it once the
    directory is known to be its own). Returns (retriever, what happened)."""
    seqs = [tuple(s) for s in sequences]
    digest = data_digest(seqs, item_ids, texts)
    path = Path(path)
    if path.exists():
        try:
            return ItemKNN.load(path, expect_digest=digest), f"loaded {path}"
        except RetrieverError as e:
            why = str(e)
    else:
        why = f"no retriever at {path}"
    r = ItemKNN.fit(seqs, item_ids, texts=texts, **kw)
    if save:
        r.save(path)
    return r, f"{why}: fitted on {len(seqs)} sequences" + (" and saved" if save else "")


def fit_before(split, position: int, item_ids: Sequence[int] | None = None, *, content: bool = True,
               cold=None, **kw) -> ItemKNN:
    """An ItemKNN fitted on every user's sequence cut before its `position`-th item from the end
    (2 = the leave-one-out training split, no validation or test item): the retriever of the
    targets held back at that position, which never saw them or anything after them. With the
    content path of the items' texts unless content=False; with `cold` (`data/slices.ColdSplit`)
    the new items' interactions and the new users' sequences are left out."""
    if position < 1:
        raise ValueError(f"a held-back position counts from the end of a sequence, >= 1; got {position}")
    from rcllm_jax.data.slices import fitting_sequences
    ids = sorted(split.dataset.items) if item_ids is None else sorted(item_ids)
    seqs = fitting_sequences(split.dataset, cold, position, split.users)  # empty when too short
    return ItemKNN.fit(seqs, ids, texts=item_texts(split.dataset, ids) if content else None, **kw)
