"""Serving throughput under load: batched serving steps against the one-request-at-a-time loop, in one run.

python launch/bench_serving.py --mesh=items:4 --num_requests=96 --output_json=bench_out/serving.json
The served recommender (`open_served`: the default model, its slot head, the retriever, the item
caches of --placement / --replicate / --kv_dtype on --mesh), behind the in-process service
(`RecommenderService`: the scheduler and the engine loop, no HTTP). --num_requests users send a
request without candidates (retrieve -> rerank), all queued before the engine loop starts: a
burst at saturation, the same windows every time. Each serving loop (`--serving_step=serial`: one request at a time,
shard by shard; `batched`: a window as serving steps, each shard's requests one batch of up to
--max_batch, every shard in one program) ranks the burst --repeats times, alternating, after an
untimed warm-up burst of its own (compiles; the users' history prefixes are then cached, as
after their events in production). Reported per loop: requests/s (median over repeats), the
latency and TTFT percentiles of the answers, compiles during the timed bursts, and how far the
two loops' answers are apart (same users, same candidates). On a CPU the simulated devices share
its cores: the batched loop's gain here comes from batching, not from devices running at once.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement, --replicate, --kv_dtype)

_N = flags.DEFINE_integer("num_requests", 96, "Requests per burst (distinct users).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed bursts per serving loop (alternating).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Requests per shard in one serving step at most.")
_WINDOW = flags.DEFINE_integer("window", 32, "Requests per scheduling window.")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Retrieved candidates per request.")
_HIST = flags.DEFINE_integer("history_len", 20, "History items in a prompt.")
_OUT = flags.DEFINE_string("output_json", "bench_out/serving.json", "Where to write the JSON.")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 0, "Only the first N catalog items (0 = all; smoke tests).")
_SNAP = flags.DEFINE_string("snapshot_dir", None, "Item snapshot directory (default: the served one's).")
_LOOPS = flags.DEFINE_list("loops", ["serial", "batched"], "Serving loops to measure (serial, batched).")


def percentiles(xs) -> dict:
    import numpy as np
    xs = np.asarray(xs, np.float64)
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


def _burst(served, items, state, bodies, step: str):
    """Every body queued at once, then one engine loop (`step`) answers them all: (answers, wall s,
    compiles while it ran). A failed request raises, naming it."""
    from rcllm_jax.serve.scheduler import Scheduler
    from rcllm_jax.serve.service import RecommenderService, compiles
    engine = served.engine
    svc = RecommenderService(engine, items, state, scheduler=Scheduler(engine.num_shards, "affinity",
                                                                       max_queue=10 * len(bodies),
                                                                       window=_WINDOW.value),
                             max_candidates=_CANDS.value, retriever=served.recommender.retriever,
                             num_candidates=_CANDS.value, serving_step=step, max_batch=_MAX_BATCH.value,
                             request_timeout_s=3600)
    got = {}
    client = threading.Thread(target=lambda: got.update(outs=svc.recommend_many(bodies)))
    client.start()
    queued_by = time.perf_counter() + 60  # a refused request never queues: the check below names it
    while len(svc.scheduler) < len(bodies) and time.perf_counter() < queued_by:
        time.sleep(0.01)  # the whole burst is queued before the loop starts
    c0, t0 = compiles(), time.perf_counter()
    svc.start()
    try:
        client.join()
    finally:
        wall = time.perf_counter() - t0
        svc.stop()
    outs = got["outs"]
    bad = [o for o in outs if "ranking" not in o]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed in the {step} loop: {bad[0]}")
    return outs, wall, compiles() - c0


def _loop_figures(runs, step: str, n: int) -> dict:
    """Throughput, engine vs host time, latency and TTFT percentiles of one loop's bursts."""
    import numpy as np
    walls = [w for _, w, _ in runs]
    outs = [o for os_, _, _ in runs for o in os_]
    # device time: one prefill_s per serving step (every answer of a step carries the step's), the
    # rest of a burst is the loop's host work
    engine_s = [sum(set(o["timings"]["prefill_s"] for o in os_)) if step == "batched" else
                sum(o["timings"]["prefill_s"] for o in os_) for os_, _, _ in runs]
    return {"requests_per_s": float(n / np.median(walls)), "burst_s": [float(w) for w in walls],
            "engine_s_per_request": float(np.median(engine_s) / n),
            "host_s_per_request": float((np.median(walls) - np.median(engine_s)) / n),
            "remote_bytes_per_request": float(np.mean([o["cache"]["remote_item_bytes"] for o in outs])),
            "latency_s": percentiles([o["timings"]["total_s"] for o in outs]),
            "ttft_s": percentiles([o["timings"]["ttft_s"] for o in outs]),
            "prompt_tokens_p50": float(np.median([o["cache"]["prompt_tokens"] for o in outs])),
            "compiles_timed": int(sum(c for _, _, c in runs))}


def _agreement(serial, batched) -> dict:
    """The largest score difference and the share of identical rankings between two loops' answers."""
    diff, same = 0.0, 0
    for a, b in zip(serial, batched):
        sa = {x["item_id"]: x["score"] for x in a["ranking"]}
        sb = {x["item_id"]: x["score"] for x in b["ranking"]}
        diff = max(diff, max(abs(sa[i] - sb[i]) for i in sa))
        same += [x["item_id"] for x in a["ranking"]] == [x["item_id"] for x in b["ranking"]]
    return {"max_abs_score_diff": diff, "identical_rankings": same / len(serial)}


def main(argv):
    del argv
    mesh, layout = dist_cli.setup()
    import jax

    from rcllm_jax.recommender import open_served
    from rcllm_jax.settings import CatalogSettings, EngineSettings
    from rcllm_jax.serve.service import count_compiles
    from rcllm_jax.serve.state import StateStore

    loops = tuple(_LOOPS.value)
    if not loops or set(loops) - {"serial", "batched"}:
        raise app.UsageError(f"--loops takes serial and/or batched, not {loops}")
    served = open_served(catalog=CatalogSettings(history_len=_HIST.value, max_items=_MAX_ITEMS.value),
                         engine=EngineSettings(snapshot_dir=_SNAP.value), layout=layout, mesh=mesh)
    for note in served.notes:
        logging.info("%s", note)
    engine, ds = served.engine, served.dataset
    items = {i: ds.items[i] for i in served.item_ids}
    state = StateStore(Path(tempfile.mkdtemp()) / "state.sqlite3")  # the dataset's histories, in a scratch database
    state.seed(ds.name, {str(u): list(s) for u, s in ds.sequences.items()})
    # users with enough unseen catalog items to retrieve --num_candidates from (all of them on the whole catalog)
    users = [u for u in sorted(ds.sequences) if len(items.keys() - set(ds.sequences[u])) >= _CANDS.value][:_N.value]
    bodies = [{"user_id": u, "num_candidates": _CANDS.value} for u in users]
    count_compiles()
    for step in loops:  # warm-up: compiles, history prefixes
        _, wall, n = _burst(served, items, state, bodies, step)
        logging.info("warm-up %s: %d requests in %.1fs, %d compiles", step, len(bodies), wall, n)
    runs = {s: [] for s in loops}
    for _ in range(_REPEATS.value):
        for step in loops:
            outs, wall, n = _burst(served, items, state, bodies, step)
            runs[step].append((outs, wall, n))
            logging.info("%s: %d requests in %.2fs (%.2f req/s), %d compiles", step, len(bodies), wall,
                         len(bodies) / wall, n)
    result = {"config": {"mesh": f"items:{mesh.shape['items']}", "devices": int(mesh.size), "model": "SmolLM2-135M-Instruct",
                         "head": "slot", "mode": "rcllm", "placement": engine.store.placement,
                         "replicate": engine.store.replicate, "kv_dtype": str(engine.store.dtype),
                         "num_requests": len(bodies), "num_candidates": _CANDS.value, "history_len": _HIST.value,
                         "max_batch": _MAX_BATCH.value, "window": _WINDOW.value, "repeats": _REPEATS.value,
                         "backend": jax.default_backend()},
              "loops": {step: _loop_figures(runs[step], step, len(bodies)) for step in loops}}
    if len(loops) == 2:
        result["agreement"] = _agreement(runs["serial"][-1][0], runs["batched"][-1][0])
        result["speedup"] = result["loops"]["batched"]["requests_per_s"] / result["loops"]["serial"]["requests_per_s"]
    print(f"{'loop':<8} {'req/s':>7} {'latency p50':>12} {'p99':>7} {'TTFT p50':>9} {'p99':>7} {'compiles':>8}")
    for step in loops:
        r = result["loops"][step]
        print(f"{step:<8} {r['requests_per_s']:7.2f} {r['latency_s']['p50']:11.2f}s {r['latency_s']['p99']:6.2f}s "
              f"{r['ttft_s']['p50']:8.3f}s {r['ttft_s']['p99']:6.3f}s {r['compiles_timed']:8d}")
    if "speedup" in result:
        print(f"batched / serial throughput {result['speedup']:.2f}x on {dict(mesh.shape)}; rankings identical "
              f"{result['agreement']['identical_rankings']:.3f}, max |score diff| "
              f"{result['agreement']['max_abs_score_diff']:.2e}")
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

if __name__ == "__main__":
    app.run(main)
