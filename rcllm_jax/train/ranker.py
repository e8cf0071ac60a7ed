"""Training the ranker — the score-slot head and its query adapter — on the engine's serving path.

The query adapter is LoRA (`model/lora.py`) on the rows the engine computes per request (glue,
score slots, question); every cached row (item blocks, the user's history prefix) stays the
frozen base model's, so a training step costs about one cached request forward and backward, and
retraining never invalidates an item cache. One training step:

  inputs = Engine.prefill_inputs(prompt, "rcllm", user)     # what serving runs: user prefix, cached
                                                             # item rows fetched, the stitched layout
  hidden = inputs.run(merge(base, lora))[0]                  # the blended prefill, differentiated
  loss   = -log_softmax(head(hidden))[target] + l2 |theta|^2 # listwise over all candidates

`Engine.rank` runs the same `inputs.run` with the adapter folded in and the same head formula, so
training and serving share one definition (tested). Requests are padded to fixed shapes
(`PrefillInputs.padded`: padding is never attended), so one program is compiled for the run.

Stage 1 (`fit_initial_head`): the head alone, fitted on the base model's slot states of the
training examples (`train/head_fit.py`, L2 chosen on validation); stage 2 (`RankerTrainer`):
the head and the adapter together from there, AdamW with warm-up and cosine decay, gradients
accumulated over `batch_size` examples, Orbax checkpoints with exact resume (trainable weights,
optimizer state, step; the data order is a function of the seed and the step).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.engine.selective_recompute import PrefillInputs
from rcllm_jax.engine.ranking_head import SlotHead, head_scores, slot_features
from rcllm_jax.eval.metrics import per_request_metrics
from rcllm_jax.model.lora import PROJECTIONS, LoraConfig, init_lora, merge
from rcllm_jax.train.checkpoints import CheckpointMismatchError, open_manager  # noqa: F401 (re-exported)
from rcllm_jax.train.head_fit import Example
from rcllm_jax.train.step import make_optimizer

CHECKPOINT_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    steps: int = 400  # optimizer steps
    batch_size: int = 4  # examples per step (gradients accumulated)
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    l2: float = 1e-3  # on the head's hidden-state weights (stage 1 picks it on validation)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    first_layer: int = 0
    pad_prefix: int = 512  # fixed shapes of a training request: prefix slots, suffix rows, recomputed rows
    pad_suffix: int = 512
    pad_select: int = 64
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    val_every: int = 100

    def __post_init__(self):
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad:
            raise ValueError(f"unknown adapter targets {bad}; choose from {', '.join(PROJECTIONS)}")

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=tuple(self.targets),
                          first_layer=self.first_layer)


def _scores(query_params, theta, bias, arrays, valid, offset, static: dict):
    hidden = PrefillInputs(arrays, **static).run(query_params)[0]
    s = head_scores(theta, bias, slot_features(hidden), valid)
    return s if offset is None else jax.nn.log_softmax(s + offset)


def ranker_scores(trainable, base, arrays, valid, offset=None, *, static: dict, lcfg: LoraConfig):
    """[C] log-softmax candidate scores of one request (valid [C]: real candidates; offset [C]:
    the head's collaborative term, `SlotHead.combine`). The serving computation with the adapter
    and head as arguments: what training differentiates."""
    return _scores(merge(base, trainable["lora"], lcfg), trainable["theta"], trainable["bias"], arrays, valid,
                   offset, static)


def batch_loss(trainable, base, pool, arrays, valid, targets, l2, offset=None, *, static: dict, lcfg: LoraConfig):
    """Mean listwise cross-entropy of B requests (`arrays` without the pool, stacked [B, ...];
    pool: the shared (pool_k, pool_v); offset [B, C] or None) + l2 |theta|^2: `ranker_scores` of
    each, vmapped."""
    qp = merge(base, trainable["lora"], lcfg)
    one = lambda a, v, t, o: -_scores(qp, trainable["theta"], trainable["bias"], pool + a, v, o, static)[t]  # noqa: E731
    offset = jnp.zeros(valid.shape, jnp.float32) if offset is None else offset
    nll = jax.vmap(one)(arrays, valid, targets, offset)
    return jnp.mean(nll) + l2 * jnp.sum(jnp.square(trainable["theta"][:-1]))


class PrefixBank:
    """Each example's user prefix (instruction + history KV, computed by the engine's user store)
    kept on disk, one file per example, so later epochs restore it instead of recomputing it
    (on this CPU a 400-token prefix costs more than the training step itself)."""

    def __init__(self, directory=None):
        self.dir = None if directory is None else Path(directory)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def ensure(self, engine, example: Example, prompt) -> str:
        """The user id under which the example's prefix is now in the engine's user store."""
        uid = f"{example.user}@{len(example.history)}"
        path = None if self.dir is None else self.dir / f"{uid.replace('@', '_')}.npz"
        want = tuple(int(t) for t in prompt.blocks[0].tokens + prompt.blocks[1].tokens)
        if path is not None and path.exists():
            with np.load(path) as z:
                if tuple(z["tokens"].tolist()) == want:
                    engine.put_user_prefix(uid, want, z["k"], z["v"])
                    return uid
        engine.update_user(uid, prompt)
        if path is not None:
            toks, k, v = engine.user_prefix(uid)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, tokens=np.asarray(toks, np.int32), k=k, v=v)
            tmp.replace(path)
        return uid


def request(engine, builder, example: Example, cfg: RankerConfig, prefixes: PrefixBank | None = None):
    """(arrays, static, valid [C]) of an example, served as rcllm serves it, padded to the run's shapes."""
    prompt = builder.build(example.history, example.candidates)
    uid = (prefixes or PrefixBank()).ensure(engine, example, prompt)
    inputs, _, _ = engine.prefill_inputs(prompt, "rcllm", uid)
    inputs = inputs.padded(cfg.pad_prefix, cfg.pad_suffix, max(cfg.pad_select, inputs.n_select))
    static = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs) if f.name != "arrays"}
    c = inputs.arrays[-1].shape[0]
    return inputs.arrays, static, np.arange(c) < len(example.candidates), uid


def _static_key(static: dict) -> tuple:
    """What decides a request's compiled program (the model config is the same for a whole run)."""
    return tuple(sorted((k, v) for k, v in static.items() if k != "cfg"))


def base_states(engine, builder, examples: list[Example], cfg: RankerConfig, prefixes: PrefixBank | None = None,
                progress=None) -> list[np.ndarray]:
    """[K, D] slot states of each example under the base model on the rcllm path (=
    `Engine.slot_states(prompt, "rcllm")`): stage 1 fits the head on them. It also fills the
    prefix bank, so later epochs restore every prefix."""
    fns, out = {}, []
    for e in examples:
        arrays, static, _, _ = request(engine, builder, e, cfg, prefixes)
        key = _static_key(static)
        if key not in fns:
            fns[key] = jax.jit(lambda b, a, st=static: PrefillInputs(a, **st).run(b)[0])
        out.append(np.asarray(fns[key](engine.params, arrays))[:len(e.candidates)])
        if progress is not None:
            progress()
    return out


def ndcg_within(scores_list, targets) -> float:
    """Mean NDCG@10 of the targets under each request's scores (ties pessimistic)."""
    ranks = []
    for s, t in zip(scores_list, targets):
        s = np.asarray(s)
        ranks.append(int((s > s[t]).sum() + (s == s[t]).sum() - 1))
    return float(per_request_metrics(np.asarray(ranks))["ndcg@10"].mean())


class RankerTrainer:
    """Stage 2: the head and the query adapter trained together on the engine's rcllm path."""

    def __init__(self, engine, builder, train: list[Example], cfg: RankerConfig, head: SlotHead, *,
                 checkpoint_dir=None, data_key: str = "", prefixes: PrefixBank | None = None):
        if engine.has_query_adapter:
            raise ValueError("train the adapter on an engine serving the base model (its head has no adapter)")
        self.engine, self.builder, self.train, self.cfg = engine, builder, list(train), cfg
        self.lcfg = cfg.lora
        self.base = engine.params
        self.side_weights = head.side_weights  # fixed: the collaborative term is not retrained here
        self.side_features = head.side_features
        self.prefixes = prefixes or PrefixBank()
        trainable = {"lora": init_lora(self.base, self.lcfg, jax.random.key(cfg.seed)),
                     "theta": jnp.asarray(head.theta, jnp.float32), "bias": jnp.float32(head.bias)}
        self.optimizer, self.schedule = make_optimizer(cfg.lr, cfg.warmup, cfg.steps, cfg.weight_decay)
        self.state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
                      "opt_state": self.optimizer.init(trainable)}
        self.identity = {"format": CHECKPOINT_FORMAT, "base_fingerprint": engine.fingerprint,
                         "config": dataclasses.asdict(cfg), "data": data_key, "initial_head": head.digest()}
        self._grad = {}
        self._fwd = {}
        self.manager = None if checkpoint_dir is None else self._manager(Path(checkpoint_dir))
        if self.manager is not None:
            self._restore()

    # --- checkpoints ----------------------------------------------------------------------------

    def _manager(self, path: Path):
        return open_manager(path, self.identity, self.cfg.keep_checkpoints)

    def _restore(self):
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            return
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        self.state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        logging.info("resumed from step %d", step)

    def save(self):
        import orbax.checkpoint as ocp
        if self.manager is None or self.step in self.manager.all_steps():
            return
        self.manager.save(self.step, args=ocp.args.StandardSave(self.state))
        self.manager.wait_until_finished()

    # --- steps ----------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def _fn(self, cache, static, make):
        key = _static_key(static)
        if key not in cache:
            cache[key] = make(static)
        return cache[key]

    def _grad_fn(self, static):
        return self._fn(self._grad, static, lambda st: jax.jit(jax.value_and_grad(
            lambda t, b, pool, a, v, y, l2, o: batch_loss(t, b, pool, a, v, y, l2, o, static=st, lcfg=self.lcfg))))

    def _fwd_fn(self, static):
        return self._fn(self._fwd, static, lambda st: jax.jit(
            lambda t, b, a, v, o: ranker_scores(t, b, a, v, o, static=st, lcfg=self.lcfg)))

    def _offset(self, example: Example, c: int) -> np.ndarray:
        """[c] the head's collaborative logits of the example's candidates (0 beyond them / without)."""
        out = np.zeros(c, np.float32)
        if self.side_weights is not None:
            out[:len(example.candidates)] = np.asarray(example.side) @ self.side_weights
        return out

    def order(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based): epochs of a seeded permutation."""
        n, b = len(self.train), self.cfg.batch_size
        out = []
        for k in range(step * b, (step + 1) * b):
            epoch, i = divmod(k, n)
            out.append(int(np.random.default_rng([self.cfg.seed, epoch]).permutation(n)[i]))
        return out

    def train_step(self) -> dict:
        """One optimizer step over `batch_size` examples (one vmapped forward/backward); returns
        {step, loss, s}."""
        import optax
        t0 = time.perf_counter()
        tr = self.state["trainable"]
        reqs = [request(self.engine, self.builder, self.train[i], self.cfg, self.prefixes) for i in self.order(self.step)]
        statics = {_static_key(st) for _, st, _, _ in reqs}
        if len(statics) > 1:
            raise RuntimeError(f"requests of one step need different programs ({statics}): raise pad_select")
        # the last request's pool: each prefix put back before it wrote (and donated) the pool again;
        # every request's prefix must still be where its layout points (none evicted by a later one)
        pool = tuple(reqs[-1][0][:2])
        if not all(self.engine.has_user(r[3]) for r in reqs):
            raise RuntimeError("the user store cannot hold one step's prefixes: give the engine more user_pages")
        arrays = tuple(jnp.stack([jnp.asarray(r[0][j]) for r in reqs]) if reqs[0][0][j] is not None else None
                       for j in range(2, len(reqs[0][0])))
        valid = jnp.stack([jnp.asarray(r[2]) for r in reqs])
        batch = [self.train[i] for i in self.order(self.step)]
        targets = jnp.asarray([e.target_index for e in batch], jnp.int32)
        offset = jnp.asarray(np.stack([self._offset(e, valid.shape[1]) for e in batch]))
        loss, grads = self._grad_fn(reqs[0][1])(tr, self.base, pool, arrays, valid, targets, self.cfg.l2, offset)
        updates, opt_state = self.optimizer.update(grads, self.state["opt_state"], tr)
        self.state = {"step": self.state["step"] + 1, "trainable": optax.apply_updates(tr, updates),
                      "opt_state": opt_state}
        return {"step": self.step, "loss": float(loss), "s": time.perf_counter() - t0}

    def scores(self, examples: list[Example], trainable=None) -> list[np.ndarray]:
        """Each example's candidate scores under the current (or given) head and adapter."""
        tr = self.state["trainable"] if trainable is None else trainable
        out = []
        for e in examples:
            arrays, static, valid, _ = request(self.engine, self.builder, e, self.cfg, self.prefixes)
            off = jnp.asarray(self._offset(e, len(valid)))
            out.append(np.asarray(self._fwd_fn(static)(tr, self.base, arrays, valid, off))[:len(e.candidates)])
        return out

    def validate(self, examples: list[Example]) -> float:
        return ndcg_within(self.scores(examples), [e.target_index for e in examples])

    def run(self, val: list[Example] | None = None, until: int | None = None, progress=None) -> list[dict]:
        """Train to step `until` (default cfg.steps), checkpointing and validating on the way;
        returns the learning curve rows of this run."""
        until = self.cfg.steps if until is None else until
        curve = []
        while self.step < until:
            row = self.train_step()
            if val and self.cfg.val_every and (self.step % self.cfg.val_every == 0 or self.step == until):
                t1 = time.perf_counter()
                row["val_ndcg@10"] = self.validate(val)
                row["val_s"] = time.perf_counter() - t1
            curve.append(row)
            if progress is not None:
                progress(row)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == until:
                self.save()
        return curve

    def head(self, card: dict | None = None) -> SlotHead:
        """The trained ranker as a `SlotHead` with its query adapter (what serving loads)."""
        tr = jax.tree.map(np.asarray, self.state["trainable"])
        return SlotHead(np.asarray(tr["theta"], np.float32), float(tr["bias"]), self.engine.fingerprint, card or {},
                        adapter={n: {ab: np.asarray(w[ab], np.float32) for ab in ("a", "b")}
                                 for n, w in tr["lora"].items()}, adapter_cfg=self.lcfg,
                        side_weights=self.side_weights, side_features=self.side_features)
