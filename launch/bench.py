"""Ranking benchmark: TTFT and accuracy per prefill mode on a MovieLens request stream.

python launch/bench.py --modes=full --num_users=100 --num_candidates=20 --history_len=20 \
    --dataset=ml-100k --output_json=bench_out/bench.json
Prints a table (TTFT p50/p99, prompt tokens p50/max, HR/NDCG/MRR per mode and for the popularity
and random baselines on the same candidate lists) and writes JSON:
{"config": {...}, "results": [{"mode": ..., "ttft_p50_s": ..., ...}, ...]}.
TTFT = prompt tokens in -> candidate scores out, compile excluded (every shape bucket the stream
needs is compiled before timing).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
_CONFIG = flags.DEFINE_string("config", str(_ROOT / "configs" / "ml100k_rank.toml"), "TOML preset.")
_MODES = flags.DEFINE_list("modes", ["full"], "Prefill modes to run.")
_DATASET = flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "Dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset files (default: fetch ml-100k).")
_USERS = flags.DEFINE_integer("num_users", 100, "Users (one request each).")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates per request (held-out item + negatives).")
_HIST = flags.DEFINE_integer("history_len", 20, "History items in the prompt (the most recent).")
_NEG = flags.DEFINE_enum("negatives", "uniform", ["uniform", "popularity"], "Negative sampling.")
_STAGE = flags.DEFINE_enum("stage", "test", ["test", "valid"], "Leave-one-out target.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of user order, negatives and tie-breaking.")
_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OUT = flags.DEFINE_string("output_json", "bench_out/bench.json", "Where to write the JSON.")

_TOML_KEYS = {"workload.dataset": "dataset", "workload.num_users": "num_users",
              "workload.num_candidates": "num_candidates", "workload.history_len": "history_len",
              "workload.negatives": "negatives", "workload.stage": "stage", "workload.seed": "seed",
              "model.dtype": "dtype", "model.path": "model"}


def _percentile(xs, q):
    import numpy as np
    return float(np.percentile(np.asarray(xs, float), q))


def _rankers():
    from rcllm_jax.engine.ranking import rank_full
    return {"full": rank_full}


def run_mode(mode, model, prompts):
    """Rank every prompt with `mode`; returns per-request results (compile excluded)."""
    from rcllm_jax.buckets import bucket
    rank = _rankers()[mode]
    seen = set()
    for p in prompts:  # compile each shape bucket once, untimed
        key = (bucket(len(p), 64), p.single_token_labels)
        if key not in seen:
            seen.add(key)
            rank(model.params, model.cfg, p)
    logging.info("mode %s: %d shape buckets compiled", mode, len(seen))
    return [rank(model.params, model.cfg, p) for p in prompts]


def main(argv):
    del argv
    if _CONFIG.value:
        from rcllm_jax.config_files import apply_toml
        apply_toml(_CONFIG.value, _TOML_KEYS)
    unknown = [m for m in _MODES.value if m not in _rankers()]
    if unknown:
        raise app.UsageError(f"unknown mode {unknown[0]!r}; available: {', '.join(_rankers())}")
    import numpy as np
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.eval.metrics import popularity_scores, random_scores, ranking_metrics, target_rank
    from rcllm_jax.model import load_model

    t0 = time.perf_counter()
    ds = load_dataset(_DATASET.value, _DATA_DIR.value)
    split = LeaveOneOut(ds)
    requests = list(eval_requests(split, stage=_STAGE.value, num_candidates=_CANDS.value,
                                  negatives=_NEG.value, seed=_SEED.value, num_users=_USERS.value))
    model = load_model(_MODEL.value, dtype=_DTYPE.value)
    builder = PromptBuilder(model.tokenizer, ds.items, history_len=_HIST.value,
                            max_prompt_tokens=model.cfg.max_position)
    prompts = [builder.build(r.history, r.candidates) for r in requests]
    lengths = [len(p) for p in prompts]
    logging.info("%d requests ready in %.1fs", len(requests), time.perf_counter() - t0)

    rows = []
    for mode in _MODES.value:
        results = run_mode(mode, model, prompts)
        ttft = [r.ttft_s for r in results]
        ranks = [target_rank(r.scores, q.target_index) for r, q in zip(results, requests)]
        rows.append({"mode": mode, "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
                     "prompt_tokens_p50": _percentile(lengths, 50), "prompt_tokens_max": int(max(lengths)),
                     "computed_tokens_p50": _percentile([r.computed_tokens for r in results], 50),
                     "first_slot_share": float(np.mean([r.order[0] == 0 for r in results])),
                     **ranking_metrics(ranks)})
    rng = np.random.default_rng(_SEED.value)
    baselines = {"popularity": [popularity_scores(q.candidates, split.popularity) for q in requests],
                 "random": [random_scores(len(q.candidates), rng) for q in requests]}
    for name, scores in baselines.items():
        ranks = [target_rank(s, q.target_index, rng) for s, q in zip(scores, requests)]
        rows.append({"mode": name, "ttft_p50_s": None, "ttft_p99_s": None,
                     "prompt_tokens_p50": None, "prompt_tokens_max": None, **ranking_metrics(ranks)})

    config = {"dataset": ds.name, "num_users": len(requests), "num_candidates": _CANDS.value,
              "history_len": _HIST.value, "negatives": _NEG.value, "stage": _STAGE.value,
              "seed": _SEED.value, "model": model.source, "dtype": _DTYPE.value,
              "cpu_cores": os.cpu_count(), "modes": list(_MODES.value),
              "prompt_tokens": {"p10": _percentile(lengths, 10), "p50": _percentile(lengths, 50),
                                "p90": _percentile(lengths, 90), "max": int(max(lengths)),
                                "min": int(min(lengths))}}
    def fmt(v, f):
        return format("-", ">" + f.split(".")[0].rstrip("df")) if v is None else format(v, f)

    print(f"{ds.name}, {len(requests)} users, {_CANDS.value} candidates, history {_HIST.value}, "
          f"{model.cfg.num_layers}-layer model {Path(model.source).name} ({_DTYPE.value}), {os.cpu_count()} cores")
    print(f"{'mode':<11} {'ttft p50':>9} {'ttft p99':>9} {'tok p50':>8} {'tok max':>8} "
          f"{'HR@1':>6} {'HR@5':>6} {'HR@10':>6} {'NDCG@5':>7} {'NDCG@10':>7} {'MRR':>6}")
    for r in rows:
        print(f"{r['mode']:<11} {fmt(r['ttft_p50_s'], '9.3f')} {fmt(r['ttft_p99_s'], '9.3f')} "
              f"{fmt(r['prompt_tokens_p50'], '8.0f')} {fmt(r['prompt_tokens_max'], '8d')} "
              f"{r['hr@1']:6.3f} {r['hr@5']:6.3f} {r['hr@10']:6.3f} {r['ndcg@5']:7.3f} "
              f"{r['ndcg@10']:7.3f} {r['mrr']:6.3f}")
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps({"config": config, "results": rows}, indent=2))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
