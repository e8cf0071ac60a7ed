"""Regenerate BENCHMARKS.md: run the benchmark suite (unless --norun) and write the report.

python launch/make_benchmarks.py [--tuned_model=runs/block/merged] [--norun]
Runs, each in its own process, writing JSON and plots under --out_dir:
  bench.py on the serving workload (every mode, a recompute sweep, the transformers peer) for the
    zero-shot model and, when given, the tuned block-aware model;
  bench.py --mesh=items:4 --placement=similarity|hash on retrieval candidates (locality, TTFT);
  bench.py over the grid --grid_history_lens x --grid_candidates (every mode; off by default);
  bench_scaling.py (devices x catalog size x placement x replication x scheduler), bench_kv.py
  (cache dtypes), bench_build.py (item-cache build throughput).
Then formats every figure from those JSON files into BENCHMARKS.md (nothing is typed in by hand:
the targets are checked against the measured numbers).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the report reads the shipped head of this checkout, installed or not

from rcllm_jax.eval.benchmarks_report import SuiteSizes, render, suite_jobs  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "docs/benchmarks", "Where the JSON files and plots go (committed "
                               "with BENCHMARKS.md, which links the plots).")
_REPORT = flags.DEFINE_string("report", str(ROOT / "BENCHMARKS.md"), "The report file.")
_RUN = flags.DEFINE_bool("run", True, "Run the benchmarks (--norun: only rewrite BENCHMARKS.md from the JSON).")
_ONLY = flags.DEFINE_list("only", [], "Run only the runs whose name starts with one of these (e.g. grid, served, "
                          "ranker, mesh, kv_dtype, build, scaling, serving); the report is rewritten from every JSON.")
_TOP1 = flags.DEFINE_float("top1", 0.99, "Top-1 agreement the cheapest sufficient recompute budget must keep.")
_SIZES = {
    "num_users": "Users in the serving workload (2 requests each) and the label-prompt mesh runs.",
    "served_users": "Test users of the served-model fidelity sweep (the modes run on those whose target was "
                    "retrieved).",
    "ttft_users": "Users of the TTFT run at history 50 / 50 candidates.",
    "ranker_users": "Test users of the served ranker's accuracy + fidelity runs (the model runs on those whose "
                    "target was retrieved).",
    "mesh_users": "Test users of the placement runs on retrieved candidates.",
    "grid_users": "Test users per grid point (one request each, their item-kNN top candidates in the retriever's "
                  "order).",
    "grid_history_lens": "History lengths of the TTFT grid (e.g. 20,50; empty: no grid).",
    "grid_candidates": "Candidate counts of the TTFT grid.",
    "catalog_scales": "Catalog scales of bench_scaling.py.",
    "tuned_model": "A tuned, block-aware model (launch/train_label.py <dir>/merged): adds its rows.",
}
for _name, _help in _SIZES.items():
    _default = getattr(SuiteSizes(), _name)
    if isinstance(_default, tuple):
        flags.DEFINE_list(_name, list(_default), _help)
    elif isinstance(_default, int):
        flags.DEFINE_integer(_name, _default, _help)
    else:
        flags.DEFINE_string(_name, _default, _help)


def main(argv):
    del argv
    out = Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    if _RUN.value:
        values = {n: flags.FLAGS[n].value for n in _SIZES}
        sizes = SuiteSizes(**{n: tuple(v) if isinstance(v, list) else v for n, v in values.items()})
        for name, (script, args) in suite_jobs(out, sizes).items():
            if _ONLY.value and not any(name.startswith(p) for p in _ONLY.value):
                continue
            print(f"== {name}: {script} {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], check=True)
    Path(_REPORT.value).write_text(render(out, Path(_REPORT.value), _TOP1.value))
    print(f"wrote {_REPORT.value}")


if __name__ == "__main__":
    app.run(main)
