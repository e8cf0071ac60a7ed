"""Launchers no other test runs, each with its default flags on a small configuration (the run
shortened, outputs in a temporary directory): they start, finish and write what they say.
(bench.py, build_cache.py, serve.py, recommend.py, loadtest.py, train.py, train_label.py,
bench_kv.py, bench_scaling.py and generate.py are run by their own tests.) device_check.py runs on
exported assets (random weights). The default model on
the first catalog items (--max_items), its item snapshot in the test's directory; bench_retrieval.py
needs no model (ML-100k)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600, env=None):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"} | (env or {})
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
def test_bench_retrieval_slices_and_llamarec_protocol(tmp_path):
    """One test position, one blended setting: every slice has requests; kNN never retrieves a new
    item (none was fitted) while the blended retriever and the content row do; the LlamaRec rows."""
    out = tmp_path / "retrieval.json"
    _run("bench_retrieval.py", "--test_positions=1", "--cold_shares=0.5", f"--output_json={out}")
    d = json.loads(out.read_text())
    slices = d["cold_slices"]["slices"]
    assert all(s["requests"] > 0 for s in slices.values())
    new = slices["new_items"]["rows"]
    assert new["item-knn"]["recall@20"] == 0 and new["blended (cold_share 0.5) [default]"]["recall@20"] > 0
    assert new["content"]["recall@20"] > 0 and new["popularity"]["recall@20"] == 0
    assert set(d["llamarec"]["rows"]) == {"item-knn", "blended [default]"} and d["llamarec"]["users"] == 943


@pytest.mark.slow
def test_bench_prefill_default_model(tmp_path):
    out = tmp_path / "prefill.json"
    _run("bench_prefill.py", "--lengths=16", "--reps=1", "--notransformers", f"--output_json={out}")
    assert json.loads(out.read_text())


@pytest.mark.slow
def test_bench_build_on_a_small_catalog(tmp_path):
    out = tmp_path / "build.json"
    _run("bench_build.py", "--catalog_scales=1", "--max_items=40", "--prefill_requests=1", "--devices=2",
         f"--output_json={out}")
    got = json.loads(out.read_text())
    (row,) = got["rows"]
    assert row["catalog_items"] == 40 and row["encoded_tokens"] > 0 and got["prefill"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_bench_profile_and_bench_serving_on_a_small_catalog(tmp_path):
    """Both open the served engine; the second reuses the item snapshot the first built."""
    snap, prof, serving = tmp_path / "snap", tmp_path / "profile.json", tmp_path / "serving.json"
    env_path = {"PYTHONPATH": str(ROOT)}  # bench_profile measures the checkout PYTHONPATH names
    _run("bench_profile.py", "--max_items=40", f"--snapshot_dir={snap}", "--num_users=1", "--reps=1",
         "--history_len=10", "--candidates=10", f"--output_json={prof}", env=env_path)
    got = json.loads(prof.read_text())
    assert set(got["median_ms"]) == {"request", "inputs", "fetch", "prefill", "floor"}
    assert all(v > 0 for v in got["median_ms"].values())
    _run("bench_serving.py", "--mesh=items:2", "--max_items=40", f"--snapshot_dir={snap}", "--num_requests=4",
         "--repeats=1", "--num_candidates=10", "--history_len=10", "--window=4", "--max_batch=2",
         f"--output_json={serving}")
    got = json.loads(serving.read_text())
    assert set(got["loops"]) == {"serial", "batched"} and got["agreement"]["identical_rankings"] == 1.0
    assert all(r["compiles_timed"] == 0 for r in got["loops"].values())


def test_benchmark_suite_jobs_follow_the_sizes(tmp_path):
    """make_benchmarks.py's runs: the sizes reach the launchers' flags, the grid and the tuned model
    add their runs only when asked, and every run writes its own JSON under the output directory."""
    from rcllm_jax.eval.benchmarks_report import SuiteSizes, suite_jobs
    plain = suite_jobs(tmp_path, SuiteSizes())
    assert not any(n.startswith(("grid", "tuned")) for n in plain)
    jobs = suite_jobs(tmp_path, SuiteSizes(served_users=7, grid_history_lens=("20",), grid_candidates=("50",),
                                           catalog_scales=("1", "3"), tuned_model="m"))
    assert set(jobs) - set(plain) == {"grid h20 c50", "tuned block-aware"}
    script, args = jobs["grid h20 c50"]
    assert script == "bench.py" and {"--num_candidates=50", "--history_len=20"} <= set(args)
    assert "--model=m" in jobs["tuned block-aware"][1] and "--num_users=7" in jobs["served sweep"][1]
    assert "--catalog_scales=1,3" in jobs["scaling"][1]
    outputs = [a.split("=", 1)[1] for _, args in jobs.values() for a in args if a.startswith("--output_json=")]
    assert len(outputs) == len(set(outputs)) == len(jobs)
    assert all(Path(o).parent == tmp_path for o in outputs)


@pytest.mark.slow
def test_device_check_on_cpu_with_exported_assets(tmp_path):
    """What a device call runs, here: the assets a machine without network needs (the default
    model's config and tokenizer, no weights; ml-100k), then the check on them. On CPU the
    lowering step runs, the compiled kernel step is skipped (no compiled variant), and the timing
    step times every mode on the random-weight model; no verdict of verified kernels."""
    assets, out = tmp_path / "assets", tmp_path / "check.json"
    _run("device_check.py", f"--export_assets={assets}")
    assert (assets / "model" / "config.json").exists() and not list((assets / "model").glob("*.safetensors"))
    r = _run("device_check.py", f"--assets={assets}", "--history_len=4", "--num_candidates=4", "--num_users=2",
             "--calibration_requests=2", f"--output_json={out}")
    got = json.loads(out.read_text())
    lower, kernels, timing = (got["steps"][k] for k in ("lower", "kernels", "timing"))
    assert lower["rc"] == 0 and lower["tests"] == 4 and lower["failures"] == 0
    assert kernels["rc"] == "skipped" and not got["kernels_verified"]
    assert timing["rc"] == 0 and set(timing["ttft_p50_s"]) == {"full", "prefix_warm", "rcllm"}
    assert timing["config"]["random_weights"] and "prefix_warm / rcllm" in r.stdout
