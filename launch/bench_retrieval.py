"""Retrieval on the cold-start slices, and the retriever on the LlamaRec protocol, in one run.

python launch/bench_retrieval.py --output_json=bench_out/retrieval.json

No model: the retrieval stage alone (`retrieval.ItemKNN`), so it runs in a few minutes on a CPU.

Slices (`data/slices.py`, chosen before anything is fitted): new items (the latest
--new_item_fraction by first interaction; every interaction with them removed from the fits),
few-interaction targets (<= 20 fitted interactions; <= 5 reported too), new users (a seeded
--new_user_fraction of the users left out of the fits, predicting item h + 1 from their first h,
h = 1..3), warm (the rest). Test positions --test_positions (each with retrievers fitted strictly
before it). Rows: item-kNN alone, the blended retriever (kNN + the content path) at several
cold_share values (the default marked), the content path alone, popularity. Recall@K with a 95%
bootstrap interval over users, per slice.

The LlamaRec protocol (its paper's table, ML-100k): users and items with >= 5 interactions, the
last item the test target, the retriever fitted on the training part (every item but the last two),
its top 20 for the history before the target; NDCG@10 and Recall@10 of that list over every test
user, a target not retrieved counting as a miss. Printed next to LlamaRec's published LRURec and
LlamaRec (Llama-2-7B) figures.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("output_json", "bench_out/retrieval.json", "Where to write the JSON.")
_POS = flags.DEFINE_string("test_positions", "1-3", "Held-back test positions ('a-b' or a comma list).")
_K = flags.DEFINE_integer("num_candidates", 20, "Retrieved candidates per request (recall@K).")
_NEW_ITEMS = flags.DEFINE_float("new_item_fraction", 0.15, "Share of the items that are new (latest first seen).")
_NEW_USERS = flags.DEFINE_float("new_user_fraction", 0.1, "Share of the users held out as new users.")
_SHARES = flags.DEFINE_list("cold_shares", ["0.25", "0.5", "1.0"], "Blended retrievers' cold_share values.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the new users and the intervals.")


def _top_k(scores, seen, k: int, tie) -> list[int]:
    """Indices of the k best scores outside `seen` (ties by `tie`, ascending)."""
    import numpy as np
    order = np.lexsort((tie, -scores))
    return [int(j) for j in order[~seen[order]][:k]]


def _rows_for(requests, retr, k: int, shares, default_share: float) -> dict[str, list[bool]]:
    """{row: per request, whether its target is among the k retrieved}."""
    import numpy as np
    hits = collections.defaultdict(list)
    for q in requests:
        knn, blend, rank = (retr[q.position][x] for x in ("knn", "blended", "popularity_rank"))
        seen = np.zeros(knn.num_items, bool)
        seen[[knn.index[i] for i in q.history if i in knn.index]] = True
        tgt = knn.index[q.target]
        hits["item-knn"].append(q.target in knn.retrieve(q.history, k)[0])
        for s in shares:
            name = f"blended (cold_share {s:g})" + (" [default]" if s == default_share else "")
            hits[name].append(q.target in blend[s].retrieve(q.history, k)[0])
        hits["content"].append(tgt in _top_k(knn.content_scores(q.history), seen, k, rank))
        hits["popularity"].append(tgt in _top_k(knn.popularity.astype(float), seen, k, rank))
    return hits


def _cold_slices(k: int, shares) -> dict:
    import numpy as np
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import parse_positions
    from rcllm_jax.data.slices import choose_cold, in_slice, slice_requests
    from rcllm_jax.eval.metrics import bootstrap_ci
    from rcllm_jax.retrieval import COLD_SHARE, fit_before
    ds = load_dataset()
    split = LeaveOneOut(ds)
    cold = choose_cold(ds, new_item_fraction=_NEW_ITEMS.value, new_user_fraction=_NEW_USERS.value, seed=_SEED.value)
    try:
        positions = list(parse_positions(_POS.value))
    except ValueError as e:
        raise app.UsageError(f"--test_positions: {e}") from None
    requests = slice_requests(ds, cold, positions, split.users, split.users)
    default_share = COLD_SHARE
    t0 = time.perf_counter()
    retr = {}
    for p in positions:
        fitted = fit_before(split, p, cold=cold)
        knn = fitted.with_cold_share(0.0)  # item-kNN's own list (no slot for cold items)
        retr[p] = {"knn": knn, "blended": {s: fitted.with_cold_share(s) for s in shares},
                   # ties of the content and popularity rows: popularity, then id
                   "popularity_rank": np.argsort(np.argsort(-knn.popularity, kind="stable"), kind="stable")}
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = _rows_for(requests, retr, k, shares, default_share)
    users = np.array([q.user for q in requests])
    slices = {}
    for name in ("warm", "few_items", "very_few_items", "new_items", "new_users", "all"):
        mask = np.array([in_slice(q, name) for q in requests])
        slices[name] = {"requests": int(mask.sum()), "users": int(len(set(users[mask]))), "rows": {
            row: {f"recall@{k}": float(np.mean(np.asarray(h)[mask])),
                  f"recall@{k}_ci": bootstrap_ci(np.asarray(h, np.float64)[mask], seed=_SEED.value, groups=users[mask])}
            for row, h in hits.items()}}
    return {"cold": cold.describe(), "positions": positions, "fit_s": fit_s, "eval_s": time.perf_counter() - t0,
            "default_cold_share": default_share, "slices": slices}


def _llamarec(k: int) -> dict:
    """The retriever on the LlamaRec protocol (module docstring)."""
    import numpy as np
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset, min_interactions
    from rcllm_jax.eval.benchmarks_report import LLAMAREC_PUBLISHED
    from rcllm_jax.eval.metrics import MISS, bootstrap_ci, per_request_metrics
    from rcllm_jax.retrieval import fit_before
    f = min_interactions(load_dataset(), 5)
    split = LeaveOneOut(f)
    out = {"users": len(split.users), "items": len(f.items), "retrieved": k, "rows": {}}
    for name, content in (("item-knn", False), ("blended [default]", True)):
        r = fit_before(split, 2, content=content)  # the training part: every item but the last two
        ranks = []
        for u in split.users:
            got = r.retrieve(f.sequences[u][:-1], k)[0]
            t = f.sequences[u][-1]
            ranks.append(got.index(t) if t in got else MISS)
        per = per_request_metrics(ranks)
        hit_k = np.isfinite(np.asarray(ranks, np.float64)).astype(np.float64)
        out["rows"][name] = {"ndcg@10": float(per["ndcg@10"].mean()), "recall@10": float(per["hr@10"].mean()),
                             "ndcg@10_ci": bootstrap_ci(per["ndcg@10"], seed=_SEED.value),
                             "recall@10_ci": bootstrap_ci(per["hr@10"], seed=_SEED.value),
                             f"recall@{k}": float(hit_k.mean())}
    out["published"] = {n: {"ndcg@10": a, "recall@10": b} for n, (a, b) in LLAMAREC_PUBLISHED.items()}
    return out


def main(argv):
    del argv
    k = _K.value
    shares = [float(s) for s in _SHARES.value]
    t0 = time.perf_counter()
    result = {"config": {"dataset": "ml-100k", "num_candidates": k, "test_positions": _POS.value,
                         "new_item_fraction": _NEW_ITEMS.value, "new_user_fraction": _NEW_USERS.value,
                         "seed": _SEED.value, "cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
              "cold_slices": _cold_slices(k, shares), "llamarec": _llamarec(k)}
    result["config"]["wall_s"] = time.perf_counter() - t0
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    cs = result["cold_slices"]
    names = list(cs["slices"])
    print(f"recall@{k} per slice (requests: " + ", ".join(f"{n} {cs['slices'][n]['requests']}" for n in names) + ")")
    print("| retriever | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for row in cs["slices"]["all"]["rows"]:
        print(f"| {row} | " + " | ".join(f"{cs['slices'][n]['rows'][row][f'recall@{k}']:.3f}" for n in names) + " |")
    lr = result["llamarec"]
    print(f"LlamaRec protocol: {lr['users']} users, {lr['items']} items, top {k} retrieved, "
          "target not retrieved = miss")
    for name, r in lr["rows"].items():
        print(f"  {name:<28} NDCG@10 {r['ndcg@10']:.4f} [{r['ndcg@10_ci'][0]:.4f}, {r['ndcg@10_ci'][1]:.4f}]  "
              f"Recall@10 {r['recall@10']:.4f} [{r['recall@10_ci'][0]:.4f}, {r['recall@10_ci'][1]:.4f}]")
    for name, r in lr["published"].items():
        print(f"  {name:<28} NDCG@10 {r['ndcg@10']:.4f}  Recall@10 {r['recall@10']:.4f} (published)")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
