"""Write a built-in dataset as a catalog directory (`--catalog=DIR` of every launcher).

python launch/export_catalog.py --dataset=ml-1m --out=catalogs/ml-1m
MovieLens-100k / 1M become presets of the generic format: items.jsonl, interactions.csv and
catalog.toml (rcllm_jax/data/catalog.py::write_catalog), which read back to the same items, users,
sequences and prompts as the built-in reader (tests/test_catalog.py). A starting point for a
catalog of your own: edit the files, add fields, change the item template.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "The built-in dataset to write.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the dataset's files are (default: fetched on first use).")
_OUT = flags.DEFINE_string("out", None, "The catalog directory to create (must not exist).")
_MIN = flags.DEFINE_integer("min_interactions", 1, "Keep items, then users, with at least this many interactions "
                            "(5: LlamaRec's ML-100k protocol, launch/bench_retrieval.py).", lower_bound=1)
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    from rcllm_jax.data.catalog import write_catalog
    from rcllm_jax.data.movielens import load_dataset, min_interactions
    ds = load_dataset(_DATASET.value, _DATA_DIR.value)
    if _MIN.value > 1:
        ds = min_interactions(ds, _MIN.value)
    try:
        out = write_catalog(ds, _OUT.value)
    except FileExistsError as e:
        raise app.UsageError(str(e)) from None
    print(f"wrote {ds.name}: {len(ds.items)} items, {len(ds.sequences)} users, {ds.num_interactions} interactions "
          f"to {out} (serve it with --catalog={out})")


if __name__ == "__main__":
    app.run(main)
