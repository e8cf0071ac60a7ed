"""The training loop: grain batches -> jitted optimizer steps, Orbax checkpoints with exact resume
(trainable weights, optimizer state, step, data-iterator position), periodic validation HR/NDCG
(full prefill and stitched attention), export of the adapter and of the merged model."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.cache.keys import model_fingerprint
from rcllm_jax.data.movielens import LeaveOneOut, sample_candidates
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.eval.metrics import ranking_metrics, target_rank
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import Params
from rcllm_jax.model.lora import LoraConfig
from rcllm_jax.settings import FineTuneSettings
from rcllm_jax.train.data import ExampleMaker, fit_prompt, prompt_arrays, train_dataset, training_pairs
from rcllm_jax.train.checkpoints import CheckpointMismatchError, open_manager  # noqa: F401 (re-exported)
from rcllm_jax.train.step import Spec, make_eval_step, make_optimizer, make_train_step, merged_params, trainable_init

CHECKPOINT_FORMAT = 1


def _identity(cfg: FineTuneSettings, model_cfg: ModelConfig, fingerprint: str) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"format": CHECKPOINT_FORMAT, "base_fingerprint": fingerprint, "model": model_cfg.identity_text(),
            "train": dataclasses.asdict(cfg)}


class Trainer:
    def __init__(self, params: Params, model_cfg: ModelConfig, tokenizer, split: LeaveOneOut, cfg: FineTuneSettings,
                 *, checkpoint_dir: str | Path | None = None, fingerprint: str | None = None,
                 pairs: list[tuple[int, int]] | None = None):
        """pairs: (user, t) training examples to draw from (default: every one of the split)."""
        self.base, self.model_cfg, self.cfg, self.split = params, model_cfg, cfg, split
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint or model_fingerprint(params, model_cfg)
        first = 0 if cfg.train_layers <= 0 else max(0, model_cfg.num_layers - cfg.train_layers)
        lora = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, first_layer=first) if cfg.lora_rank > 0 else None
        self.builder = PromptBuilder(tokenizer, split.dataset.items, history_len=cfg.history_len,
                                     max_prompt_tokens=cfg.max_len)
        self.spec = Spec(model_cfg, first, lora, self._global_rows(), cfg.teacher_weight)
        self.pairs = training_pairs(split, cfg.min_history) if pairs is None else list(pairs)
        maker = ExampleMaker(self.builder, split, num_candidates=cfg.num_candidates, max_len=cfg.max_len,
                             negatives=cfg.negatives, block_prob=cfg.block_attention_prob,
                             block_glue=cfg.block_glue, seed=cfg.seed,
                             teacher_temperature=cfg.teacher_temperature)
        self.dataset = train_dataset(self.pairs, maker, cfg.batch_size, cfg.seed)
        self.optimizer, self.schedule = make_optimizer(cfg.lr, cfg.warmup, cfg.steps, cfg.weight_decay)
        self.train_step = make_train_step(self.optimizer, self.spec)
        self.eval_step = make_eval_step(self.spec)
        trainable = trainable_init(params, self.spec, jax.random.key(cfg.seed))
        self.state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
                      "opt_state": self.optimizer.init(trainable)}
        self.iterator = iter(self.dataset)
        self.identity = _identity(cfg, model_cfg, self.fingerprint)
        self.manager = None
        if checkpoint_dir is not None:
            self.manager = self._manager(Path(checkpoint_dir))
            self._restore()
        self.history: list[dict] = []

    def _global_rows(self) -> int:
        """Forced tokens of a block-aware example: its glue (the same for every prompt with K
        candidates) when computed fresh, plus the answer position; rounded up to 16."""
        items = list(self.split.dataset.items)[:self.cfg.num_candidates]
        prompt = self.builder.build([], items)
        n = sum(len(b.tokens) for b in prompt.blocks if b.kind == "glue") + 1
        return -(-n // 16) * 16

    # --- checkpoints --------------------------------------------------------------------------

    def _manager(self, path: Path):
        def describe(old):
            diff = sorted(k for k in set(old.get("train", {})) | set(self.identity["train"])
                          if old.get("train", {}).get(k) != self.identity["train"].get(k))
            return ("base model" if old.get("base_fingerprint") != self.identity["base_fingerprint"]
                    else f"settings {diff}" if diff else "checkpoint format or model config")
        return open_manager(path, self.identity, self.cfg.keep_checkpoints, describe)

    def _restore(self):
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            return
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        self.state = got["state"]
        self.iterator.set_state(got["data"])
        logging.info("resumed from step %d", step)

    def save(self):
        import orbax.checkpoint as ocp
        step = int(self.state["step"])
        if self.manager is None or step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                        data=ocp.args.JsonSave(self.iterator.get_state())))
        self.manager.wait_until_finished()

    # --- loop ---------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def _device_batch(self, batch: dict) -> dict:
        a, m = self.cfg.batch_size // self.cfg.micro_batch, self.cfg.micro_batch
        most = int(batch["forced"].sum(axis=1).max())
        if most > self.spec.global_rows:
            raise RuntimeError(f"an example has {most} forced tokens, more than the {self.spec.global_rows} "
                               "global rows the step was compiled for")
        return {k: jnp.asarray(v).reshape((a, m) + v.shape[1:]) for k, v in batch.items()}

    def run(self, until: int | None = None, progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Train to step `until` (default: cfg.steps). stop_after: return after this many steps of
        this call (an interruption, for tests)."""
        until = self.cfg.steps if until is None else until
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=until, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        done = 0
        t_last, tok_acc = time.perf_counter(), 0
        while self.step < until and (stop_after is None or done < stop_after):
            batch = next(self.iterator)
            tok_acc += int(batch["valid"].sum())
            self.state, m = self.train_step(self.state, self.base, self._device_batch(batch))
            done += 1
            rec = {"step": self.step, "loss": float(m["loss"]), "nll": float(m["nll"]), "acc": float(m["acc"]),
                   "grad_norm": float(m["grad_norm"]), "lr": float(self.schedule(self.step - 1)),
                   "block_frac": float(np.mean(batch["block"]))}
            now = time.perf_counter()
            rec["tokens_per_s"] = tok_acc / max(now - t_last, 1e-9)
            t_last, tok_acc = now, 0
            self.history.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", nll=f"{rec['nll']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save()
            if self.cfg.val_every and self.step % self.cfg.val_every == 0 and self.cfg.val_users:
                val = self.validate()
                rec.update({f"val_{k}": v for k, v in val.items()})
                logging.info("step %d validation %s", self.step, val)
                if bar is not None:
                    bar.write(f"step {self.step}: " + " ".join(f"{k}={v:.3f}" for k, v in val.items()))
        if bar is not None:
            bar.close()
        if self.step >= until:
            self.save()
        return self.history

    # --- evaluation ---------------------------------------------------------------------------

    def validation_prompts(self, stage: str = "valid", num_users: int | None = None, seed: int = 0):
        """(prompt, target_index) for the first users of a seeded order, leave-one-out `stage` target."""
        rng = np.random.default_rng(seed)
        users = list(self.split.users)
        rng.shuffle(users)
        out = []
        for u in users[:num_users or self.cfg.val_users]:
            target = self.split.target(u, stage)
            cands = sample_candidates(self.split, u, target, self.cfg.num_candidates, self.cfg.negatives, seed)
            out.append((fit_prompt(self.builder, self.split.history(u, stage), cands, self.cfg.max_len),
                        cands.index(target)))
        return out

    def validate(self, stage: str = "valid", num_users: int | None = None, batch: int = 4) -> dict:
        """HR/NDCG of the current weights with full attention and with the engine's stitching
        (cached items and glue, the rcllm plan), on held-out `stage` targets."""
        prompts = self.validation_prompts(stage, num_users)
        out = {}
        for name, block in (("full", False), ("stitch", True)):
            ranks = []
            for s in range(0, len(prompts), batch):
                chunk = prompts[s:s + batch]
                rows = [prompt_arrays(p, t, self.cfg.max_len, block=block, cached_glue=True) for p, t in chunk]
                rows += [rows[-1]] * (batch - len(rows))
                arrays = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
                scores = np.asarray(self.eval_step(self.state["trainable"], self.base, arrays))
                ranks += [target_rank(scores[i], t) for i, (_, t) in enumerate(chunk)]
            m = ranking_metrics(ranks)
            out.update({f"{name}_hr@1": m["hr@1"], f"{name}_hr@10": m["hr@10"], f"{name}_ndcg@10": m["ndcg@10"]})
        return out

    # --- export -------------------------------------------------------------------------------

    def merged(self) -> Params:
        return merged_params(self.base, self.state["trainable"], self.spec)

    def export(self, out_dir: str | Path, extra: dict | None = None) -> dict:
        """Write `merged/` (a HF model directory `load_model` reads) and, for LoRA, `adapter/`."""
        from rcllm_jax.model.export import save_hf_dir
        from rcllm_jax.model.lora import save_adapter
        out_dir = Path(out_dir)
        meta = {"base_fingerprint": self.fingerprint, "steps": self.step, "train": dataclasses.asdict(self.cfg),
                **(extra or {})}
        paths = {"merged": str(save_hf_dir(out_dir / "merged", self.merged(), self.model_cfg, self.tokenizer, meta))}
        if self.spec.lora is not None:
            save_adapter(out_dir / "adapter", self.state["trainable"], self.spec.lora, self.model_cfg,
                         self.fingerprint, extra={"steps": self.step})
            paths["adapter"] = str(out_dir / "adapter")
        return paths
