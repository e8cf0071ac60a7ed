"""One process of the 2-process test in test_multihost.py: build (or restore) a sharded item store
on a mesh spanning both processes and rank a fixed set of prompts; process 0 writes the scores."""

import json
import os
import sys
from pathlib import Path

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(process_id: int, port: int, out: str, snap: str):
    from rcllm_jax.parallel.multihost import initialize
    initialize(f"127.0.0.1:{port}", 2, process_id)
    import jax
    from multihost_case import MODES, case, engine_for
    from rcllm_jax.parallel.mesh import MeshSpec, make_mesh
    assert jax.device_count() == 4 and jax.process_count() == 2
    builder, params, items, reqs, prompts = case()
    mesh = make_mesh(MeshSpec(4))
    eng = engine_for(params, builder, items, mesh)
    eng.build_store()
    scores = {}
    for i, (r, p) in enumerate(zip(reqs, prompts)):
        for m in MODES:
            res = eng.rank(p, m, user_id=r.user_id)
            scores[f"{i}/{m}"] = [float(x) for x in res.scores]
    eng.save(snap)
    again = engine_for(params, builder, items, mesh)
    again.restore(snap)
    restored = {}
    for i, (r, p) in enumerate(zip(reqs, prompts)):
        res = again.rank(p, "stitch", user_id=r.user_id)
        restored[str(i)] = [float(x) for x in res.scores]
    if process_id == 0:
        Path(out).write_text(json.dumps({"scores": scores, "restored": restored,
                                         "shard_loads": eng.store.shard_loads().tolist()}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
