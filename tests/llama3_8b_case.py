"""Llama-3-8B's real dimensions (1 layer, random bf16 weights) ranked on one mesh, in a process of
its own (tests/test_mesh.py runs it once per mesh: ~12 GB that must not stay in the test process).

python tests/llama3_8b_case.py items:2,model:4 OUT.npz  -> every request's scores per mode and step,
and the shapes of the query projection's pieces on the devices."""

import os
import sys

from rcllm_jax.parallel.mesh import parse_mesh, simulate_cpu_devices


def main(mesh_text: str, out: str):
    spec = parse_mesh(mesh_text)
    simulate_cpu_devices(max(8, spec.size))
    import jax
    import numpy as np

    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import stream_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import init_params, load_model
    from rcllm_jax.model.config import shape_preset
    from rcllm_jax.parallel.mesh import make_mesh
    cfg = shape_preset("llama3-8b", layers=1, dtype="bfloat16")
    split = LeaveOneOut(load_dataset("ml-100k"))
    builder = PromptBuilder(load_model(with_tokenizer=True).tokenizer, split.dataset.items, history_len=3,
                            head="label")
    reqs = stream_requests(split, num_users=2, requests_per_user=1, num_candidates=4, negatives="retrieval", seed=3)
    prompts = [builder.build(r.history, r.candidates) for r in reqs]
    items = sorted({i for r in reqs for i in r.candidates})
    e = Engine(init_params(cfg, jax.random.key(0)), cfg, builder, item_ids=items, mesh=make_mesh(spec), user_pages=16,
               prefix_pages=4, max_candidates=4)
    e.build_store()
    got = {f"{mode}_{i}": np.asarray(e.rank(p, mode, user_id=r.user_id).scores, np.float32)
           for mode in ("full", "rcllm") for i, (r, p) in enumerate(zip(reqs, prompts))}
    step = e.rank_step([(p, r.user_id, None) for p, r in zip(prompts, reqs)], "rcllm")
    got |= {f"step_{i}": np.asarray(g.scores, np.float32) for i, g in enumerate(step)}
    got["wq_piece"] = np.asarray(sorted({s.data.shape for s in e.params["layers"]["wq"].addressable_shards}))
    np.savez(out, **got)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], sys.argv[2])
