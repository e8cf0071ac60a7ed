"""grain pipeline: a leave-one-out split -> a seeded, checkpointable stream of ranking requests."""

from __future__ import annotations

import dataclasses

import grain

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
