"""HR@K, NDCG@K, MRR from the rank of the held-out item, and the popularity / random baselines."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

CUTOFFS_HR = (1, 5, 10)
CUTOFFS_NDCG = (5, 10)


MISS = float("inf")  # the rank of a target that is not among the candidates (a retrieval miss)


def percentile(xs, q: float) -> float | None:
    """The q-th percentile of the values, or None when there are none."""
    return float(np.percentile(np.asarray(xs, float), q)) if len(xs) else None


def target_rank(scores: Sequence[float], target_index: int | None, rng: np.random.Generator | None = None) -> float:
    """0-based rank of candidate `target_index` when sorting by descending score; MISS when the
    target is not a candidate (None): a miss at every cutoff, as LlamaRec counts it.

    Ties are broken uniformly at random with `rng` (no optimistic or pessimistic bias), or
    pessimistically (target placed after every tie) when rng is None.
    """
    if target_index is None:
        return MISS
    s = np.asarray(scores, np.float64)
    t = s[target_index]
    better = int(np.sum(s > t))
    ties = int(np.sum(s == t)) - 1
    return better + (int(rng.integers(0, ties + 1)) if rng is not None and ties else ties)


def per_request_metrics(ranks: Iterable[float]) -> dict[str, np.ndarray]:
    """HR@1/5/10, NDCG@5/10 and reciprocal rank of each request (one relevant item per request)."""
    r = np.asarray(list(ranks), np.float64)
    if r.size == 0:
        raise ValueError("no ranks to average")
    out = {f"hr@{k}": (r < k).astype(np.float64) for k in CUTOFFS_HR}
    gain = 1.0 / np.log2(r + 2.0)
    out.update({f"ndcg@{k}": np.where(r < k, gain, 0.0) for k in CUTOFFS_NDCG})
    out["mrr"] = 1.0 / (r + 1.0)
    return out


def ranking_metrics(ranks: Iterable[float]) -> dict[str, float]:
    """HR@1/5/10, NDCG@5/10, MRR averaged over requests."""
    return {k: float(v.mean()) for k, v in per_request_metrics(ranks).items()}


def bootstrap_ci(values, n: int = 1000, seed: int = 0, level: float = 0.95, groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-request values (seeded). With `groups`
    (one label per value, e.g. the user of each request), whole groups are resampled (cluster
    bootstrap): requests of one user are not independent evidence."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    if groups is None:
        means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    else:
        _, g = np.unique(np.asarray(groups), return_inverse=True)
        sums, counts = np.bincount(g, weights=v), np.bincount(g).astype(np.float64)
        idx = rng.integers(0, len(sums), size=(n, len(sums)))
        means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def popularity_scores(candidates: Sequence[int], popularity: Mapping[int, int]) -> np.ndarray:
    return np.array([popularity.get(c, 0) for c in candidates], np.float64)


def random_scores(k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random(k)
