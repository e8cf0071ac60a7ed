"""Train the score-slot ranking head (rcllm_jax/train/slot_head.py) on the engine's serving path.

python launch/train_head.py --output_dir=runs/slot_head            # ~10-15 min on a 2-core CPU
python launch/train_head.py --output_dir=runs/slot_head --mode=full  # features from full prefill

Collects the slot states of every training and validation example by serving it (`--mode`,
rcllm by default), saving them to <output_dir>/states_*.npz as it goes (rerunning the same
command resumes there), fits the head for each L2 strength of `--l2` and keeps the one with the
best validation NDCG@10 (within the retrieved candidates). Writes <output_dir>/head (the head,
safetensors, with a card in README.md) and <output_dir>/train_log.json (learning curves, metrics,
baselines on the same validation examples).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "runs/slot_head", "Where states, the head and the log go.")
_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
_ADAPTER = flags.DEFINE_string("adapter", None, "LoRA adapter directory for --model.")
_MODE = flags.DEFINE_string("mode", "rcllm", "The serving mode whose slot states the head learns from.")
_POS = flags.DEFINE_list("positions", ["5", "4", "3"], "Held-back positions from the end of each sequence "
                         "(3 = the last training item; 2 and 1 are validation and test).")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Retrieved candidates per prompt.")
_HIST = flags.DEFINE_integer("history_len", 20, "History items in the prompt.")
_ORDER = flags.DEFINE_enum("candidate_order", "retriever", ["retriever", "shuffled"],
                           "Prompt order of the candidates (the head's position feature reads it).")
_L2 = flags.DEFINE_list("l2", ["1e-4", "1e-3", "1e-2", "1e-1", "1"], "L2 strengths tried (best validation NDCG@10 wins).")
_STEPS = flags.DEFINE_integer("steps", 300, "Full-batch Adam steps per L2 strength.")
_LR = flags.DEFINE_float("lr", 0.01, "Adam learning rate.")
_MAX_USERS = flags.DEFINE_integer("max_users", 0, "Use only the first N users (0 = all; smoke tests).")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 50, "Examples between saves of the collected states.")


def _key(fingerprint, examples) -> str:
    h = hashlib.blake2b(fingerprint.encode(), digest_size=16)
    h.update(f"{_MODE.value}|{_HIST.value}|{_ORDER.value}".encode())
    for e in examples:
        h.update(repr((e.user, e.history, e.candidates)).encode())
    return h.hexdigest()


def main(argv):
    del argv
    import numpy as np
    from tqdm import tqdm

    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.slot_head import SlotHead
    from rcllm_jax.fetch import portable_path
    from rcllm_jax.model import load_model
    from rcllm_jax.train import slot_head as sh

    t0 = time.perf_counter()
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    split = LeaveOneOut(load_dataset("ml-100k"))
    if _MAX_USERS.value:
        split.users = split.users[:_MAX_USERS.value]
    train, train_stats = sh.training_examples(split, positions=tuple(int(p) for p in _POS.value),
                                              num_candidates=_CANDS.value, order=_ORDER.value)
    val, val_requests = sh.validation_examples(split, num_candidates=_CANDS.value, order=_ORDER.value)
    logging.info("%d training examples (%s), %d of %d validation targets retrieved", len(train), train_stats,
                 len(val), val_requests)
    model = load_model(_MODEL.value, adapter=_ADAPTER.value)
    builder = PromptBuilder(model.tokenizer, split.dataset.items, history_len=_HIST.value, head="slot",
                            max_prompt_tokens=model.cfg.max_position)
    items = sorted({i for e in train + val for i in e.candidates})
    engine = Engine(model.params, model.cfg, builder, item_ids=items, user_pages=512, prefix_pages=1,
                    max_candidates=_CANDS.value)
    engine.build_store()
    logging.info("block store: %d item blocks in %.0fs", len(items), time.perf_counter() - t0)

    collected = {}
    for name, examples in (("train", train), ("val", val)):
        path, key = out / f"states_{name}.npz", _key(engine.fingerprint, examples)
        done = sh.load_states(path, key) or []
        t1 = time.perf_counter()
        with tqdm(total=len(examples), initial=len(done), desc=f"{name} slot states ({_MODE.value})") as bar:
            states = sh.collect_states(engine, builder, examples, _MODE.value, done=done, every=_SAVE_EVERY.value,
                                       checkpoint=lambda st, path=path, key=key: sh.save_states(path, st, key),
                                       progress=lambda bar=bar: bar.update(1))
        collected[name] = (states, np.asarray([e.target_index for e in examples]))
        logging.info("%s states: %d in %.0fs", name, len(states), time.perf_counter() - t1)

    runs = []
    for l2 in (float(x) for x in _L2.value):
        theta, bias, curve = sh.fit_head(*collected["train"], l2=l2, steps=_STEPS.value, lr=_LR.value,
                                         val=collected["val"])
        runs.append({"l2": l2, "theta": theta, "bias": bias, "curve": curve,
                     "train_ndcg@10": sh.ndcg_at_10(theta, bias, *_feats(sh, collected["train"])),
                     "val_ndcg@10": curve[-1]["val_ndcg@10"]})
        logging.info("l2 %g: train NDCG@10 %.3f, validation %.3f", l2, runs[-1]["train_ndcg@10"], runs[-1]["val_ndcg@10"])
    best = max(runs, key=lambda r: r["val_ndcg@10"])
    # baselines on the same validation examples: the retriever's own order, and random
    k = _CANDS.value
    ranks_retr = collected["val"][1] if _ORDER.value == "retriever" else None
    baselines = {"random_ndcg@10": float(np.mean([np.mean(1 / np.log2(np.arange(k) + 2) * (np.arange(k) < 10))]))}
    if ranks_retr is not None:
        from rcllm_jax.eval.metrics import per_request_metrics
        baselines["retriever_ndcg@10"] = float(per_request_metrics(ranks_retr)["ndcg@10"].mean())
    card = {"base_fingerprint": engine.fingerprint, "base_model": portable_path(model.source),
            "command": "python launch/train_head.py " + " ".join(sys.argv[1:]),
            "data": "MovieLens-100k (GroupLens; research use, not redistributed: the data is never committed). "
                    f"Training: targets held back at positions {_POS.value} from the end of each sequence, each "
                    "with an item-kNN retriever fitted strictly before it; validation: leave-one-out "
                    "validation targets, retriever fitted on the training split.",
            "mode": _MODE.value, "history_len": _HIST.value, "num_candidates": k, "candidate_order": _ORDER.value,
            "train_examples": len(train), "val_examples": len(val), "val_requests": val_requests,
            "l2": best["l2"], "train_ndcg@10": best["train_ndcg@10"], "val_ndcg@10_within_retrieved": best["val_ndcg@10"],
            **{f"val_{k_}_within_retrieved": v for k_, v in baselines.items()}}
    head = SlotHead(best["theta"], best["bias"], engine.fingerprint, card)
    head.save(out / "head")
    (out / "head" / "README.md").write_text(_card_text(card))
    log = {"card": card, "train_stats": train_stats, "wall_s": time.perf_counter() - t0,
           "runs": [{k_: v for k_, v in r.items() if k_ not in ("theta", "bias")} for r in runs]}
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    print(json.dumps({k_: v for k_, v in card.items() if k_ not in ("data", "command")}, indent=2))
    print(f"wrote {out / 'head'} in {log['wall_s'] / 60:.1f} min")


def _feats(sh, pair):
    import jax
    return jax.vmap(sh.slot_features)(pair[0]), pair[1]


def _card_text(card: dict) -> str:
    lines = ["# Score-slot ranking head", "",
             "A linear listwise head over the score-slot hidden states of the base model "
             "(`rcllm_jax/engine/slot_head.py`), trained by `launch/train_head.py`.", ""]
    lines += [f"- **{k}**: {v}" for k, v in card.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
