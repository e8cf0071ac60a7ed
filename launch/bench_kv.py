"""Compact cached KV: the served ranking from a bf16 item cache against the same from an f32 one,
in one run, on the same requests.

python launch/bench_kv.py --num_users=943 --output_json=bench_out/kv_dtype.json
The served configuration (default model, shipped slot head over the retriever's collaborative
features, the item-kNN retriever's top-K of the test users' histories, rcllm mode). The f32 cache
is encoded once; every other dtype's store takes those blocks, cast (`Engine.copy_blocks_from`).
Per dtype: bytes per cached token, fidelity of the final scores to the f32 cache's (top-1
agreement, KL of the candidate distribution, Kendall tau), NDCG@10 of the target within the
retrieved candidates (paired difference to f32 with a bootstrap interval), TTFT p50, and the item
cache of a x100 catalog on 8 shards (+ the replication budget) in GB per shard.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_USERS = flags.DEFINE_integer("num_users", 943, "Test users (requests whose target was not retrieved are skipped).")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Retrieved candidates per request.")
_HIST = flags.DEFINE_integer("history_len", 20, "History items per prompt.")
_DTYPES = flags.DEFINE_list("kv_dtypes", ["float32", "bfloat16", "int8"], "Cache dtypes; the first is the "
                            "reference.")
_MODE = flags.DEFINE_string("mode", "rcllm", "Block mode served.")
_SCALE = flags.DEFINE_integer("memory_scale", 100, "Catalog multiple for the memory statement.")
_SHARDS = flags.DEFINE_integer("memory_shards", 8, "Items-shards for the memory statement.")
_REPLICATE = flags.DEFINE_float("memory_replicate", 0.1, "Replication budget for the memory statement.")
_OUT = flags.DEFINE_string("output_json", "bench_out/kv_dtype.json", "Where to write the JSON.")


def main(argv):
    del argv
    import numpy as np

    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.ranking_head import ranking_head
    from rcllm_jax.eval.fidelity import fidelity
    from rcllm_jax.eval.metrics import bootstrap_ci, per_request_metrics, target_rank
    from rcllm_jax.eval.scaling import memory_per_device
    from rcllm_jax.model import load_model
    from rcllm_jax.recommender import check_side_features, final_scores
    from rcllm_jax.retrieval import fit_before

    split = LeaveOneOut(load_dataset("ml-100k"))
    retriever = fit_before(split, 2)
    requests = [q for q in eval_requests(split, num_candidates=_CANDS.value, num_users=_USERS.value,
                                         retriever=retriever) if q.target_index is not None]
    model = load_model()
    head = ranking_head("slot")
    check_side_features(head, retriever)
    builder = PromptBuilder(model.tokenizer, split.dataset.items, history_len=_HIST.value, head="slot",
                            max_prompt_tokens=model.cfg.max_position)
    prompts = [builder.build(q.history, q.candidates) for q in requests]
    items = sorted({i for q in requests for i in q.candidates})

    def engine(dtype):
        return Engine(model.params, model.cfg, builder, item_ids=items, user_pages=1024,
                      prefix_pages=1, head=head, kv_dtype=dtype, max_candidates=_CANDS.value)

    t0 = time.perf_counter()
    ref_engine = engine(_DTYPES.value[0])
    ref_engine.build_store()
    logging.info("%d item blocks encoded in %.1fs", len(items), time.perf_counter() - t0)
    catalog_tokens = builder.catalog_tokens()
    per_dtype = {}
    for dtype in _DTYPES.value:
        eng = ref_engine if dtype == _DTYPES.value[0] else engine(dtype)
        if eng is not ref_engine:
            eng.copy_blocks_from(ref_engine)
        for q, p in zip(requests[:3], prompts[:3]):  # compile pass
            eng.rank(p, _MODE.value, user_id=q.user_id)
        scores, ttft = [], []
        for q, p in zip(requests, prompts):
            res = eng.rank(p, _MODE.value, user_id=q.user_id)
            scores.append(final_scores(head, retriever, q.history, q.candidates, res.scores))
            ttft.append(res.ttft_s)
        ndcg = per_request_metrics([target_rank(s, q.target_index) for s, q in zip(scores, requests)])["ndcg@10"]
        per_dtype[dtype] = {"scores": scores, "ttft": ttft, "ndcg": ndcg, "bytes_per_token": eng.kv_bytes_per_token}
    ref = per_dtype[_DTYPES.value[0]]
    rows = []
    for dtype, d in per_dtype.items():
        diff = d["ndcg"] - ref["ndcg"]
        shard_gb = memory_per_device(model.cfg, _SHARDS.value, 1, catalog_tokens=catalog_tokens * _SCALE.value,
                                     users=0, user_tokens=0, kv_dtype=dtype,
                                     replicate=_REPLICATE.value)["item_cache"] / 1e9
        rows.append({"kv_dtype": dtype, "bytes_per_token": d["bytes_per_token"],
                     **{f"{k}_vs_{_DTYPES.value[0]}": v for k, v in fidelity(ref["scores"], d["scores"]).items()},
                     "ndcg@10_retrieved": float(np.mean(d["ndcg"])),
                     "ndcg@10_minus_reference": float(np.mean(diff)),
                     "ndcg@10_minus_reference_ci": list(bootstrap_ci(diff)),
                     "ttft_p50_s": float(np.median(d["ttft"])),
                     f"x{_SCALE.value}_catalog_gb_per_shard": shard_gb})
    print(f"{len(requests)} requests (retrieved targets), {_CANDS.value} candidates, history {_HIST.value}, "
          f"mode {_MODE.value}, model {model.source}; reference cache {_DTYPES.value[0]}")
    print(f"{'kv dtype':<9} {'B/token':>8} {'top-1':>6} {'KL':>9} {'tau':>6} {'NDCG@10':>8} {'vs ref':>8} "
          f"{'TTFT p50':>9} {f'x{_SCALE.value} GB/shard':>14}")
    r0 = _DTYPES.value[0]
    for r in rows:
        print(f"{r['kv_dtype']:<9} {r['bytes_per_token']:>8} {r[f'top1_agreement_vs_{r0}']:>6.3f} "
              f"{r[f'kl_mean_vs_{r0}']:>9.2e} {r[f'kendall_tau_vs_{r0}']:>6.3f} {r['ndcg@10_retrieved']:>8.4f} "
              f"{r['ndcg@10_minus_reference']:>+8.4f} {r['ttft_p50_s'] * 1e3:>7.1f}ms "
              f"{r[f'x{_SCALE.value}_catalog_gb_per_shard']:>14.2f}")
    config = {"model": model.source, "num_requests": len(requests), "num_candidates": _CANDS.value,
              "history_len": _HIST.value, "mode": _MODE.value, "reference": r0, "catalog_tokens": catalog_tokens,
              "memory_statement": {"catalog_scale": _SCALE.value, "shards": _SHARDS.value,
                                   "replicate": _REPLICATE.value}, "cpu_cores": os.cpu_count(), "argv": sys.argv[1:]}
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
