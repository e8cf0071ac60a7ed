"""Cold-start slices of the ranking workload: which requests the collaborative signal cannot serve.

The slices are chosen from the data alone, before any model is fitted (`choose_cold`):

- **new items**: the latest `new_item_fraction` of the items by the time of their first
  interaction (ties by item id). Every interaction with them is removed from what the retriever
  and the ranking head are fitted on (`fitting_sequences`); a request is in the slice when its
  target is one of them. A user's history keeps them (the user did watch them; the fitted models
  never saw anyone do so).
- **new users**: a seeded `new_user_fraction` of the users, whose sequences are removed from
  every fit. Their requests predict item h + 1 from their first h items (h = 1..`new_user_history`).
- **few-interaction items**: requests whose target has at most `few` interactions in the fitting
  sequences of its test position (`very_few`: at most 5 of them, reported too); new items and new
  users excluded.
- **warm**: every other request (a known user, a target with more than `few` interactions).

`SLICES` names them, plus `all`. `slice_requests` labels held-back requests (test position p:
the p-th item from the end predicted from everything before it, as `data/pipeline.py`).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

SLICES = ("warm", "few_items", "very_few_items", "new_items", "new_users", "all")


@dataclasses.dataclass(frozen=True)
class ColdSplit:
    """The cold items and users of a dataset and the thresholds of the few-interaction slices."""
    new_items: frozenset
    new_users: frozenset
    few: int = 20
    very_few: int = 5
    new_user_history: int = 3

    def describe(self) -> dict:
        return {"new_items": len(self.new_items), "new_users": len(self.new_users), "few": self.few,
                "very_few": self.very_few, "new_user_history": self.new_user_history}


def choose_cold(ds, *, new_item_fraction: float = 0.15, new_user_fraction: float = 0.1, few: int = 20,
                very_few: int = 5, new_user_history: int = 3, seed: int = 0) -> ColdSplit:
    """The cold split of `ds` (module docstring): needs the dataset's interaction times."""
    if not 0 <= new_item_fraction < 1 or not 0 <= new_user_fraction < 1:
        raise ValueError("new_item_fraction and new_user_fraction must be in [0, 1)")
    if not 0 <= very_few <= few:
        raise ValueError(f"the few-interaction thresholds must satisfy 0 <= very_few <= few, got {very_few}, {few}")
    first = ds.first_seen()
    by_time = sorted(first, key=lambda i: (first[i], i))
    n_new = int(round(new_item_fraction * len(by_time)))
    new_items = frozenset(by_time[len(by_time) - n_new:]) if n_new else frozenset()
    users = sorted(u for u, s in ds.sequences.items() if len(s) > new_user_history)
    rng = np.random.default_rng([seed, 37])
    n_users = int(round(new_user_fraction * len(users)))
    new_users = frozenset(int(u) for u in rng.choice(users, size=n_users, replace=False)) if n_users else frozenset()
    return ColdSplit(new_items, new_users, few, very_few, new_user_history)


def fitting_sequences(ds, cold: ColdSplit | None, position: int, users=None) -> list[tuple[int, ...]]:
    """What a model of the targets held back at `position` may be fitted on: each known user's
    sequence cut before its `position`-th item from the end, without the new items (new users'
    sequences left out; cold=None: every user's cut sequence). `users`: the users considered
    (default every user of `ds`)."""
    if position < 1:
        raise ValueError(f"a held-back position counts from the end of a sequence, >= 1; got {position}")
    users = sorted(ds.sequences) if users is None else users
    if cold is None:
        return [tuple(ds.sequences[u][:-position]) for u in users]
    return [tuple(i for i in ds.sequences[u][:-position] if i not in cold.new_items)
            for u in users if u not in cold.new_users]


def without_cold(ds, cold: ColdSplit):
    """The world a model fitted before the cold items and users existed sees: `ds` without the new
    users and without every interaction with a new item (the items stay in the catalog, unseen).
    What `launch/train.py --cold_split` trains on, so `bench.py --slice` measures a head that
    never saw a cold item or user."""
    from rcllm_jax.data.movielens import keep_interactions
    return keep_interactions(ds, lambda i: i not in cold.new_items, users=set(ds.sequences) - cold.new_users,
                             name=f"{ds.name}-warm")


@dataclasses.dataclass(frozen=True)
class SliceRequest:
    user: int
    history: tuple[int, ...]
    target: int
    position: int  # the fitted models' test position (new users: the smallest one)
    slice: str  # warm, few_items, new_items or new_users
    target_interactions: int  # the target's interactions in the fitting sequences of `position`
    very_few: bool = False  # a few-interaction target with at most `ColdSplit.very_few` of them


def slice_requests(ds, cold: ColdSplit, positions, users=None, fit_users=None) -> list[SliceRequest]:
    """Every request of the workload with its slice: for each test position p (largest first) and
    each known user of `users` with history before it, the p-th item from the end; for each new
    user the items 2..new_user_history + 1 from their first ones (fitted models of the smallest
    position). Interactions are counted in the fitting sequences of `fit_users` (default: every user)."""
    positions = sorted({int(p) for p in positions}, reverse=True)
    if not positions or positions[-1] < 1:
        raise ValueError(f"test positions count from the end of a sequence (>= 1), got {positions}")
    users = sorted(ds.sequences) if users is None else list(users)
    out = []
    for p in positions:
        counts = collections.Counter(i for s in fitting_sequences(ds, cold, p, fit_users) for i in s)
        for u in users:
            seq = ds.sequences[u]
            if u in cold.new_users or len(seq) <= p:
                continue
            target = seq[-p]
            n = counts.get(target, 0)
            kind = "new_items" if target in cold.new_items else "few_items" if n <= cold.few else "warm"
            out.append(SliceRequest(u, tuple(seq[:-p]), target, p, kind, n,
                                    kind == "few_items" and n <= cold.very_few))
    p = positions[-1]
    counts = collections.Counter(i for s in fitting_sequences(ds, cold, p, fit_users) for i in s)
    for u in users:
        if u not in cold.new_users:
            continue
        seq = ds.sequences[u]
        for h in range(1, min(cold.new_user_history, len(seq) - 1) + 1):
            out.append(SliceRequest(u, tuple(seq[:h]), seq[h], p, "new_users", counts.get(seq[h], 0)))
    return out


def in_slice(request: SliceRequest, name: str) -> bool:
    """Whether a request belongs to slice `name` (`SLICES`)."""
    if name not in SLICES:
        raise ValueError(f"slice must be one of {', '.join(SLICES)}, got {name!r}")
    if name == "all":
        return True
    if name == "very_few_items":
        return request.very_few
    return request.slice == name
