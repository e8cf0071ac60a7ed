"""grain pipeline: a leave-one-out split -> a seeded, checkpointable stream of ranking requests."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from rcllm_jax.data.movielens import LeaveOneOut, sample_candidates


@dataclasses.dataclass(frozen=True)
class RankRequest:
    user_id: int
    history: tuple[int, ...]  # item ids, oldest first (the prompt keeps the last H)
    candidates: tuple[int, ...]  # item ids, prompt order
    target: int | None = None  # held-out item, when known (evaluation)

    @property
    def target_index(self) -> int | None:
        """Position of the target among the candidates; None when it is not one (retrieval miss)."""
        return self.candidates.index(self.target) if self.target in self.candidates else None


CANDIDATE_ORDERS = ("shuffled", "retriever")


def retrieved_candidates(retriever, user: int, history, k: int, seed: int = 0, order: str = "shuffled"):
    """The retriever's top-k for this history, in prompt order: seeded shuffle (deterministic in
    (seed, user)), or the retriever's own order, best first."""
    if order not in CANDIDATE_ORDERS:
        raise ValueError(f"candidate order must be one of {', '.join(CANDIDATE_ORDERS)}, got {order!r}")
    cands = list(retriever.retrieve(history, k)[0])
    if order == "shuffled":
        np.random.default_rng([seed, user, 3]).shuffle(cands)
    return tuple(cands)


def _candidates(split, user, history, target, k, negatives, seed, retriever, order):
    if retriever is not None:
        return retrieved_candidates(retriever, user, history, k, seed, order)
    return sample_candidates(split, user, target, k, negatives, seed)


def eval_requests(split: LeaveOneOut, *, stage: str = "test", num_candidates: int = 20,
                  negatives: str = "uniform", seed: int = 0, num_users: int | None = None,
                  retriever=None, order: str = "shuffled") -> grain.MapDataset:
    """Users in a seeded random order, each turned into one request for its `stage` target.
    Candidates: the target + sampled negatives, or with `retriever` its top-`num_candidates` for
    the user's history (the target may be missing: a retrieval miss).

    Iterate with `iter(ds)`; the iterator's `get_state()` / `set_state()` resume a stream exactly.
    """
    def make(user: int) -> RankRequest:
        target, hist = split.target(user, stage), split.history(user, stage)
        cands = _candidates(split, user, hist, target, num_candidates, negatives, seed, retriever, order)
        return RankRequest(user, hist, cands, target)

    ds = grain.MapDataset.source(list(split.users)).shuffle(seed=seed)
    if num_users is not None:
        ds = ds[:num_users]
    return ds.map(make)


def stream_requests(split: LeaveOneOut, *, num_users: int, requests_per_user: int, num_candidates: int = 20,
                    negatives: str = "uniform", grow_prob: float = 0.5, seed: int = 0, retriever=None,
                    order: str = "shuffled") -> list[RankRequest]:
    """A serving-like stream: each user makes `requests_per_user` requests; between two of them
    the user's history grows by 1 or 2 items with probability `grow_prob` (else 0); every request
    has a fresh candidate list in shuffled order. The last request of a user predicts the test item,
    earlier ones the item that followed the history of that moment. Users interleave round-robin.
    """
    rng = np.random.default_rng([seed, 7])
    users = list(eval_requests(split, num_users=num_users, seed=seed, num_candidates=2))
    per_user = []
    for u in (r.user_id for r in users):
        seq = split.dataset.sequences[u]
        growth = [int(rng.integers(1, 3)) if rng.random() < grow_prob else 0 for _ in range(requests_per_user - 1)]
        ends = [len(seq) - 1]
        for g in reversed(growth):
            ends.append(max(1, ends[-1] - g))
        reqs = []
        for j, h in enumerate(reversed(ends)):
            target = seq[h]
            cands = _candidates(split, u, seq[:h], target, num_candidates, negatives, seed * 1000 + j, retriever, order)
            reqs.append(RankRequest(u, seq[:h], cands, target))
        per_user.append(reqs)
    return [reqs[j] for j in range(requests_per_user) for reqs in per_user]
