"""Item-cache build throughput against full-prefill throughput, in one run, at several catalog sizes.

python launch/bench_build.py --catalog_scales=1,10 --devices=8 --output_json=bench_out/build.json
The default model. Reference: full prefill (`Engine.rank(prompt, "full")`) of --prefill_requests
test users' prompts (history --history_len, the retriever's top-20 as candidates), tokens / TTFT,
median, measured after one warm-up request, both in this process (on the simulated mesh) and in
a child process on one unsimulated CPU device (the faster of the two is the target's reference:
simulated devices split the cores' thread pool). Build: `Engine.build_store` of every catalog item and
glue block (the same engine as `launch/build_cache.py`: --placement, --replicate, --kv_dtype, the
retriever's co-access log) on --devices simulated items-shards, at catalog scale x1, x10, ...
(`scaled_catalog`: every real item plus numbered variants). Reported per scale: tokens encoded,
the wall time and its parts (encode passes, the first pass of each kind with its compile, the
placement + lay-out), tokens/s overall and in steady state, the slot utilisation of the packed
rows, and the flatness of the build (steady tokens/s of the first and last quarter of the item
passes). Target (issue 16): build tokens/s within 2x of full prefill's, flat over the build.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_SCALES = flags.DEFINE_list("catalog_scales", ["1", "10"], "Catalog sizes as multiples of ML-100k's.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Items-shards of the build (simulated CPU devices).")
_ROW = flags.DEFINE_integer("row_tokens", 512, "Tokens per packed row.")
_ROWS = flags.DEFINE_integer("rows", 1, "Packed rows per items-shard in a build pass.")
_KV = flags.DEFINE_enum("kv_dtype", "bfloat16", ["float32", "bfloat16"], "Cache dtype.")
_PLACEMENT = flags.DEFINE_string("placement", "coaccess", "Placement of the item blocks.")
_REPLICATE = flags.DEFINE_float("replicate", 0.1, "Hot-item replication budget.")
_PREFILL = flags.DEFINE_integer("prefill_requests", 5, "Full-prefill requests of the reference.")
_HIST = flags.DEFINE_integer("history_len", 20, "History items of the reference prompts.")
_OUT = flags.DEFINE_string("output_json", "bench_out/build.json", "Where to write the JSON.")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 0, "Only the first N items of each scaled catalog (0 = all; "
                                  "smoke tests).")
_PREFILL_ONLY = flags.DEFINE_bool("prefill_only", False, "Only measure the full-prefill reference (the run spawns "
                                  "itself so, with --devices=1, to measure it on an unsimulated CPU).")


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def build_rates(report: dict, wall_s: float) -> dict:
    """Throughput figures of one `Engine.build_store` report (its passes and lay-out time)."""
    import numpy as np
    passes = report["passes"]
    tokens = sum(p["tokens"] for p in passes)
    firsts = {id(next(p for p in passes if p["kind"] == kind)) for kind in {p["kind"] for p in passes}}
    steady = [p for p in passes if id(p) not in firsts]
    items = [p for p in steady if p["kind"] == "item"]
    q = max(1, len(items) // 4)

    def rate(ps):  # None: no such passes (a catalog built in one pass per kind has no steady state)
        if not ps:
            return None
        return sum(p["tokens"] for p in ps) / max(sum(p["seconds"] for p in ps), 1e-9)

    return {"encoded_tokens": tokens, "blocks": sum(p["blocks"] for p in passes), "passes": len(passes),
            "slot_utilisation": tokens / max(sum(p["slots"] for p in passes), 1),
            "wall_s": wall_s, "encode_s": sum(p["seconds"] for p in passes),
            "first_passes_s": sum(p["seconds"] for p in passes if id(p) in firsts), "layout_s": report["layout_s"],
            "tokens_per_s": tokens / wall_s, "steady_tokens_per_s": rate(steady),
            "first_quarter_tokens_per_s": rate(items[:q]), "last_quarter_tokens_per_s": rate(items[-q:]),
            "pass_s_p50": float(np.median([p["seconds"] for p in steady])) if steady else None}


def _prefill_one_device() -> dict:
    """The full-prefill reference measured in a subprocess on one unsimulated CPU device."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "prefill.json"
        env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prefill_only", "--devices=1",
                        f"--prefill_requests={_PREFILL.value}", f"--history_len={_HIST.value}",
                        f"--output_json={f}"], check=True, env=env)
        one = json.loads(f.read_text())
    print(f"full prefill on one unsimulated device: {one['tokens_per_s']:.0f} tokens/s", flush=True)
    return one


def _build_row(model, base, scale: int, best: float) -> dict:
    """Build one catalog scale's item store from scratch; its rates, sizes and ratio to full prefill."""
    from rcllm_jax.data.movielens import LeaveOneOut, scaled_catalog
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.parallel.mesh import MeshSpec, make_mesh
    from rcllm_jax.retrieval import fit_before
    ds = scaled_catalog(base, scale)
    sp = LeaveOneOut(ds)
    log = fit_before(sp, 2).coaccess_requests([sp.train_sequence(u) for u in sp.users])
    item_ids = sorted(ds.items)[:_MAX_ITEMS.value or None]
    if _MAX_ITEMS.value:  # the co-access log of the items built
        kept = set(item_ids)
        log = [r for r in (tuple(i for i in req if i in kept) for req in log) if r]
    eng = Engine(model.params, model.cfg, PromptBuilder(model.tokenizer, ds.items), item_ids=item_ids,
                 user_pages=16, prefix_pages=1, max_candidates=100, mesh=make_mesh(MeshSpec(_DEVICES.value)),
                 placement=_PLACEMENT.value, replicate=_REPLICATE.value, kv_dtype=_KV.value, coaccess=log)
    logging.info("x%d: %d items, co-access log of %d lists; encoding", scale, len(item_ids), len(log))
    t0 = time.perf_counter()
    report = eng.build_store(row_tokens=_ROW.value, rows=_ROWS.value)
    r = {"catalog_scale": scale, "catalog_items": len(item_ids), **build_rates(report, time.perf_counter() - t0)}
    st = eng.stats()
    r |= {"item_bytes": st["item_bytes"], "max_shard_gb": max(st["shard_tokens"]) * eng.kv_bytes_per_token / 1e9,
          "prefill_over_build": best / r["tokens_per_s"],
          "prefill_over_build_steady": best / r["steady_tokens_per_s"] if r["steady_tokens_per_s"] else None,
          "flatness": (r["last_quarter_tokens_per_s"] / r["first_quarter_tokens_per_s"]
                       if r["first_quarter_tokens_per_s"] else None)}
    print(f"x{scale}: {r['blocks']} blocks, {r['encoded_tokens']} tokens in {r['wall_s']:.1f}s "
          f"(encode {r['encode_s']:.1f}s, first passes {r['first_passes_s']:.1f}s, lay-out {r['layout_s']:.1f}s): "
          f"{r['tokens_per_s']:.0f} tokens/s overall, {_num(r['steady_tokens_per_s'], '.0f')} steady; slots used "
          f"{r['slot_utilisation']:.3f}; last/first quarter {_num(r['flatness'], '.3f')}; full prefill / build "
          f"{r['prefill_over_build']:.2f}x", flush=True)
    del eng
    gc.collect()
    return r


def main(argv):
    del argv
    from rcllm_jax.parallel.mesh import simulate_cpu_devices
    note = simulate_cpu_devices(_DEVICES.value) if _DEVICES.value > 1 else None
    if note:
        logging.info(note)
    import numpy as np

    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import load_model
    from rcllm_jax.retrieval import fit_before

    model = load_model()
    base = load_dataset("ml-100k")
    split = LeaveOneOut(base)
    retriever = fit_before(split, 2)
    reqs = list(eval_requests(split, num_candidates=20, seed=0, num_users=_PREFILL.value + 1, retriever=retriever))
    builder = PromptBuilder(model.tokenizer, base.items, history_len=_HIST.value)
    prompts = [builder.build(r.history, r.candidates) for r in reqs]
    ref = Engine(model.params, model.cfg, builder, item_ids=sorted({i for r in reqs for i in r.candidates}),
                 user_pages=16, prefix_pages=1, max_candidates=20)
    ref.rank(prompts[0], "full")  # compile
    full = [ref.rank(p, "full") for p in prompts[1:]]
    prefill = {"requests": len(full), "prompt_tokens_p50": float(np.median([r.prompt_tokens for r in full])),
               "ttft_p50_s": float(np.median([r.ttft_s for r in full])),
               "tokens_per_s": float(np.median([r.prompt_tokens / r.ttft_s for r in full]))}
    print(f"full prefill: {prefill['prompt_tokens_p50']:.0f}-token prompts, TTFT p50 {prefill['ttft_p50_s']:.3f}s, "
          f"{prefill['tokens_per_s']:.0f} tokens/s", flush=True)
    del ref
    if _PREFILL_ONLY.value:
        Path(_OUT.value).write_text(json.dumps(prefill))
        return
    one = _prefill_one_device() if _DEVICES.value > 1 else None
    best = max(prefill["tokens_per_s"], one["tokens_per_s"] if one else 0.0)
    rows = [_build_row(model, base, scale, best) for scale in (int(x) for x in _SCALES.value)]
    out = {"config": {"model": "SmolLM2-135M-Instruct", "dtype": str(model.cfg.dtype), "devices": _DEVICES.value,
                      "row_tokens": _ROW.value, "rows": _ROWS.value, "kv_dtype": _KV.value,
                      "placement": _PLACEMENT.value, "replicate": _REPLICATE.value, "argv": sys.argv[1:]},
           "prefill": prefill, "prefill_one_device": one, "prefill_reference_tokens_per_s": best, "rows": rows}
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(out, indent=2))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
