"""Prefill throughput of our JAX decoder vs transformers (CPU torch), side by side in one run.

python launch/bench_prefill.py --lengths=256,1024,2048 --reps=5 --output_json=bench_out/prefill.json
Interleaves A and B per repetition (same machine state), reports medians, their ratio, the FLOP
floor of each prefill and the fraction of the machine's measured f32 matmul peak it reaches.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "2048"], "Prompt lengths (tokens).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per length and engine.")
_HF = flags.DEFINE_bool("transformers", True, "Also time transformers (needs the parity extra).")
_OUT = flags.DEFINE_string("output_json", "bench_out/prefill.json", "Where to write the JSON.")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np
    from rcllm_jax.eval.floor import matmul_peak_flops, prefill_flops
    from rcllm_jax.model import load_model
    from rcllm_jax.model.decoder import forward

    m = load_model(_MODEL.value)
    rows, hf = [], None
    if _HF.value:
        try:
            import torch
            import transformers as tf
            torch.set_num_threads(os.cpu_count() or 1)
            t0 = time.perf_counter()
            src = Path(m.source)
            hf = (tf.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
                  if src.suffix == ".gguf" else tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
            hf.eval()
            hf_load = time.perf_counter() - t0
        except ImportError as e:
            print(f"transformers rows skipped: {e}")
    peak = matmul_peak_flops()
    rng = np.random.default_rng(0)
    for t in (int(x) for x in _LENGTHS.value):
        ids = rng.integers(0, m.cfg.vocab_size, size=(1, t))
        toks, pos = jnp.asarray(ids), jnp.arange(t)[None]
        run_ours = lambda: forward(m.params, toks, pos, cfg=m.cfg)[0].block_until_ready()  # noqa: E731
        compile_s = _timed(run_ours)
        ours, theirs = [], []
        for _ in range(_REPS.value):
            ours.append(_timed(run_ours))
            if hf is not None:
                with torch.no_grad():
                    x = torch.as_tensor(ids)
                    theirs.append(_timed(lambda: hf(x, logits_to_keep=1)))
        flops = prefill_flops(m.cfg, t)
        row = {"tokens": t, "ours_s_p50": statistics.median(ours), "ours_first_call_s": compile_s,
               "ours_tok_per_s": t / statistics.median(ours), "flops": flops,
               "ours_frac_of_peak": flops / statistics.median(ours) / peak}
        if theirs:
            row.update(hf_s_p50=statistics.median(theirs), hf_tok_per_s=t / statistics.median(theirs),
                       speedup_vs_hf=statistics.median(theirs) / statistics.median(ours))
        rows.append(row)
    print(f"model {m.source} ({m.cfg.num_layers} layers, f32), {os.cpu_count()} CPU cores, "
          f"measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s, reps {_REPS.value}")
    print(f"load: ours {m.load_seconds:.2f}s" + (f", transformers {hf_load:.2f}s" if hf is not None else ""))
    print(f"{'tokens':>7} {'ours p50 s':>11} {'ours tok/s':>11} {'hf p50 s':>9} {'hf tok/s':>9} "
          f"{'ours/hf':>8} {'GFLOP':>7} {'% peak':>7}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['ours_s_p50']:>11.3f} {r['ours_tok_per_s']:>11.0f} "
              f"{r.get('hf_s_p50', float('nan')):>9.3f} {r.get('hf_tok_per_s', float('nan')):>9.0f} "
              f"{r.get('speedup_vs_hf', float('nan')):>7.2f}x {r['flops'] / 1e9:>7.1f} "
              f"{100 * r['ours_frac_of_peak']:>6.1f}%")
    out = {"config": {"model": m.source, "dtype": "float32", "cpu_cores": os.cpu_count(), "reps": _REPS.value,
                      "matmul_peak_flops": peak, "load_s_ours": m.load_seconds,
                      "load_s_transformers": hf_load if hf is not None else None},
           "results": rows}
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
