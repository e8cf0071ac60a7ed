"""launch/bench_scaling.py end to end on a small grid: every (catalog, devices, placement,
scheduler) row, one device = nothing remote, and the plots."""

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
                        "--device_counts=1,2", "--num_requests=5", f"--output_json={out}"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert len(rows) == 16 and {r["catalog_items"] for r in rows} == {1682, 3364}
    for row in rows:
        assert row["ttft_p50_s"] > 0 and row["max_over_mean_load"] <= 1.1
        if row["devices"] == 1:
            assert row["local_fraction"] == 1.0 and row["remote_bytes_per_request"] == 0
        else:
            assert 0 < row["local_fraction"] < 1 and row["remote_blocks_per_request"] > 0
    key = {(r["catalog_scale"], r["devices"], r["placement"], r["scheduler"]): r for r in rows}
    # affinity routing never fetches more than round-robin on the same placement
    for s in (1, 2):
        for p in ("similarity", "hash"):
            assert key[s, 2, p, "affinity"]["local_fraction"] >= key[s, 2, p, "round_robin"]["local_fraction"]
    assert all((out.parent / p).read_bytes()[:4] == b"\x89PNG" for p in data["config"]["plots"])
