"""Where an rcllm request's time goes, step by step, next to its floor.

  python launch/bench_profile.py --history_len=50 --candidates=50 --label=after \
      --output_json=docs/benchmarks/profile_after.json

One served engine (`open_served`: default model and slot head, item caches from the snapshot, one
device), test users' histories, the item-kNN retriever's top candidates. Each step is timed on
its own on the same requests (median of --reps after one untimed run, so compiles are excluded):

  request      `Engine.rank` as the server calls it (everything below, plus the host-side scores)
  inputs       `Engine.prefill_inputs`: stitch plan + the fetch + the request's device arrays
  fetch        the item rows' fetch alone (`BlockStore.fetch`: gather + re-rotation into a buffer)
  prefill      the blended prefill alone (`PrefillInputs.run`, the jitted program)

The floor (`rcllm_jax.eval.floor.request_floor_s`, as bench.py reports it): the larger of the
FLOPs of the tokens the request computes at this machine's measured matmul peak and the bytes it
must read (cached KV rows + weights) at its measured bandwidth. `--label` names the
code measured (e.g. before / after a change; run the same script against another checkout with
PYTHONPATH pointing at it); make_benchmarks.py puts every profile_*.json side by side.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import date
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

_H = flags.DEFINE_integer("history_len", 50, "History items in the prompt.")
_C = flags.DEFINE_integer("candidates", 50, "Retrieved candidates per request.")
_USERS = flags.DEFINE_integer("num_users", 4, "Test users (one request each).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per step and request (median).")
_LABEL = flags.DEFINE_string("label", "", "What code this measures (stored in the JSON).")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the JSON.")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 0, "Only the first N catalog items (0 = all; smoke tests).")
_SNAP = flags.DEFINE_string("snapshot_dir", None, "Item snapshot directory (default: the served one's).")


def _median_ms(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _commit() -> str:
    import rcllm_jax
    src = Path(rcllm_jax.__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv):
    del argv
    from rcllm_jax.eval import floor
    from rcllm_jax.recommender import open_served
    from rcllm_jax.settings import CatalogSettings, EngineSettings
    served = open_served(catalog=CatalogSettings(history_len=_H.value, max_items=_MAX_ITEMS.value),
                         engine=EngineSettings(max_candidates=max(_C.value, 52), snapshot_dir=_SNAP.value))
    eng, rec, ds = served.engine, served.recommender, served.dataset
    peak, bandwidth = floor.matmul_peak_flops(), floor.memory_bandwidth()
    itemsize = np.dtype(eng.cfg.dtype).itemsize
    rows = []
    for user in sorted(ds.sequences)[:_USERS.value]:
        history = ds.sequences[user][:_H.value]
        prompt = eng.builder.build(list(history), rec.candidates(history, _C.value))
        eng.rank(prompt, "rcllm", user_id=user)  # caches the user's prefix: a returning user from here on
        res = eng.rank(prompt, "rcllm", user_id=user)
        inputs, lay, _ = eng.prefill_inputs(prompt, "rcllm", user)
        weights = eng.weights(lay.shard, query=True)
        steps = {
            "request": _median_ms(lambda: eng.rank(prompt, "rcllm", user_id=user).scores, _REPS.value),
            "inputs": _median_ms(lambda: eng.prefill_inputs(prompt, "rcllm", user)[0].arrays, _REPS.value),
            "fetch": _median_ms(lambda: eng.store.fetch(lay.block_slots, lay.real_pos - lay.canon_pos, lay.shard,
                                                        eng.impl), _REPS.value),
            "prefill": _median_ms(lambda: inputs.run(weights), _REPS.value),
        }
        read = res.cache_hit_tokens * eng.kv_bytes_per_token + floor.prompt_weight_bytes(eng.cfg, prompt, itemsize)
        floor_ms = floor.request_floor_s(eng.cfg, res.computed_tokens, res.prompt_tokens, read, peak, bandwidth) * 1e3
        rows.append({"user": int(user), "prompt_tokens": len(prompt), "computed_tokens": res.computed_tokens,
                     "prefix_rows": int(len(lay.prefix_slots)), "suffix_rows": int(len(lay.tokens)),
                     "recompute_rows": int(inputs.n_select), "steps_ms": steps, "floor_ms": floor_ms})
        print(f"user {user}: prompt {len(prompt)}, computed {res.computed_tokens}, "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in steps.items()) + f", floor {floor_ms:.1f} ms", flush=True)
    med = {k: float(np.median([r["steps_ms"][k] for r in rows])) for k in rows[0]["steps_ms"]}
    med["floor"] = float(np.median([r["floor_ms"] for r in rows]))
    commit = _commit()
    print(f"\n{_LABEL.value or 'this code'} ({commit}), history {_H.value} / {_C.value} candidates, median ms:")
    print("| step | ms |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in med.items()))
    if _OUT.value:
        out = {"label": _LABEL.value, "commit": commit, "date": date.today().isoformat(),
               "history_len": _H.value, "candidates": _C.value, "model": "default (SmolLM2-135M-Instruct + shipped slot head)",
               "engine_fingerprint": eng.fingerprint[:16], "impl": eng.impl, "devices": 1, "matmul_peak_flops": peak,
               "bandwidth_bytes_s": bandwidth, "median_ms": med, "requests": rows}
        Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_OUT.value).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
