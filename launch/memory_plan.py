"""What each device holds when an 8B-class model serves the catalog: weights + item cache + user
store per device of an items x model mesh, for each cache dtype and device (`eval/scaling.py`).

python launch/memory_plan.py --presets=llama3-8b,qwen3-8b --catalog_scale=100 --users=120 \
    --history_len=50 --output_json=docs/benchmarks/memory_plan.json
Token counts are measured, not assumed: the catalog's item blocks and the test users' history
prefixes built by the default prompt template with the default model's tokenizer (an 8B model's
own tokenizer gives other counts). The model dimensions are the presets' real ones
(`model.config.SHAPE_PRESETS`); nothing is allocated. Per preset and KV dtype: the bytes per
device on the named meshes, and per device kind the smallest mesh that fits within --headroom of
its memory (activations and the runtime's reserve are not counted: the headroom stands for them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_PRESETS = flags.DEFINE_list("presets", ["llama3-8b", "qwen3-8b"], "Model shapes (model.config.SHAPE_PRESETS).")
_SCALE = flags.DEFINE_integer("catalog_scale", 100, "The catalog as a multiple of ML-100k's items.")
_USERS = flags.DEFINE_integer("users", 120, "Users whose history prefixes the user store holds.")
_HIST = flags.DEFINE_integer("history_len", 50, "History items per prefix.")
_MESHES = flags.DEFINE_string("meshes", "items:2,model:4;items:1,model:8;items:8",
                              "Meshes whose bytes per device are reported, separated by ';'.")
_KV = flags.DEFINE_list("kv_dtypes", ["bfloat16", "int8"], "Cache dtypes.")
_REPLICATE = flags.DEFINE_float("replicate", 0.1, "Hot-item replication budget (fraction of a shard's item tokens).")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "Fraction of a device's memory the plan may fill.")
_OUT = flags.DEFINE_string("output_json", "docs/benchmarks/memory_plan.json", "Where to write the JSON.")


def main(argv):
    del argv
    import numpy as np
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.plan import history_prefix
    from rcllm_jax.eval.scaling import DEVICE_GB, memory_per_device, smallest_mesh
    from rcllm_jax.model import load_model
    from rcllm_jax.model.config import shape_preset
    from rcllm_jax.parallel.mesh import parse_mesh

    split = LeaveOneOut(load_dataset("ml-100k"))
    tok = load_model(with_tokenizer=True).tokenizer
    builder = PromptBuilder(tok, split.dataset.items, history_len=_HIST.value)
    catalog_tokens = builder.catalog_tokens() * _SCALE.value
    reqs = list(eval_requests(split, num_users=_USERS.value, num_candidates=1, seed=0))
    user_tokens = float(np.mean([len(history_prefix(builder.build(r.history, r.candidates))) for r in reqs]))
    kw = dict(catalog_tokens=catalog_tokens, users=len(reqs), user_tokens=round(user_tokens),
              replicate=_REPLICATE.value)
    rows, fits = [], []
    for name in _PRESETS.value:
        cfg = shape_preset(name)
        for kv in _KV.value:
            for text in _MESHES.value.split(";"):
                spec = parse_mesh(text)
                m = memory_per_device(cfg, spec.items, spec.model, kv_dtype=kv, **kw)
                rows.append({"preset": name, "kv_dtype": kv, "mesh": str(spec), "devices": spec.size,
                             **{f"{k}_gb": v / 1e9 for k, v in m.items() if k != "kv_bytes_per_token"},
                             "kv_bytes_per_token": m["kv_bytes_per_token"],
                             "fits": [d for d, gb in DEVICE_GB.items() if m["total"] <= _HEADROOM.value * gb * 1e9]})
            for dev, gb in DEVICE_GB.items():
                best = smallest_mesh(cfg, gb, headroom=_HEADROOM.value, kv_dtype=kv, **kw)
                fits.append({"preset": name, "kv_dtype": kv, "device": dev, "device_gb": gb,
                             "mesh": None if best is None else f"items:{best[0]},model:{best[1]}",
                             "devices": None if best is None else best[0] * best[1]})
    out = {"config": {"catalog_scale": _SCALE.value, "catalog_tokens": catalog_tokens, "users": len(reqs),
                      "history_len": _HIST.value, "user_tokens_mean": user_tokens, "replicate": _REPLICATE.value,
                      "headroom": _HEADROOM.value, "weight_dtype": "bfloat16", "device_gb": DEVICE_GB,
                      "tokenizer": "the default model's (SmolLM2)", "argv": sys.argv[1:]},
           "meshes": rows, "smallest_mesh": fits}
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(out, indent=1))
    print(f"catalog x{_SCALE.value}: {catalog_tokens} item tokens; {len(reqs)} users x {user_tokens:.0f} prefix tokens")
    print(f"{'preset':<10} {'kv':<9} {'mesh':<16} {'weights':>8} {'items':>8} {'users':>7} {'total GB':>9}  fits")
    for r in rows:
        print(f"{r['preset']:<10} {r['kv_dtype']:<9} {r['mesh']:<16} {r['weights_gb']:8.1f} {r['item_cache_gb']:8.1f} "
              f"{r['user_store_gb']:7.1f} {r['total_gb']:9.1f}  {', '.join(r['fits']) or '-'}")
    for f in fits:
        print(f"{f['preset']:<10} {f['kv_dtype']:<9} smallest on {f['device']:<10} {f['mesh'] or 'none'}")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
