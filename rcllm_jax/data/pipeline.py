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
    def target_index(self) -> int:
        return self.candidates.index(self.target)


def eval_requests(split: LeaveOneOut, *, stage: str = "test", num_candidates: int = 20,
                  negatives: str = "uniform", seed: int = 0, num_users: int | None = None) -> grain.MapDataset:
    """Users in a seeded random order, each turned into one request for its `stage` target.

    Iterate with `iter(ds)`; the iterator's `get_state()` / `set_state()` resume a stream exactly.
    """
    def make(user: int) -> RankRequest:
        target = split.target(user, stage)
        cands = sample_candidates(split, user, target, num_candidates, negatives, seed)
        return RankRequest(user, split.history(user, stage), cands, target)

    ds = grain.MapDataset.source(list(split.users)).shuffle(seed=seed)
    if num_users is not None:
        ds = ds[:num_users]
    return ds.map(make)


def stream_requests(split: LeaveOneOut, *, num_users: int, requests_per_user: int, num_candidates: int = 20,
                    negatives: str = "uniform", grow_prob: float = 0.5, seed: int = 0) -> list[RankRequest]:
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
            cands = sample_candidates(split, u, target, num_candidates, negatives, seed=seed * 1000 + j)
            reqs.append(RankRequest(u, seq[:h], cands, target))
        per_user.append(reqs)
    return [reqs[j] for j in range(requests_per_user) for reqs in per_user]
