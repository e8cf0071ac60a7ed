"""An incremental catalog update against a full build of the same catalog, in one run.

python launch/bench_update.py --catalog_scale=10 --changed=0.01 --devices=2 --output_json=bench_out/update.json
The default model. The catalog: ML-100k x --catalog_scale (`scaled_catalog`). Full: `build_cache.py`'s
path, every block encoded, placed and saved as a snapshot step. Then --changed of the items change
(half of them retitled, a quarter removed, a quarter new) and the update takes `build_cache.py
--update`'s path: the step restored, only the new and retitled items encoded (`Engine.update_store`),
a new step saved. Reported: each path's wall time and its parts, the ratio (issue 36 aims at >= 50x
less time for the update), the blocks encoded / dropped / kept, and the update's floor on this
machine: encoding the changed tokens at the full build's rate plus reading and writing the step's
bytes once (measured: the full build's save + the update's restore; what a snapshot format whose
steps share unchanged shards would skip).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SCALE = flags.DEFINE_integer("catalog_scale", 10, "Catalog size as a multiple of ML-100k's.")
_CHANGED = flags.DEFINE_float("changed", 0.01, "Fraction of the items changed (retitled / removed / new: 2:1:1).")
_DEVICES = flags.DEFINE_integer("devices", 2, "Items-shards (simulated CPU devices).")
_KV = flags.DEFINE_enum("kv_dtype", "bfloat16", ["float32", "bfloat16"], "Cache dtype.")
_OUT = flags.DEFINE_string("output_json", "bench_out/update.json", "Where to write the JSON.")
_SNAP = flags.DEFINE_string("snapshot_dir", None, "Where the steps go (default: a temporary directory, removed).")


def edited(ds, fraction: float, seed: int = 0):
    """`ds` with `fraction` of its items changed: half retitled, a quarter removed, a quarter new."""
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = sorted(ds.items)
    n = max(4, int(round(fraction * len(ids))))
    picked = [int(i) for i in rng.choice(ids, size=n // 2 + n // 4, replace=False)]
    retitle, remove = picked[:n // 2], set(picked[n // 2:])
    items = {i: it for i, it in ds.items.items() if i not in remove}
    for i in retitle:
        items[i] = dataclasses.replace(items[i], title=f"{items[i].title} (restored edition)")
    top = max(ds.items) + 1
    for j in range(n - len(retitle) - len(remove)):
        src = ds.items[ids[j]]
        items[top + j] = dataclasses.replace(src, item_id=top + j, title=f"{src.title} (sequel)")
    seqs = {u: tuple(i for i in s if i not in remove) for u, s in ds.sequences.items()}
    return dataclasses.replace(ds, name=f"{ds.name}-edited", items=items, sequences=seqs, times=None), \
        {"retitled": len(retitle), "removed": len(remove), "new": n - len(retitle) - len(remove)}


def _engine(model, ds, mesh):
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    return Engine(model.params, model.cfg, PromptBuilder(model.tokenizer, ds.items), item_ids=sorted(ds.items),
                  user_pages=16, prefix_pages=1, mesh=mesh, kv_dtype=_KV.value)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv):
    del argv
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(_DEVICES.value))
    from rcllm_jax.data.movielens import load_dataset, scaled_catalog
    from rcllm_jax.model import load_model
    from rcllm_jax.parallel.mesh import MeshSpec, make_mesh

    model = load_model()
    mesh = make_mesh(MeshSpec(_DEVICES.value))
    base = scaled_catalog(load_dataset("ml-100k"), _SCALE.value)
    after, change = edited(base, _CHANGED.value)
    snap = Path(_SNAP.value or tempfile.mkdtemp(prefix="bench_update_"))
    try:
        eng = _engine(model, base, mesh)
        t0 = time.perf_counter()
        full = eng.build_store()
        t1 = time.perf_counter()
        eng.save(snap)
        t2 = time.perf_counter()
        full_row = {"build_s": t1 - t0, "save_s": t2 - t1, "total_s": t2 - t0, "layout_s": full["layout_s"],
                    "encoded_tokens": sum(p["tokens"] for p in full["passes"]),
                    "encode_s": sum(p["seconds"] for p in full["passes"]), "item_blocks": eng.stats()["item_blocks"],
                    "snapshot_bytes": _dir_bytes(snap)}
        del eng
        gc.collect()
        print(f"full build: {full_row['total_s']:.1f}s (encode {full_row['encode_s']:.1f}s, lay out "
              f"{full_row['layout_s']:.1f}s, save {full_row['save_s']:.1f}s)", flush=True)

        eng = _engine(model, after, mesh)
        t0 = time.perf_counter()
        eng.restore(snap)
        t1 = time.perf_counter()
        up = eng.update_store()
        t2 = time.perf_counter()
        eng.save(snap)
        t3 = time.perf_counter()
        up_row = {"restore_s": t1 - t0, "update_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
                  "layout_s": up["layout_s"], "encode_s": sum(p["seconds"] for p in up["passes"]),
                  "encoded_tokens": sum(p["tokens"] for p in up["passes"]),
                  **{k: up[k] for k in ("kept", "added", "dropped", "moved")}}
    finally:
        if _SNAP.value is None:
            shutil.rmtree(snap, ignore_errors=True)
    rate = full_row["encoded_tokens"] / full_row["encode_s"]
    step_bytes = full_row["snapshot_bytes"]
    rewrite_s = full_row["save_s"] + up_row["restore_s"]  # one write and one read of the whole step, measured
    floor = up_row["encoded_tokens"] / rate
    result = {"config": {"model": model.source, "catalog_scale": _SCALE.value, "changed": _CHANGED.value,
                         "devices": _DEVICES.value, "kv_dtype": _KV.value, "items_before": len(base.items),
                         "items_after": len(after.items), **change},
              "full": full_row, "update": up_row, "speedup": full_row["total_s"] / up_row["total_s"],
              "floor": {"encode_changed_s": floor, "rewrite_step_s": rewrite_s, "update_floor_s": floor + rewrite_s,
                        "speedup_at_floor": full_row["total_s"] / (floor + rewrite_s),
                        "speedup_without_rewrite": full_row["total_s"] / max(floor, 1e-9)},
              "target_speedup": 50.0}
    result["meets_target"] = result["speedup"] >= result["target_speedup"]
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    f, u = full_row, up_row
    print("| path | total s | encode s | lay out s | restore s | save s | tokens encoded |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| full build | {f['total_s']:.1f} | {f['encode_s']:.1f} | {f['layout_s']:.1f} | - | {f['save_s']:.1f} | "
          f"{f['encoded_tokens']} |")
    print(f"| update ({_CHANGED.value:.0%} changed) | {u['total_s']:.1f} | {u['encode_s']:.1f} | {u['layout_s']:.1f} | "
          f"{u['restore_s']:.1f} | {u['save_s']:.1f} | {u['encoded_tokens']} |")
    print(f"update {result['speedup']:.1f}x faster than the full build (target >= 50x: "
          f"{'met' if result['meets_target'] else 'not met'}); {u['added']} blocks encoded, {u['dropped']} dropped, "
          f"{u['kept']} kept, {u['moved']} moved; floor: {floor:.1f}s to encode the changed tokens + "
          f"{rewrite_s:.1f}s to read and write the {step_bytes / 1e9:.2f} GB step once "
          f"({result['floor']['speedup_at_floor']:.1f}x at that floor)")


if __name__ == "__main__":
    app.run(main)
