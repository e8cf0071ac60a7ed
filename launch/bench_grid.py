"""The issue-4 grid: history 20/50 x candidates 20/50/100, every mode, one bench.py run per point.

python launch/bench_grid.py --output_dir=bench_out/grid [--num_users=6 --requests_per_user=2]
Prints one table (TTFT p50 per mode, speed-ups of rcllm vs prefix and full, fidelity) and writes
grid.json with every point's full JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from absl import app, flags

_OUT = flags.DEFINE_string("output_dir", "bench_out/grid", "Folder for per-point JSON and grid.json.")
_HIST = flags.DEFINE_list("history_lens", ["20", "50"], "History lengths.")
_CANDS = flags.DEFINE_list("candidates", ["20", "50", "100"], "Candidate counts.")
_USERS = flags.DEFINE_integer("num_users", 6, "Users per point.")
_RPU = flags.DEFINE_integer("requests_per_user", 2, "Requests per user.")
_MODES = flags.DEFINE_string("modes", "full,prefix,stitch,sink,deviation,rcllm", "Modes.")
_EXTRA = flags.DEFINE_list("bench_args", ["--cached_glue"], "Extra flags passed to bench.py.")


def main(argv):
    del argv
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    bench = Path(__file__).resolve().parent / "bench.py"
    points = []
    for h in _HIST.value:
        for c in _CANDS.value:
            path = out / f"h{h}_c{c}.json"
            cmd = [sys.executable, str(bench), f"--modes={_MODES.value}", f"--num_users={_USERS.value}",
                   f"--requests_per_user={_RPU.value}", f"--history_len={h}", f"--num_candidates={c}",
                   f"--output_json={path}", *_EXTRA.value]
            print("running", " ".join(cmd[1:]), flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"bench failed at h={h} c={c}:\n{r.stderr[-3000:]}")
            points.append(json.loads(path.read_text()))
    header = f"{'H':>3} {'K':>4} {'tokens':>6}  " + " ".join(f"{m:>9}" for m in _MODES.value.split(","))
    print(header + f" {'vs prefix':>9} {'vs full':>8} {'KL':>6} {'tau':>5} {'top1':>5}")
    for p in points:
        rows = {r["mode"]: r for r in p["results"]}
        t = {m: rows[m]["ttft_p50_s"] for m in _MODES.value.split(",")}
        best = rows.get("rcllm", {})
        print(f"{p['config']['history_len']:>3} {p['config']['num_candidates']:>4} "
              f"{p['config']['prompt_tokens']['p50']:>6.0f}  " + " ".join(f"{v:>9.3f}" for v in t.values())
              + f" {t.get('prefix', float('nan')) / t.get('rcllm', float('nan')):>8.1f}x"
              + f" {t.get('full', float('nan')) / t.get('rcllm', float('nan')):>7.1f}x"
              + f" {best.get('kl_mean', float('nan')):>6.3f} {best.get('kendall_tau', float('nan')):>5.2f}"
              + f" {best.get('top1_agreement', float('nan')):>5.2f}")
    (out / "grid.json").write_text(json.dumps(points, indent=2))
    print(f"wrote {out / 'grid.json'} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    app.run(main)
