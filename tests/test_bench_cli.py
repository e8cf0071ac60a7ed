"""launch/bench.py end to end: the table and the JSON schema the later modes extend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_table_and_json(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "--modes=full,prefix,stitch,rcllm",
                        "--head=label", "--num_users=3", "--requests_per_user=2", "--num_candidates=5",
                        "--history_len=4", "--calibration_requests=8",
                        "--dataset=ml-100k", f"--output_json={out}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HR@1" in r.stdout and "popularity" in r.stdout
    data = json.loads(out.read_text())
    assert data["config"]["num_requests"] == 6 and data["config"]["num_candidates"] == 5
    rows = {row["mode"]: row for row in data["results"]}
    assert set(rows) == {"full", "prefix", "stitch", "rcllm", "hf_full", "hf_prefix", "popularity", "random"}
    # the transformers peer: same weights and prompts, so its answers equal our full prefill
    assert "transformers peer: loaded" in r.stdout and data["config"]["peers"]["transformers"].startswith("loaded")
    for m in ("hf_full", "hf_prefix"):
        assert rows[m]["impl"] == "torch" and rows[m]["top1_agreement"] == 1.0 and rows[m]["kl_mean"] < 1e-4
    assert rows["hf_prefix"]["cache_hit_tokens"] > 0 and rows["hf_full"]["cache_hit_tokens"] == 0
    assert rows["hf_prefix"]["computed_tokens_p50"] < rows["hf_full"]["computed_tokens_p50"]
    plots = [out.parent / p for p in data["config"]["plots"]]  # relative to the JSON's folder
    assert {Path(p).name for p in plots} == {"ttft_cdf.png", "fidelity_vs_recompute.png", "ttft_vs_prompt_length.png"}
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000 for p in plots)
    assert all(rows[m]["compiles_during_timing"] == 0 for m in ("full", "prefix", "stitch", "rcllm"))
    assert rows["prefix"]["kl_mean"] < 1e-6 and rows["prefix"]["top1_agreement"] == 1.0  # exact reuse
    assert rows["prefix"]["cache_hit_tokens"] > 0
    assert rows["stitch"]["recompute_fraction"] == 0.0 and rows["stitch"]["cache_hit_tokens"] > 0
    for m in ("stitch", "rcllm"):
        assert rows[m]["ttft_over_floor"] > 0 and -1.0 <= rows[m]["kendall_tau"] <= 1.0
    full = rows["full"]
    for key in ("ttft_p50_s", "ttft_p99_s", "prompt_tokens_p50", "hr@1", "hr@5", "hr@10", "ndcg@10", "mrr"):
        assert key in full
    assert 0 < full["ttft_p50_s"] <= full["ttft_p99_s"]
    assert all(0.0 <= rows[m][k] <= 1.0 for m in rows for k in ("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr"))
    assert full["hr@5"] == 1.0  # 5 candidates: the target is always in the top 5
    # rcllm ran the policy calibrated for this model's own answer labels (other users than the measured)
    cal = data["config"]["calibration"]
    assert cal["requests"] == 8 and cal["target_met"] == (cal["policy"] != "exact") and "rcllm policy:" in r.stderr
    assert {k: rows["rcllm"]["policy"][k] for k in ("sink", "ratio", "cached_glue")} == {
        k: cal[k] for k in ("sink", "ratio", "cached_glue")}
    assert cal["measured"]["kl_mean"] <= 0.01 or not cal["target_met"]


def test_compare_impl_rows(tmp_path):
    """Kernel vs XLA path in one run: the same rankings (on CPU the kernels run in the Pallas
    interpreter, so the smallest workload)."""
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "--modes=full,rcllm", "--num_users=1",
                        "--calibration_requests=0",
                        "--head=label", "--num_candidates=2", "--history_len=1", "--nowarmup", "--compare_impl",
                        "--peers=",
                        f"--output_json={out}"], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["mode"]: row for row in data["results"]}
    assert data["config"]["attention_impl"] == "xla" and rows["rcllm@pallas"]["impl"] == "interpret"
    assert abs(rows["rcllm@pallas"]["kl_mean"] - rows["rcllm"]["kl_mean"]) <= 1e-4
    assert rows["rcllm@pallas"]["top1_agreement"] == rows["rcllm"]["top1_agreement"]


def test_unknown_mode_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "--modes=warp", "--num_users=1",
                        f"--output_json={tmp_path / 'x.json'}"], capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "unknown mode 'warp'" in r.stderr


def test_unknown_toml_key_is_refused(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[bench]\nnum_userz = 3\n")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), f"--config={cfg}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "unknown key bench.num_userz" in r.stderr


def test_replay_a_request_log_with_prefix_warm(tmp_path):
    """--requests replays our own lines (opaque user ids, arrival times, one without a target);
    prefix_warm computes each user's instruction + history pages at event time, so a request
    computes less than plain prefix caching on a first visit and ranks exactly as full prefill."""
    log = tmp_path / "reqs.jsonl"
    lines = [{"user_id": "u-1", "history": [1, 50, 181], "candidates": [7, 100, 258, 9], "target": 100, "arrival_s": 0},
             {"user_id": 42, "history": [12, 13], "candidates": [1, 2, 3], "arrival_s": 0.5},
             {"user_id": "u-1", "history": [1, 50, 181, 100], "candidates": [7, 258, 9, 11], "target": 9,
              "arrival_s": 2.0}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), f"--requests={log}", "--head=label",
                        "--modes=full,prefix,prefix_warm,rcllm", "--history_len=4", "--peers=", "--nowarmup",
                        "--calibration_requests=0",
                        f"--output_json={out}"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["mode"]: row for row in data["results"]}
    assert data["config"]["num_requests"] == 3
    warm, cold = rows["prefix_warm"], rows["prefix"]
    assert warm["top1_agreement"] == 1.0 and warm["kl_mean"] < 1e-6
    assert warm["computed_tokens_p50"] < cold["computed_tokens_p50"] and warm["history_update_s_p50"] > 0
    assert rows["full"]["hr@5"] == 1.0 and "response_p50_s" in rows["rcllm"]  # 2 lines with a target, <= 4 candidates
    # a bad line is named, and nothing runs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "candidates": [1, 99999]}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), f"--requests={bad}", "--modes=full",
                        "--peers=", f"--output_json={tmp_path / 'x.json'}"], capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and f"{bad}:2: unknown item 99999 in candidates" in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bench_kv_compares_bf16_with_the_f32_cache(tmp_path):
    """launch/bench_kv.py: the f32 reference row agrees with itself exactly; the bf16 cache holds
    half the bytes per token and its fidelity figures are in range."""
    out = tmp_path / "kv.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_kv.py"), "--num_users=8", "--num_candidates=6",
                        "--history_len=3", f"--output_json={out}"], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["kv_dtype"]: x for x in json.loads(out.read_text())["results"]}
    f32, bf16 = rows["float32"], rows["bfloat16"]
    assert f32["top1_agreement_vs_float32"] == 1.0 and f32["kl_mean_vs_float32"] == 0.0
    assert f32["ndcg@10_minus_reference"] == 0.0
    assert bf16["bytes_per_token"] * 2 == f32["bytes_per_token"]
    assert 0.0 <= bf16["top1_agreement_vs_float32"] <= 1.0 and 0.0 <= bf16["kl_mean_vs_float32"] < 0.05
    assert bf16["x100_catalog_gb_per_shard"] * 2 == pytest.approx(f32["x100_catalog_gb_per_shard"])
    assert "bfloat16" in r.stdout


def test_slice_runs_only_that_slice_with_the_content_and_ablation_rows(tmp_path):
    """--slice=new_items: the requests are exactly the test targets (position 1) that are new items
    of users the fits kept (counted here from the slice definition by hand), the retrievers never
    saw a new item, and the rows a slice is judged by are there: content, the head's
    collaborative-only ablation and every mode's paired difference to it."""
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.slices import choose_cold
    ds = load_dataset()
    cold = choose_cold(ds)
    split = LeaveOneOut(ds)
    want = sum(1 for u in split.users if u not in cold.new_users and ds.sequences[u][-1] in cold.new_items)
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "launch" / "bench.py"), "--modes=full", "--slice=new_items",
           "--candidates=retrieved", "--test_positions=1", "--num_users=943", "--rank_retrieved_only",
           "--nowarmup", "--peers=", f"--output_json={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["slice"] == "new_items" and data["config"]["num_requests"] == want > 0
    assert data["config"]["cold"]["new_items"] == len(cold.new_items)
    rows = {row["mode"]: row for row in data["results"]}
    assert {"content", "collaborative_only", "collaborative", "retriever", "popularity"} <= set(rows)
    assert "ndcg@10_retrieved_minus_collaborative_only_ci" in rows["full"]
    assert "minus the head's collaborative-only ablation" in r.stdout
    r = subprocess.run(cmd[:4] + ["--candidates=retrieved", f"--output_json={out}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "--slice needs --test_positions" in r.stderr
