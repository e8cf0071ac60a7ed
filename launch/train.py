"""Train the served ranker: the score-slot head and its query adapter (rcllm_jax/train/ranker.py).

python launch/train.py --output_dir=runs/ranker                                   # CPU default
python launch/train.py --config=configs/train_gpu.toml --output_dir=runs/ranker_gpu  # longer, GPU
python launch/train.py --output_dir=runs/ranker2 --steps=120                      # + stage 2 (adapter)

Examples: targets held back at --positions from the end of each user's sequence (ML-100k, or the
--catalog's; training data strictly before each; an item-kNN retriever fitted on every sequence cut there proposes the
candidates, listed in its order); validation: the targets at --validation_position, likewise
(the default config holds out 4: positions 1-3 stay for `bench.py --test_positions=1-3`). Only
the examples whose target was retrieved train (the listwise loss needs it among the candidates).

Stage 0 fits the collaborative scorer (the retriever's features of each candidate: kNN score,
follow score, position; `train/head_fit.py::fit_collaborative`) on the targets at
--collaborative_positions, which cost no model pass; it is the baseline without the LLM, and
the head learns what to add to it (`--collaborative=false`: the head alone, as before).
Stage 1 serves every example once in rcllm mode with the base model, keeps its prefix KV in
<output_dir>/prefixes and its slot states in <output_dir>/states_*.npz, and fits the head for
each --l2 (best validation NDCG@10 within the retrieved wins): <output_dir>/head. Stage 2 trains
the head and a LoRA query adapter together on the same serving path for --steps steps
(Orbax checkpoints in <output_dir>/checkpoints; rerunning the same command resumes exactly):
<output_dir>/ranker. Both are `--ranking_head` directories for serve.py, bench.py and
recommend.py; <output_dir>/train_log.json holds the learning curves (loss and validation NDCG@10
vs wall time) and the baselines on the same validation examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.settings import CatalogSettings, ModelSettings, TrainSettings, define_flags, read  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
define_flags(TrainSettings)
define_flags(ModelSettings,  # --model: the base
             exclude=("adapter", "dtype", "head", "ranking_head", "random_weights"))
define_flags(CatalogSettings, exclude=("history_len", "max_items"))  # --catalog / --dataset, --prompt
flags.FLAGS.set_default("config", str(_ROOT / "configs" / "train_cpu.toml"))


def _key(t: TrainSettings, engine, examples) -> str:
    """What the slot states and a checkpoint were computed from: weights, prompt, examples."""
    from rcllm_jax.data.prompt_template import DEFAULT_TEMPLATE
    h = hashlib.blake2b(engine.fingerprint.encode(), digest_size=16)
    h.update(f"{t.history_len}|{t.candidate_order}".encode())
    if engine.builder.template != DEFAULT_TEMPLATE:  # (keys made before templates existed stay valid)
        h.update(engine.builder.template.digest().encode())
    for e in examples:
        h.update(repr((e.user, e.history, e.candidates)).encode())
    return h.hexdigest()


def _positions(t: TrainSettings, spec: str, flag: str = "collaborative_positions") -> tuple[int, ...]:
    """'3-20' or '3,4,5' -> positions, largest first; all above the validation position."""
    from rcllm_jax.data.pipeline import parse_positions
    try:
        out = parse_positions(spec)
    except ValueError as e:
        raise app.UsageError(f"--{flag}: {e}") from None
    v = t.validation_position
    if min(out) <= v:
        raise app.UsageError(f"--{flag} must be > {v} ({v} is the validation position"
                             f"{f', 1-{v - 1} the test ones' if v > 1 else ''}), got {spec!r}")
    return tuple(sorted(out, reverse=True))


def _examples(t: TrainSettings, split):
    """(training examples, their stats, validation examples, validation requests, positions)."""
    from rcllm_jax.train import head_fit as sh
    if t.validation_position < 1:
        raise app.UsageError(f"--validation_position must be >= 1, got {t.validation_position}")
    positions = _positions(t, ",".join(t.positions), "positions")
    train, train_stats = sh.training_examples(split, positions=positions, num_candidates=t.num_candidates,
                                              order=t.candidate_order, features=t.side_features)
    val, val_requests = sh.validation_examples(split, position=t.validation_position,
                                               num_candidates=t.num_candidates,
                                               order=t.candidate_order, features=t.side_features)
    if t.val_examples:
        val = val[:t.val_examples]
    if not train or not val:
        raise app.UsageError(f"{len(train)} training and {len(val)} validation examples have their target among "
                             "the retrieved candidates: use more users (--max_users) or candidates")
    logging.info("%d training examples (%s), %d validation examples (%d requests)", len(train), train_stats,
                 len(val), val_requests)
    return train, train_stats, val, val_requests, positions


def _stage0(t: TrainSettings, split, val):
    """Stage 0: the collaborative scorer on the retriever's features (no model pass); (scorer, log)
    or (None, None) without --collaborative."""
    import numpy as np
    from rcllm_jax.train import head_fit as sh
    if not t.collaborative:
        return None, None
    c_train, c_stats = sh.training_examples(split, positions=_positions(t, t.collaborative_positions),
                                            num_candidates=t.num_candidates, order=t.candidate_order,
                                            features=t.side_features)
    if t.cold_dropout:
        c_train = sh.drop_features(c_train, t.cold_dropout, t.seed, features=t.side_features)
    collab, c_curve = sh.fit_collaborative(np.stack([e.side for e in c_train]),
                                           np.asarray([e.target_index for e in c_train]),
                                           val=(np.stack([e.side for e in val]),
                                                np.asarray([e.target_index for e in val])))
    log = {"examples": len(c_train), "positions": t.collaborative_positions, "stats": c_stats,
           "position_weight": collab.position, "side_weights": collab.side.tolist(),
           "val_ndcg@10": c_curve[-1]["val_ndcg@10"], "curve": c_curve}
    logging.info("stage 0: collaborative scorer on %d examples: validation NDCG@10 %.4f", len(c_train),
                 log["val_ndcg@10"])
    return collab, log


def _stage1(t: TrainSettings, engine, builder, train, val, cfg, prefixes, out: Path, collab):
    """Stage 1: the head over the base model's slot states (collected once, resumable), one fit
    per --l2. Returns (the fits, the best on validation, the seconds collecting took, the
    validation examples' states)."""
    import numpy as np
    from tqdm import tqdm

    from rcllm_jax.train import head_fit as sh
    from rcllm_jax.train import ranker as rk
    t1 = time.perf_counter()
    collected = {}
    for name, examples in (("train", train), ("val", val)):
        path, key = out / f"states_{name}.npz", _key(t, engine, examples)
        states = sh.load_states(path, key) or []
        with tqdm(total=len(examples), initial=len(states), desc=f"stage 1: {name} slot states") as bar:
            for i in range(len(states), len(examples), 50):
                states += rk.base_states(engine, builder, examples[i:i + 50], cfg, prefixes,
                                         progress=lambda: bar.update(1))
                sh.save_states(path, states, key)
        collected[name] = (np.stack(states), np.asarray([e.target_index for e in examples]),
                           np.stack([e.side for e in examples]))
    stage1_s = time.perf_counter() - t1
    dropped_val = None
    if t.cold_dropout:  # the head meets cold candidates: fit on dropped features, judge on both
        st, tg, _ = collected["train"]
        dropped = sh.drop_features(train, t.cold_dropout, t.seed, features=t.side_features)
        collected["train"] = (st, tg, np.stack([e.side for e in dropped]))
        dropped_val = np.stack([e.side for e in sh.drop_features(val, 1.0, t.seed + 1, features=t.side_features)])
    runs = []
    for l2 in (float(x) for x in t.l2):
        theta, bias, side_w, curve = sh.fit_head(*collected["train"], base=collab, l2=l2, steps=t.head_steps,
                                                 val=collected["val"])
        run = {"l2": l2, "theta": theta, "bias": bias, "side_weights": side_w, "curve": curve,
               "val_ndcg@10": curve[-1]["val_ndcg@10"], "selection": curve[-1]["val_ndcg@10"]}
        if dropped_val is not None:
            run["val_dropped_ndcg@10"] = sh.head_ndcg(theta, bias, side_w, *collected["val"][:2], dropped_val)
            run["selection"] = (run["val_ndcg@10"] + run["val_dropped_ndcg@10"]) / 2
        runs.append(run)
        logging.info("stage 1, l2 %g: validation NDCG@10 %.4f%s", l2, run["val_ndcg@10"],
                     f", with dropped features {run['val_dropped_ndcg@10']:.4f}" if dropped_val is not None else "")
    return runs, max(runs, key=lambda r: r["selection"]), stage1_s, collected["val"]


def _card(t: TrainSettings, engine, model, positions, train, val, val_requests, retr, rand, collab,
          collab_log, data: str) -> dict:
    """The head's card: what it was trained on and how it compares on validation."""
    from rcllm_jax.downloads import portable_path
    from rcllm_jax.engine.selective_recompute import BLOCK_MODES
    card = {"base_fingerprint": engine.fingerprint, "base_model": portable_path(model.source),
            "prompt_digest": engine.builder.template.digest(),
            "command": "python launch/train.py " + " ".join(sys.argv[1:]),
            "data": f"{data}. Training: targets held back at positions {list(positions)} from the end of each "
                    f"sequence, each with an item-kNN retriever fitted strictly before it; validation: the targets at position "
                    f"{t.validation_position}, likewise; test positions 1-{t.validation_position - 1} never used.",
            "mode": "rcllm", "policy": dataclasses.asdict(BLOCK_MODES["rcllm"]),
            "history_len": t.history_len, "num_candidates": t.num_candidates, "candidate_order": t.candidate_order,
            "positions": list(positions), "validation_position": t.validation_position,
            "train_examples": len(train), "val_examples": len(val), "val_requests": val_requests,
            "val_retriever_ndcg@10_within_retrieved": retr, "val_random_ndcg@10_within_retrieved": rand}
    if collab is not None:
        card.update(collaborative={"features": list(t.side_features), "position_weight": collab.position,
                                   "side_weights": collab.side.tolist(), "examples": collab_log["examples"],
                                   "positions": t.collaborative_positions})
        card["val_collaborative_ndcg@10_within_retrieved"] = collab_log["val_ndcg@10"]
    return card


def _stage2(t: TrainSettings, engine, builder, train, val, cfg, head, card, best, prefixes, out: Path) -> dict:
    """Stage 2: head + query adapter trained on the serving path (resumed from its checkpoints);
    saves the ranker; returns its log."""
    from rcllm_jax.train import ranker as rk
    cfg = dataclasses.replace(cfg, l2=best["l2"])
    trainer = rk.RankerTrainer(engine, builder, train, cfg, head, checkpoint_dir=out / "checkpoints",
                               data_key=_key(t, engine, train), prefixes=prefixes)
    curve_path = out / "curve.jsonl"
    if trainer.step == 0:
        curve_path.write_text(json.dumps({"step": 0, "val_ndcg@10": best["val_ndcg@10"], "wall_s": 0.0}) + "\n")
    start, t2 = trainer.step, time.perf_counter()
    wall0 = _last_wall(curve_path)

    def progress(row):
        row["wall_s"] = wall0 + time.perf_counter() - t2
        with open(curve_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        logging.info("step %d loss %.4f%s (%.1fs)", row["step"], row["loss"],
                     f" val NDCG@10 {row['val_ndcg@10']:.4f}" if "val_ndcg@10" in row else "", row["s"])

    trainer.run(val, progress=progress)
    curve = [json.loads(x) for x in curve_path.read_text().splitlines()]
    final = next((r["val_ndcg@10"] for r in reversed(curve) if "val_ndcg@10" in r), None)
    if final is None or curve[-1]["step"] != trainer.step:
        final = trainer.validate(val)
    tuned = trainer.head({**card, "stage": "head + query adapter (stage 2)", "l2": cfg.l2, "steps": trainer.step,
                          "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": list(cfg.targets),
                                   "first_layer": cfg.first_layer},
                          "val_ndcg@10_within_retrieved": final,
                          "val_ndcg@10_within_retrieved_stage1": best["val_ndcg@10"]})
    _save(tuned, out / "ranker", "Ranker: score-slot head + query adapter (LoRA on the rows computed per request)")
    return {"config": dataclasses.asdict(cfg), "resumed_from": start, "curve": curve, "val_ndcg@10": final}


def main(argv):
    del argv
    t, model_s, catalog = read(TrainSettings, ModelSettings, CatalogSettings)  # the preset first; flags win
    import numpy as np

    from rcllm_jax.data.movielens import LeaveOneOut
    from rcllm_jax.data.catalog import CatalogError, load_catalog, prompt_builder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.ranking_head import SlotHead
    from rcllm_jax.eval.metrics import per_request_metrics
    from rcllm_jax.model import load_model
    from rcllm_jax.retrieval import check_features
    from rcllm_jax.train import ranker as rk

    t0 = time.perf_counter()
    try:
        check_features(t.side_features)
    except ValueError as e:
        raise app.UsageError(f"--side_features: {e}") from None
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ds = load_catalog(catalog)
    except CatalogError as e:
        raise app.UsageError(str(e)) from None
    cold = None
    if t.cold_split:  # the world before the cold items and users: bench.py --slice measures on them
        from rcllm_jax.data.slices import choose_cold, without_cold
        try:
            cold = choose_cold(ds)
        except ValueError as e:
            raise app.UsageError(f"--cold_split: {e}") from None
        ds = without_cold(ds, cold)
    split = LeaveOneOut(ds)
    if t.max_users:
        split.users = split.users[:t.max_users]
    train, train_stats, val, val_requests, positions = _examples(t, split)
    model = load_model(model_s.model)
    builder = prompt_builder(model.tokenizer, split.dataset, catalog, history_len=t.history_len, head="slot",
                             max_prompt_tokens=model.cfg.max_position)
    items = sorted({i for e in train + val for i in e.candidates})
    engine = Engine(model.params, model.cfg, builder, item_ids=items, user_pages=256, prefix_pages=1,
                    max_candidates=t.num_candidates)
    engine.build_store()
    logging.info("block store: %d item blocks in %.0fs", len(items), time.perf_counter() - t0)
    cfg = rk.RankerConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr, warmup=t.warmup,
                          lora_rank=t.lora_rank, lora_alpha=t.lora_alpha, targets=tuple(t.lora_targets),
                          first_layer=t.first_layer, seed=t.seed, checkpoint_every=t.checkpoint_every,
                          val_every=t.val_every)
    prefixes = rk.PrefixBank(out / "prefixes")
    collab, collab_log = _stage0(t, split, val)
    runs, best, stage1_s, val_collected = _stage1(t, engine, builder, train, val, cfg, prefixes, out, collab)
    retr = float(per_request_metrics(val_collected[1])["ndcg@10"].mean()) if t.candidate_order == "retriever" else None
    k = t.num_candidates
    rand = float(np.mean(1 / np.log2(np.arange(k) + 2) * (np.arange(k) < 10)))
    ds = split.dataset
    data = ("MovieLens-100k (GroupLens; research use, not redistributed: the data is never committed)"
            if ds.name == "ml-100k" and not catalog.catalog else
            f"the catalog {ds.name} ({len(ds.items)} items, {ds.num_interactions} interactions)")
    card = _card(t, engine, model, positions, train, val, val_requests, retr, rand, collab, collab_log, data)
    if cold is not None or t.cold_dropout:
        card.update({"cold_split": None if cold is None else cold.describe(), "cold_dropout": t.cold_dropout,
                     "val_dropped_ndcg@10_within_retrieved": best.get("val_dropped_ndcg@10")})
    head = SlotHead(best["theta"], best["bias"], engine.fingerprint,
                    {**card, "stage": "head only (stage 1)", "l2": best["l2"],
                     "val_ndcg@10_within_retrieved": best["val_ndcg@10"]},
                    side_weights=best["side_weights"],
                    side_features=() if collab is None else tuple(t.side_features))
    _save(head, out / "head", "Score-slot ranking head (stage 1: the head alone, base model frozen)")
    log = {"card": card, "train_stats": train_stats, "stage0": collab_log, "stage1_s": stage1_s,
           "stage1": [{k_: v for k_, v in r.items() if k_ not in ("theta", "bias", "side_weights")} for r in runs]}
    if t.steps:
        log["stage2"] = _stage2(t, engine, builder, train, val, cfg, head, card, best, prefixes, out)
    log["wall_s_this_run"] = time.perf_counter() - t0
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    if "stage2" in log:
        _plot(log, out / "learning_curve.png")
    print(json.dumps({"val_retriever_ndcg@10": retr, "val_random_ndcg@10": rand,
                      "stage0_collaborative_val_ndcg@10": (collab_log or {}).get("val_ndcg@10"),
                      "stage1_val_ndcg@10": best["val_ndcg@10"],
                      "stage2_val_ndcg@10": log.get("stage2", {}).get("val_ndcg@10")}, indent=1))
    print(f"wrote {out} in {log['wall_s_this_run'] / 60:.1f} min")

def _plot(log: dict, path: Path):
    """Stage 2's learning curve: training loss and validation NDCG@10 vs wall time, with the
    retriever's order and the stage-1 head on the same validation examples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = log["stage2"]["curve"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tr = [r for r in curve if "loss" in r]
    a.plot([r["wall_s"] / 60 for r in tr], [r["loss"] for r in tr], lw=0.8)
    a.set(xlabel="wall time (min)", ylabel="training loss (listwise CE, per step)", title="stage 2: loss")
    va = [r for r in curve if "val_ndcg@10" in r]
    b.plot([r["wall_s"] / 60 for r in va], [r["val_ndcg@10"] for r in va], "o-", label="head + query adapter")
    for name, key, style in (("retriever order", "val_retriever_ndcg@10_within_retrieved", "--"),
                             ("random", "val_random_ndcg@10_within_retrieved", ":")):
        if log["card"].get(key) is not None:
            b.axhline(log["card"][key], ls=style, color="gray", label=name)
    b.set(xlabel="wall time (min)", ylabel="validation NDCG@10 within the retrieved", title="stage 2: validation")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _last_wall(path: Path) -> float:
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return float(rows[-1].get("wall_s", 0.0)) if rows else 0.0


def _save(head, directory: Path, title: str):
    head.save(directory)
    lines = [f"# {title}", "", "Trained by `launch/train.py` (`rcllm_jax/train/ranker.py`); loaded with "
             "`--ranking_head` (refused on other base weights).", ""]
    lines += [f"- **{k}**: {v}" for k, v in head.card.items()]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
