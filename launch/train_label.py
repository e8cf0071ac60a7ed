"""Fine-tune the ranking model on MovieLens, optionally block-aware (robust to stitched caches).

python launch/train_label.py --output_dir=runs/tuned                                    # CPU default
python launch/train_label.py --output_dir=runs/block --block_attention_prob=0.5          # block-aware
python launch/train_label.py --config=configs/label_gpu.toml --output_dir=runs/gpu       # longer, GPU

Checkpoints (Orbax) go to <output_dir>/checkpoints every --checkpoint_every steps; rerunning the
same command resumes exactly where it stopped (weights, optimizer, data position). At the end:
<output_dir>/merged (a HF model directory: `--model=<output_dir>/merged` on every launcher),
<output_dir>/adapter (LoRA: `--model=<base> --adapter=<output_dir>/adapter`), and
<output_dir>/train_log.json (per-step loss, tokens/s, validation HR/NDCG, final test metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.settings import CatalogSettings, FineTuneSettings, ModelSettings, define_flags, read  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
define_flags(ModelSettings, exclude=("head", "ranking_head", "random_weights"))
define_flags(CatalogSettings, exclude=("history_len", "max_items"))  # the history length is the schedule's
define_flags(FineTuneSettings)
flags.FLAGS.set_default("config", str(_ROOT / "configs" / "label_cpu.toml"))
_OUT = flags.DEFINE_string("output_dir", "runs/tuned", "Where checkpoints, the exported model and the log go.")
_TEST_USERS = flags.DEFINE_integer("test_users", 0, "After training, test HR/NDCG on this many users (0 = skip).")


def main(argv):
    del argv
    model_s, catalog, cfg = read(ModelSettings, CatalogSettings, FineTuneSettings)
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.model import load_model
    from rcllm_jax.train.trainer import Trainer

    out = Path(_OUT.value)
    model = load_model(model_s.model, dtype=model_s.dtype, adapter=model_s.adapter)
    split = LeaveOneOut(load_dataset(catalog.dataset, catalog.data_dir))
    trainer = Trainer(model.params, model.cfg, model.tokenizer, split, cfg, checkpoint_dir=out / "checkpoints")
    logging.info("%d training pairs; trainable: %s; resuming at step %d", len(trainer.pairs),
                 "LoRA r=%d" % cfg.lora_rank if cfg.lora_rank else "full", trainer.step)
    t0 = time.perf_counter()
    start = trainer.step
    history = trainer.run()
    wall = time.perf_counter() - t0
    log = {"config": dataclasses.asdict(cfg), "model": model.source, "resumed_from": start,
           "wall_s_this_run": wall, "history": history}
    if _TEST_USERS.value:
        log["test"] = trainer.validate("test", _TEST_USERS.value)
        print("test:", json.dumps(log["test"]))
    log["export"] = trainer.export(out, extra={"base_model": model.source})
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"trained {trainer.step} steps ({trainer.step - start} this run) in {wall:.0f}s; "
          f"model in {log['export']['merged']}")


if __name__ == "__main__":
    app.run(main)
