"""Accuracy and stitching fidelity of several models side by side (zero-shot vs tuned vs
tuned + block-aware): one bench.py run per model on the same requests.

python launch/bench_models.py --models=zero-shot=,tuned=runs/tuned/merged,block=runs/block/merged \
    --num_users=200 --output_dir=bench_out/models
Per model: HR@1/5/10 and NDCG@10 of full prefill, the popularity baseline on the same candidates,
top-1 agreement / KL / HR@10 of every block mode vs the model's own full prefill, and the lowest
recompute fraction at which a block mode keeps top-1 agreement >= --top1 (the budget the default
rcllm policy needs). Writes models.json with every run's full JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from absl import app, flags

_MODELS = flags.DEFINE_list("models", ["zero-shot="], "name=PATH pairs (empty PATH: the default model).")
_OUT = flags.DEFINE_string("output_dir", "bench_out/models", "Folder for per-model JSON and models.json.")
_USERS = flags.DEFINE_integer("num_users", 200, "Users (one test request each).")
_MODES = flags.DEFINE_string("modes", "full,stitch,sink,deviation,rcllm", "Modes.")
_SWEEP = flags.DEFINE_string("sweep", "0.05,0.1,0.2,0.3,0.5", "Recompute ratios (blend@r rows).")
_TOP1 = flags.DEFINE_float("top1", 0.99, "Top-1 agreement a policy must keep.")
_EXTRA = flags.DEFINE_list("bench_args", ["--nowarmup", "--peers="], "Extra flags passed to bench.py.")


def needed_budget(rows, top1: float):
    """(mode, recompute fraction) of the cheapest block row keeping top-1 agreement >= top1."""
    ok = [r for r in rows if r.get("recompute_fraction") is not None and r.get("top1_agreement", 0) >= top1]
    if not ok:
        return None, None
    best = min(ok, key=lambda r: (r["recompute_fraction"], r["ttft_p50_s"]))
    return best["mode"], best["recompute_fraction"]


def main(argv):
    del argv
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    bench = Path(__file__).resolve().parent / "bench.py"
    runs = {}
    for spec in _MODELS.value:
        name, _, path = spec.partition("=")
        js = out / f"{name}.json"
        cmd = [sys.executable, str(bench), f"--modes={_MODES.value}", f"--sweep={_SWEEP.value}",
               f"--num_users={_USERS.value}", f"--output_json={js}", *_EXTRA.value]
        if path:
            cmd.append(f"--model={path}")
        print("running", " ".join(cmd[1:]), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench failed for {name}:\n{r.stderr[-3000:]}")
        runs[name] = json.loads(js.read_text())
    block_modes = [m for m in _MODES.value.split(",") if m not in ("full", "prefix")]
    print(f"{'model':<10} {'HR@1':>6} {'HR@5':>6} {'HR@10':>6} {'NDCG10':>6} {'popHR10':>7}  "
          + "  ".join(f"{m + ' top1/KL/HR10':>24}" for m in block_modes) + "  budget for top-1")
    for name, run in runs.items():
        rows = {r["mode"]: r for r in run["results"]}
        f, pop = rows["full"], rows["popularity"]
        mode, frac = needed_budget(run["results"], _TOP1.value)
        cells = "  ".join(f"{rows[m]['top1_agreement']:>7.3f} {rows[m]['kl_mean']:>7.4f} {rows[m]['hr@10']:>7.3f}"
                          for m in block_modes)
        budget = "none" if mode is None else f"{frac:.3f} ({mode})"
        print(f"{name:<10} {f['hr@1']:>6.3f} {f['hr@5']:>6.3f} {f['hr@10']:>6.3f} {f['ndcg@10']:>6.3f} "
              f"{pop['hr@10']:>7.3f}  {cells}  {budget}")
    (out / "models.json").write_text(json.dumps(runs, indent=2))
    print(f"wrote {out / 'models.json'}")


if __name__ == "__main__":
    app.run(main)
