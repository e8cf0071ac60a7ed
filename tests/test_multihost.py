"""Two processes x 2 CPU devices on loopback (jax.distributed + gloo) build a sharded item store
on items:4, rank, save and restore a snapshot; the rankings equal one process on items:1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import rel_err
from multihost_case import MODES, case, engine_for
from rcllm_jax.parallel.mesh import MeshSpec, make_mesh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_rank_like_one(tmp_path, smollm2_path):
    worker = Path(__file__).resolve().parent / "multihost_worker.py"
    out, snap, port = tmp_path / "scores.json", tmp_path / "snap", _free_port()
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(out), str(snap)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = json.loads(out.read_text())
    assert len(got["shard_loads"]) == 4 and min(got["shard_loads"]) > 0

    builder, params, items, reqs, prompts = case()
    eng = engine_for(params, builder, items, make_mesh(MeshSpec(1)))
    eng.build_store()
    for i, (r, p) in enumerate(zip(reqs, prompts)):
        for m in MODES:
            ref = eng.rank(p, m, user_id=r.user_id).scores
            assert rel_err(np.asarray(got["scores"][f"{i}/{m}"]), ref) <= 1e-5, (i, m)
            if m == "stitch":
                assert rel_err(np.asarray(got["restored"][str(i)]), ref) <= 1e-5, i
