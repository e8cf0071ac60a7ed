"""The `rcllm` policy chosen by measurement for the model, head and prompt in use.

The default policy was measured for the shipped score-slot head; another model or head (e.g. a
base model's own answer labels) can need more recomputation to reproduce its full-prefill
answers. `calibrate` runs a sample of requests in full prefill and in each candidate policy
(cheapest first: stitching with cached glue, stitching, sinks, deviation ratios, blends) and keeps
the cheapest that meets the fidelity target on the engine's own scores: top-1 agreement, Kendall
tau and KL all at once, so a degenerate always-the-first-label answer cannot pass on top-1 alone.
When none does, the exact policy (every suffix token recomputed: full prefill through the cached
path) is served and the calibration says the target was not reached. Agreement is also reported
on the final ranking (the engine's scores plus a head's collaborative term).

A calibration is saved beside the item-cache snapshot (`<snapshot_dir>/calibration/<key>.json`)
under a key of everything it depends on (weights, head, prompt template, cache dtype, item
context, history length, candidate count); a server or benchmark finding one for its key uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from rcllm_jax.engine.selective_recompute import BLOCK_MODES, Policy
from rcllm_jax.eval.fidelity import kendall_tau, kl_divergence, top1_agree

EXACT = Policy(sink=10 ** 9)  # every cached token recomputed: the blended prefill equals full prefill
# the default setup's calibrations (default model, shipped head, default prompt), under calibration/
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "slot_head"

# (name, policy): the candidates measured (the cheapest passing one by tokens computed per request
# wins); "exact" is served, and then measured, only when none passes
CANDIDATES = (
    ("stitch, glue cached", BLOCK_MODES["rcllm"]),
    ("stitch", Policy()),
    ("sink 1", Policy(sink=1)),
    ("sink 2", Policy(sink=2)),
    ("sink 2 + deviation 10%", Policy(sink=2, ratio=0.1, check_layer=1)),
    ("sink 2 + deviation 30%", Policy(sink=2, ratio=0.3, check_layer=1)),
    ("sink 2 + deviation 60%", Policy(sink=2, ratio=0.6, check_layer=1)),
    ("exact", EXACT),
)


@dataclasses.dataclass(frozen=True)
class FidelityTarget:
    top1: float = 0.95  # top-1 agreement with full prefill, at least
    kendall_tau: float = 0.9  # mean Kendall tau of the candidate ranking, at least
    kl: float = 0.01  # mean KL(full || policy) of the candidate distribution, at most (nats)

    def met(self, m: dict) -> bool:
        return m["top1_agreement"] >= self.top1 and m["kendall_tau"] >= self.kendall_tau and m["kl_mean"] <= self.kl


@dataclasses.dataclass(frozen=True)
class Calibration:
    name: str  # the chosen candidate
    policy: Policy
    met: bool  # the chosen policy meets the target (False: none did; the exact policy is served)
    target: FidelityTarget
    requests: int
    measured: dict  # candidate name -> its fidelity on the engine's scores and on the final ranking
    key: str

    def summary(self) -> dict:
        """What /healthz and the benchmark JSON report."""
        return {"policy": self.name, **dataclasses.asdict(self.policy), "target_met": self.met,
                "target": dataclasses.asdict(self.target), "requests": self.requests,
                "measured": self.measured[self.name], "candidates": self.measured}

    def describe(self, how: str) -> str:
        """One line: the policy, where it came from (`how`) and how faithful it measured."""
        m = self.measured[self.name]
        return (f"rcllm policy: {self.name} ({how}; vs full prefill top-1 {m['top1_agreement']:.3f}, Kendall tau "
                f"{m['kendall_tau']:.3f}, KL {m['kl_mean']:.4f}: target "
                f"{'met' if self.met else 'NOT met, exact policy'})")

    def to_json(self) -> dict:
        return {"name": self.name, "policy": dataclasses.asdict(self.policy), "met": self.met,
                "target": dataclasses.asdict(self.target), "requests": self.requests, "measured": self.measured,
                "key": self.key}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        return cls(d["name"], Policy(**d["policy"]), bool(d["met"]), FidelityTarget(**d["target"]),
                   int(d["requests"]), d["measured"], d["key"])


def calibration_key(engine, num_candidates: int) -> str:
    """Everything a calibration depends on: weights, head, prompt, cache dtype, item context,
    history length and candidate count."""
    head = engine.head
    parts = {"fingerprint": engine.fingerprint, "head": None if head is None else head.digest(),
             "prompt": engine.builder.template.digest(), "prompt_head": engine.builder.head,
             "kv_dtype": str(engine.store.dtype), "context": list(engine.canonical_context()),
             "history_len": engine.builder.history_len, "num_candidates": int(num_candidates)}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


def _log_probs(scores) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    return s - (np.log(np.exp(s - s.max()).sum()) + s.max())


def _fidelity(ref, got) -> dict:
    return {"top1_agreement": float(np.mean([top1_agree(a, b) for a, b in zip(ref, got)])),
            "kendall_tau": float(np.mean([kendall_tau(a, b) for a, b in zip(ref, got)])),
            "kl_mean": float(np.mean([kl_divergence(_log_probs(a), _log_probs(b)) for a, b in zip(ref, got)]))}


def calibrate(recommender, requests, target: FidelityTarget = FidelityTarget(), candidates=CANDIDATES,
              num_candidates: int | None = None) -> Calibration:
    """Measure each candidate policy against full prefill on `requests` ((user id, history,
    candidates) each, shaped like the traffic to serve) and choose the cheapest that meets
    `target`, else the exact policy. Only the engine's user store changes (the users' prefixes)."""
    from rcllm_jax.recommender import final_scores
    if not requests:
        raise ValueError("calibration needs at least one request")
    engine = recommender.engine
    prompts = [engine.builder.build(list(h), list(c)) for _, h, c in requests]
    names = [n for n, p in candidates if p != EXACT]
    ref, runs = [], {n: [] for n in names + ["exact"]}
    for (user, _, _), p in zip(requests, prompts):  # request by request: its user's prefix stays cached
        engine.update_user(user, p)
        ref.append(engine.rank(p, "full").scores)
        for name, policy in candidates:
            if policy != EXACT:
                runs[name].append(engine.rank(p, policy, user_id=user))

    def final(scores):
        return [final_scores(recommender.head, recommender.retriever, h, c, s)
                for (_, h, c), s in zip(requests, scores)]
    ref_final = final(ref)
    measured = {}

    def measure(name):
        scores = [r.scores for r in runs[name]]
        fin = _fidelity(ref_final, final(scores))
        measured[name] = {**_fidelity(ref, scores), "final_top1_agreement": fin["top1_agreement"],
                          "final_kendall_tau": fin["kendall_tau"],
                          "computed_tokens_mean": float(np.mean([r.computed_tokens for r in runs[name]]))}
    for name in names:
        measure(name)
    passing = [(measured[n]["computed_tokens_mean"], i, n, p) for i, (n, p) in enumerate(candidates)
               if n in measured and target.met(measured[n])]
    met = bool(passing)
    if met:
        chosen = min(passing)[2:]
    else:  # none passes: the exact policy, measured now to report it
        chosen = ("exact", EXACT)
        for (user, _, _), p in zip(requests, prompts):
            engine.update_user(user, p)
            runs["exact"].append(engine.rank(p, EXACT, user_id=user))
        measure("exact")
    k = num_candidates or max(len(c) for _, _, c in requests)
    return Calibration(chosen[0], chosen[1], met, target, len(requests), measured, calibration_key(engine, k))


def load_or_calibrate(recommender, snapshot_dir, num_candidates: int, make_requests) -> tuple:
    """(calibration, how it was obtained) for the recommender's engine: the one saved in
    `snapshot_dir` (None: none) for its key, else the default setup's shipped one, else measured
    now on `make_requests()` (saved in `snapshot_dir`; the requests' prefixes leave the user
    store). (None, reason) when there is no request to calibrate on."""
    key = calibration_key(recommender.engine, num_candidates)
    for where, how in ((snapshot_dir, "saved with the snapshot"), (SHIPPED, "shipped with the default head")):
        got = load(where, key) if where else None
        if got is not None:
            return got, how
    requests = make_requests()
    if not requests:
        return None, "no request to calibrate on"
    got = calibrate(recommender, requests, num_candidates=num_candidates)
    recommender.engine.reset_caches()
    if snapshot_dir:
        save(snapshot_dir, got)
    return got, f"calibrated now on {got.requests} requests"


def save(directory, calibration: Calibration) -> Path:
    """Write the calibration beside the snapshot (atomically: a reader sees the old file or the new)."""
    d = Path(directory) / "calibration"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{calibration.key}.json"
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(calibration.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path


def load(directory, key: str) -> Calibration | None:
    """The calibration saved for `key` under `directory`, or None (absent or unreadable: a damaged
    file is ignored and a new calibration is made)."""
    path = Path(directory) / "calibration" / f"{key}.json"
    try:
        got = Calibration.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return got if got.key == key else None
