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

from rcllm_jax.data.movielens import NEGATIVES  # noqa: E402  (no JAX import: --mesh may still set devices)

_ROOT = Path(__file__).resolve().parents[1]
_CONFIG = flags.DEFINE_string("config", str(_ROOT / "configs" / "label_cpu.toml"), "TOML preset (flags override).")
_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
_DATASET = flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "Dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset files (default: fetch ml-100k).")
_OUT = flags.DEFINE_string("output_dir", "runs/tuned", "Where checkpoints, the exported model and the log go.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the frozen base weights.")
_STEPS = flags.DEFINE_integer("steps", 250, "Optimizer steps.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Examples per optimizer step.")
_MICRO = flags.DEFINE_integer("micro_batch", 2, "Examples per forward/backward (gradients accumulated).")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (AdamW, linear warm-up, cosine decay to 10%).")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Warm-up steps.")
_WD = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
_LORA = flags.DEFINE_integer("lora_rank", 16, "LoRA rank; 0 = full fine-tuning of the trained layers.")
_ALPHA = flags.DEFINE_float("lora_alpha", 32.0, "LoRA alpha (scale = alpha / rank).")
_LAYERS = flags.DEFINE_integer("train_layers", 8, "Top layers trained (0 = all); the rest stay frozen.")
_HIST = flags.DEFINE_integer("history_len", 20, "History items in the prompt.")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates per prompt (<= 52).")
_NEG = flags.DEFINE_enum("negatives", "uniform", list(NEGATIVES), "Negative sampling (retrieval: genre-matched, like a retrieval stage).")
_MAXLEN = flags.DEFINE_integer("max_len", 832, "Padded prompt length (longer histories are shortened).")
_MINHIST = flags.DEFINE_integer("min_history", 3, "Shortest history a training example may have.")
_BLOCK = flags.DEFINE_float("block_attention_prob", 0.0,
                            "Probability that an example uses the engine's stitched attention.")
_GLUE = flags.DEFINE_enum("block_glue", "mixed", ["fresh", "cached", "mixed"],
                          "Block-aware examples: glue computed fresh, cached like items, or either.")
_TW = flags.DEFINE_float("teacher_weight", 0.0, "Weight of a soft target over the candidates from training-split "
                         "popularity (dense signal for short schedules); 0 = the label's cross-entropy only.")
_TT = flags.DEFINE_float("teacher_temperature", 2.0, "Teacher: p ~ (1 + count)^(1/temperature).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data order, negatives and initialisation.")
_CKPT = flags.DEFINE_integer("checkpoint_every", 50, "Steps between Orbax checkpoints.")
_VAL = flags.DEFINE_integer("val_every", 100, "Steps between validation runs (0 = never).")
_VAL_USERS = flags.DEFINE_integer("val_users", 64, "Users in each validation run.")
_TEST_USERS = flags.DEFINE_integer("test_users", 0, "After training, test HR/NDCG on this many users (0 = skip).")

_OTHER_TOML_KEYS = {"train.test_users": "test_users", "model.path": "model", "model.dtype": "dtype",
                    "data.dataset": "dataset"}


def main(argv):
    del argv
    from rcllm_jax.train.trainer import TrainConfig, Trainer

    # every TrainConfig field with a flag of the same name is settable from [train] in the TOML
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name in flags.FLAGS]
    if _CONFIG.value:
        from rcllm_jax.settings import apply_preset
        apply_preset(_CONFIG.value, {**{f"train.{k}": k for k in fields}, **_OTHER_TOML_KEYS})
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.model import load_model

    cfg = TrainConfig(**{k: flags.FLAGS[k].value for k in fields})
    out = Path(_OUT.value)
    model = load_model(_MODEL.value, dtype=_DTYPE.value)
    split = LeaveOneOut(load_dataset(_DATASET.value, _DATA_DIR.value))
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
