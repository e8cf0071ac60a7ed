"""Build the item KV caches of a catalog on a mesh and save them as an Orbax snapshot.

python launch/build_cache.py --mesh=items:4 --snapshot_dir=snapshots/ml100k
Every catalog item's block is encoded once after the canonical context (with the label/question
glue), placed over the items axis (--placement; hot items on every shard: --replicate), and saved
with the user store, the block index, the model fingerprint and the tokenizer hash
(rcllm_jax/cache/snapshot.py). launch/serve.py and launch/bench.py --snapshot_dir restore it on
any items mesh. A directory holding another model's
snapshots is refused (nothing is overwritten). --calibrate also chooses rcllm's policy for the model,
head and prompt by measurement (rcllm_jax/engine/calibration.py) and saves it with the snapshot.
--update brings the newest snapshot to the catalog as it is now, encoding only the items whose text
is new or changed (a block's key is its content), dropping removed ones and leaving every kept
block on its shard; a running server picks the new step up with POST /admin/reload.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement, multi-host flags)
from rcllm_jax.settings import CatalogSettings, EngineSettings, ModelSettings, define_flags, read  # noqa: E402

define_flags(ModelSettings)  # --head: the prompt format the blocks are encoded for (+ --ranking_head: --calibrate)
define_flags(CatalogSettings)  # --history_len: what --calibrate calibrates for
define_flags(EngineSettings, exclude=("mode", "user_cache_mb", "user_cache_pages", "prefix_cache_pages",
                                      "rebuild_on_damage"), max_candidates=100)  # label glue built for 100
flags.mark_flag_as_required("snapshot_dir")
_CANON = flags.DEFINE_enum("canonical", None, ["candidate", "instruction"],
                           "Context item blocks are encoded after: the instruction + the glue before a first "
                           "candidate, or the instruction alone (default: the engine's, candidate).")
_ROW = flags.DEFINE_integer("row_tokens", 512, "Tokens per packed row of a build pass (blocks packed many to a row).")
_ROWS = flags.DEFINE_integer("rows", 1, "Packed rows per items-shard in a build pass (one SPMD program over the mesh).")
_UPDATE = flags.DEFINE_bool("update", False, "Update the newest snapshot in --snapshot_dir to the catalog as it is "
                             "now: encode only new or changed items, drop removed ones, keep every other block "
                             "where it is, save a new step (a server takes it with POST /admin/reload).")
_CALIBRATE = flags.DEFINE_bool("calibrate", False, "Also calibrate rcllm's policy for --model, --head / --ranking_head, "
                               "--prompt, --history_len and --calibration_candidates (engine/calibration.py) and save "
                               "it with the snapshot: a server or benchmark with the same settings uses it.")


def main(argv):
    del argv
    mesh, layout = dist_cli.setup()
    model_cfg, catalog, eng = read(ModelSettings, CatalogSettings, EngineSettings)
    snap_dir = eng.snapshot_dir
    import jax
    import numpy as np
    from tqdm import tqdm

    from rcllm_jax.cache import snapshot
    from rcllm_jax.data.catalog import CatalogError, load_catalog, prompt_builder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.model import load_model

    t0 = time.perf_counter()
    try:
        ds = load_catalog(catalog)
    except CatalogError as e:
        raise app.UsageError(str(e)) from None
    items = sorted(ds.items)[:catalog.max_items or None]
    model = load_model(model_cfg.model, dtype=model_cfg.dtype, adapter=model_cfg.adapter,
                       random_weights=model_cfg.random_weights)
    builder = prompt_builder(model.tokenizer, ds, catalog, head=model_cfg.head, max_prompt_tokens=model.cfg.max_position)
    canon = {} if _CANON.value is None else {"canonical": _CANON.value}
    from rcllm_jax.engine.ranking_head import ranking_head
    try:  # --calibrate: the head whose scores are calibrated (a HeadError when it does not fit --model)
        head = ranking_head(model_cfg.head, model_cfg.ranking_head) if _CALIBRATE.value else None
        engine = Engine(model.params, model.cfg, builder, item_ids=items, **canon, head=head,
                        user_pages=256 if _CALIBRATE.value else 16, prefix_pages=1,
                        max_candidates=eng.max_candidates, mesh=mesh,
                        placement=layout.placement, replicate=layout.replicate, kv_dtype=layout.kv_dtype)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    prev = snapshot.latest_meta(snap_dir)
    if prev is None and _UPDATE.value:
        raise app.UsageError(f"--update: {snap_dir} holds no snapshot to update; build one without --update first")
    if prev is not None:
        problem = snapshot.identity_problem(prev[1], engine.identity())
        if problem:
            raise app.UsageError(f"{snap_dir} holds a snapshot of {problem}; choose another --snapshot_dir "
                                 "(nothing was changed)")
    from rcllm_jax.retrieval import ItemKNN, item_texts, load_or_fit
    seqs = [ds.sequences[u] for u in sorted(ds.sequences)]
    texts = item_texts(ds, items)
    if jax.process_index() == 0:  # the retrieval stage is persisted with the item cache
        retriever, how = load_or_fit(os.path.join(snap_dir, "retriever.npz"), seqs, items, texts=texts)
        logging.info("retriever: %s", how)
    else:  # the same deterministic fit: every process places the blocks alike
        retriever = ItemKNN.fit(seqs, items, texts=texts)
    engine.set_coaccess(retriever.coaccess_requests(seqs))  # the co-access log: placement and replication
    logging.info("model and %s catalog (%d items) ready in %.1fs", ds.name, len(items), time.perf_counter() - t0)
    t1 = time.perf_counter()
    restore_s = None
    if _UPDATE.value:  # the previous step's blocks, then only what changed
        engine.restore(snap_dir)
        restore_s = time.perf_counter() - t1
        t1 = time.perf_counter()
    with tqdm(total=len(engine.item_blocks) + len(engine.glue_blocks), desc="encode blocks", unit="block",
              disable=jax.process_index() != 0) as bar:
        build = engine.update_store if _UPDATE.value else engine.build_store
        report = build(row_tokens=_ROW.value, rows=_ROWS.value, progress=bar.update)
    build_s = time.perf_counter() - t1
    encoded = sum(p["tokens"] for p in report["passes"])
    t2 = time.perf_counter()
    step = engine.save(snap_dir)
    save_s = time.perf_counter() - t2
    if _CALIBRATE.value and eng.calibration_requests:
        from rcllm_jax.recommender import Recommender, calibrated
        logging.info("%s", calibrated(Recommender(engine, retriever, "rcllm"), ds, items, snap_dir,
                                      eng.calibration_requests, min(eng.calibration_candidates, eng.max_candidates)))
    st = engine.stats()
    loads = np.asarray(st["shard_tokens"])
    summary = {"snapshot_dir": os.path.abspath(snap_dir), "step": step, "mesh": layout.mesh,
               "placement": st["placement"], "replicate": st["replicate"], "kv_dtype": st["kv_dtype"],
               "replicated_item_blocks": st["replicated_item_blocks"],
               "replicated_item_tokens": st["replicated_item_tokens"], "item_blocks": st["item_blocks"],
               "item_tokens": st["item_tokens"], "item_bytes": st["item_bytes"],
               "shard_tokens": loads.tolist(), "max_over_mean_load": float(loads.max() / max(loads.mean(), 1)),
               "build_s": round(build_s, 2), "encoded_tokens": encoded,
               "build_tokens_per_s": round(encoded / max(build_s, 1e-9), 1), "layout_s": round(report["layout_s"], 2),
               "save_s": round(save_s, 2), "model_fingerprint": engine.fingerprint}
    if _UPDATE.value:
        summary.update(update={n: report[n] for n in ("kept", "added", "dropped", "moved")}, from_step=prev[0],
                       restore_s=round(restore_s, 2), total_s=round(restore_s + build_s + save_s, 2))
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
        if _UPDATE.value:
            u = summary["update"]
            print(f"updated step {prev[0]} -> {step}: {u['added']} blocks encoded, {u['dropped']} dropped, "
                  f"{u['kept']} kept in place; restore {restore_s:.1f}s + encode/lay out {build_s:.1f}s + "
                  f"save {save_s:.1f}s")
        print(f"built {summary['item_blocks']} item blocks ({summary['item_bytes'] / 1e9:.2f} GB of KV) on "
              f"{summary['mesh']} in {build_s:.1f}s ({summary['build_tokens_per_s']:.0f} tokens/s); "
              f"snapshot step {step} saved in {save_s:.1f}s; "
              f"shard loads max/mean {summary['max_over_mean_load']:.3f}")


if __name__ == "__main__":
    app.run(main)
