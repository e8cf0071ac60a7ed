"""launch/bench_scaling.py end to end on a small grid: every (catalog, devices, placement,
replication, scheduler) row, one device = nothing remote, replicas within their budget, and the
plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scaling_grid(tmp_path, smollm2_path):
    out = tmp_path / "s.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench_scaling.py"), "--catalog_scales=1,2",
                        "--device_counts=1,2", "--num_requests=5", "--placements=coaccess,hash",
                        "--replicate=0,0.1", f"--output_json={out}"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert len(rows) == 24 and {r["catalog_items"] for r in rows} == {1682, 3364}
    for row in rows:
        assert row["ttft_p50_s"] > 0 and row["max_over_mean_load"] <= 1.1
        if row["devices"] == 1:
            assert row["local_fraction"] == 1.0 and row["remote_bytes_per_request"] == 0 and row["replicate"] == 0
        else:
            assert 0 < row["local_fraction"] <= 1
        held = row["replicated_item_tokens"]  # at x2 the log's (real) items can fit on one shard: nothing remote
        assert (held > 0) == (row["replicate"] > 0) or row["catalog_scale"] > 1
        assert row["max_shard_tokens_over_mean"] <= 1.1 + row["replicate"]
    key = {(r["catalog_scale"], r["devices"], r["placement"], r["replicate"], r["scheduler"]): r for r in rows}
    for s in (1, 2):
        for p in ("coaccess", "hash"):  # affinity routing never fetches more than round-robin on the same placement
            assert key[s, 2, p, 0.0, "affinity"]["local_fraction"] >= key[s, 2, p, 0.0, "round_robin"]["local_fraction"]
        assert key[s, 2, "hash", 0.0, "affinity"]["remote_blocks_per_request"] > 0
    ratios = data["config"]["remote_ratios"]
    assert [(t["catalog_scale"], t["devices"]) for t in ratios] == [(1, 2), (2, 2)]
    assert ratios[0]["hash_affinity_ratio"] > 2  # co-access + replicas: far fewer remote bytes
    assert ratios[1]["hash_affinity_ratio"] is None or ratios[1]["hash_affinity_ratio"] > 2  # None: nothing remote
    assert all((out.parent / p).read_bytes()[:4] == b"\x89PNG" for p in data["config"]["plots"])
