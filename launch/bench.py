"""Ranking benchmark: TTFT, accuracy and fidelity per prefill mode on a MovieLens request stream.

python launch/bench.py --modes=full,prefix,stitch,sink,deviation,rcllm --num_users=20 \
    --requests_per_user=3 --num_candidates=20 --history_len=20 --output_json=bench_out/bench.json
The benchmark itself is `rcllm_jax.eval.ranking_bench.run_benchmark` (what it measures and writes:
its docstring and docs/launchers.md); this file maps the flags (generated from
`settings.BenchSettings`, `ModelSettings`, `CatalogSettings`, `MeshSettings`) onto it. Defaults come
from configs/ml100k_rank.toml (--config; flags given on the command line win).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement, multi-host flags)
from rcllm_jax.settings import BenchSettings, CatalogSettings, ModelSettings, define_flags, read  # noqa: E402

flags.FLAGS.set_default("config", str(Path(__file__).resolve().parents[1] / "configs" / "ml100k_rank.toml"))
define_flags(BenchSettings)
define_flags(ModelSettings)  # --model, --adapter, --dtype, --head, --ranking_head
define_flags(CatalogSettings, exclude=("max_items",))  # --dataset, --data_dir, --history_len


def main(argv):
    del argv
    bench, model, catalog = read(BenchSettings, ModelSettings, CatalogSettings)
    mesh, layout = dist_cli.setup()
    from rcllm_jax.eval.ranking_bench import BenchError, RunSettings, run_benchmark
    try:
        run_benchmark(RunSettings(bench, model, catalog, layout, tuple(sys.argv[1:])), mesh)
    except BenchError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
