"""Launchers no other test runs, each with its default flags on a small configuration (the run
shortened, outputs in a temporary directory): they start, finish and write what they say.
(bench.py, build_cache.py, serve.py, recommend.py, loadtest.py, train.py, train_label.py,
bench_kv.py, bench_scaling.py and generate.py are run by their own tests.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    r = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, (script, r.stderr[-3000:])
    return r


@pytest.mark.slow
def test_bench_state_on_sqlite_and_postgres(tmp_path):
    out = tmp_path / "state.json"
    r = _run("bench_state.py", "--duration_s=1", "--clients=2", "--postgres", f"--output_json={out}")
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"sqlite (WAL, synchronous=FULL)", "postgresql (pgserver, local socket)"}, r.stdout
    assert all(x["events"] > 0 and x["all_stored"] for x in rows.values())


def test_make_benchmarks_regenerates_the_committed_report(tmp_path):
    """BENCHMARKS.md is exactly what make_benchmarks.py writes from the committed JSON (--norun;
    the report written elsewhere differs only in its image paths, relative to where it lies)."""
    report = tmp_path / "BENCHMARKS.md"
    _run("make_benchmarks.py", "--norun", f"--report={report}")
    rel = os.path.relpath(ROOT, tmp_path)
    got = re.sub(r"\]\(" + re.escape(rel) + "/", "](", report.read_text())
    assert got == (ROOT / "BENCHMARKS.md").read_text()


def test_scaling_model_reads_the_committed_runs(tmp_path):
    out = tmp_path / "model.json"
    _run("scaling_model.py", f"--output_json={out}")
    assert json.loads(out.read_text())


@pytest.mark.slow
def test_bench_prefill_default_model(tmp_path):
    out = tmp_path / "prefill.json"
    _run("bench_prefill.py", "--lengths=16", "--reps=1", "--notransformers", f"--output_json={out}")
    assert json.loads(out.read_text())
