"""grain pipeline: a leave-one-out split -> a seeded, checkpointable stream of ranking requests."""

from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np

from rcllm_jax.data.movielens import LeaveOneOut, sample_candidates


@dataclasses.dataclass(frozen=True)
class RankRequest:
    user_id: int | str
    history: tuple[int, ...]  # item ids, oldest first (the prompt keeps the last H)
    candidates: tuple[int, ...]  # item ids, prompt order
    target: int | None = None  # held-out item, when known (evaluation)
    arrival_s: float | None = None  # when it arrived (a replayed request log)

    @property
    def target_index(self) -> int | None:
        """Position of the target among the candidates; None when it is not one (retrieval miss)."""
        return self.candidates.index(self.target) if self.target in self.candidates else None


CANDIDATE_ORDERS = ("shuffled", "retriever")


def parse_positions(spec: str) -> tuple[int, ...]:
    """Held-back positions (each counted from the end of a sequence, 1 = the last item) from 'a-b'
    or a comma list: distinct, ascending; a ValueError naming the problem otherwise."""
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            out = tuple(range(lo, hi + 1))
        else:
            out = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"expected 'a-b' or a comma list of integers, got {spec!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"positions count from the end of a sequence (1 = the last item), got {spec!r}")
    return tuple(sorted(set(out)))


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


def heldout_requests(split: LeaveOneOut, positions, *, num_candidates: int = 20, negatives: str = "uniform",
                     seed: int = 0, num_users: int | None = None, retrievers=None,
                     order: str = "shuffled") -> tuple[list[RankRequest], list[int]]:
    """Requests for the targets held back at several `positions` from the end of each sequence
    (1 = the last item): for each position p, each user (seeded order, as `eval_requests`)
    predicts its p-th item from the end from everything before it. `retrievers` maps p to the
    retriever fitted strictly before p (`retrieval.fit_before`) that proposes the candidates;
    without it negatives are sampled. Largest position first, so a user's history only grows
    from one request to the next. Returns (requests, the position of each)."""
    users = list(grain.MapDataset.source(list(split.users)).shuffle(seed=seed))
    users = users if num_users is None else users[:num_users]
    reqs, where = [], []
    for p in sorted(set(positions), reverse=True):
        if p < 1:
            raise ValueError(f"held-back positions count from the end of a sequence, >= 1; got {p}")
        retr = None if retrievers is None else retrievers[p]
        for u in users:
            seq = split.dataset.sequences[u]
            if len(seq) <= p:
                continue  # no history before that position
            hist, target = tuple(seq[:-p]), seq[-p]
            reqs.append(RankRequest(u, hist, _candidates(split, u, hist, target, num_candidates, negatives, seed,
                                                         retr, order), target))
            where.append(p)
    return reqs, where


def sliced_requests(split: LeaveOneOut, cold, positions, name: str, *, num_candidates: int = 20, seed: int = 0,
                    num_users: int | None = None, retrievers=None, order: str = "shuffled"):
    """The held-back requests of one cold-start slice (`data/slices.py`; `name` in SLICES) of the
    first `num_users` users in seeded order (as `heldout_requests`), each with the top-k of the
    retriever of its position (`retrievers[p]`, fitted without the cold items and users). Returns
    (requests, the position of each)."""
    from rcllm_jax.data.slices import in_slice, slice_requests
    users = list(grain.MapDataset.source(list(split.users)).shuffle(seed=seed))
    users = users if num_users is None else users[:num_users]
    reqs, where = [], []
    for q in slice_requests(split.dataset, cold, positions, users, split.users):
        if in_slice(q, name):
            cands = retrieved_candidates(retrievers[q.position], q.user, q.history, num_candidates, seed, order)
            reqs.append(RankRequest(q.user, q.history, cands, q.target))
            where.append(q.position)
    return reqs, where


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


REQUEST_LOG_FIELDS = {"user_id", "history", "candidates", "target", "arrival_s"}


def read_request_log(path, dataset, max_candidates: int | None = None) -> list[RankRequest]:
    """A request log to replay (`bench.py --requests`): JSON lines, one request each,
    {"user_id": id, "history": [item ids, oldest first], "candidates": [item ids],
    "target": item id (optional: what the user chose, for accuracy), "arrival_s": seconds
    (optional: open-loop replay)}, item ids as the dataset's catalog names them (strings, or
    integers for integer ids; `Dataset.item_of`). Blank lines are skipped. Every line is checked
    before any is run: a malformed line, an unknown item or a bad candidate list is a ValueError
    naming the line. The requests carry the engine's item indices."""
    from rcllm_jax.data.prompt import check_candidates
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: a request is a JSON object, got {type(d).__name__}")
            missing = {"user_id", "history", "candidates"} - set(d)
            extra = set(d) - REQUEST_LOG_FIELDS
            if missing or extra:
                raise ValueError(f"{where}: " + (f"missing {sorted(missing)}" if missing else f"unknown fields {sorted(extra)}"))
            uid = d["user_id"]
            if isinstance(uid, bool) or not isinstance(uid, (int, str)) or uid == "":
                raise ValueError(f"{where}: user_id must be a non-empty string or an integer")
            lists = {}
            for key in ("history", "candidates"):
                v = d[key]
                if not isinstance(v, list) or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in v):
                    raise ValueError(f"{where}: {key} must be a list of item ids (strings or integers)")
                found = [dataset.item_of(i) for i in v]
                unknown = [i for i, f in zip(v, found) if f is None]
                if unknown:
                    raise ValueError(f"{where}: unknown item {unknown[0]!r} in {key}")
                lists[key] = tuple(found)
            try:
                check_candidates(lists["candidates"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if max_candidates is not None and len(lists["candidates"]) > max_candidates:
                raise ValueError(f"{where}: {len(lists['candidates'])} candidates, at most {max_candidates}")
            target, arrival = d.get("target"), d.get("arrival_s")
            if target is not None:
                target = dataset.item_of(target)
                if target is None:
                    raise ValueError(f"{where}: target must be a known item id")
            if arrival is not None and (not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or arrival < 0):
                raise ValueError(f"{where}: arrival_s must be a number >= 0")
            out.append(RankRequest(uid, lists["history"], lists["candidates"], target,
                                   None if arrival is None else float(arrival)))
    if not out:
        raise ValueError(f"{path}: no requests")
    arrivals = [r.arrival_s for r in out]
    if any(a is None for a in arrivals) and any(a is not None for a in arrivals):
        raise ValueError(f"{path}: arrival_s must be given on every line or on none")
    if arrivals[0] is not None and any(b < a for a, b in zip(arrivals, arrivals[1:])):
        raise ValueError(f"{path}: arrival_s must not decrease from line to line")
    return out
