"""The training forward pass, loss and optimizer step.

`stitched_hidden` runs a batch of padded prompts in one pass whose attention is given by the
stitching plan (`engine/plan.py::stitched_masks`): tokens of cached blocks are computed at their
canonical positions seeing only the instruction and their own block, forced tokens (fresh glue,
the answer position) see every earlier token with cached keys re-rotated to real positions, as
the engine's `blended_prefill` does. Ordinary examples (segments 0, nothing forced) reduce to
plain causal attention. Layers below `first_layer` are frozen and run outside the gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from rcllm_jax.engine.plan import stitched_masks
from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import Params, attend, embed, layer_mask, lm_head, out_mlp, qkv
from rcllm_jax.model.lora import LoraConfig, merge, merge_layers
from rcllm_jax.model.rope import inv_freq, layer_inv, rerotate


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of what is trained (hashable: a jit static argument)."""

    cfg: ModelConfig
    first_layer: int  # layers >= first_layer are trained
    lora: LoraConfig | None  # None: full fine-tuning of the trained layers
    global_rows: int  # most forced (globally attending) tokens in one example
    teacher_weight: float = 0.0  # weight of the soft popularity target over the candidate labels


def trainable_init(base: Params, spec: Spec, key):
    from rcllm_jax.model.lora import init_lora
    if spec.lora is not None:
        return init_lora(base, spec.lora, key)
    return {"layers": jax.tree.map(lambda a: a[spec.first_layer:].astype(jnp.float32), base["layers"])}


def upper_layers(base: Params, trainable, spec: Spec):
    hi = jax.tree.map(lambda a: a[spec.first_layer:], base["layers"])
    if spec.lora is not None:
        return merge_layers(hi, trainable, spec.lora)
    return jax.tree.map(lambda a, b: a.astype(b.dtype), trainable["layers"], hi)


def merged_params(base: Params, trainable, spec: Spec) -> Params:
    """The full pytree of the tuned model (what gets exported and served)."""
    if spec.lora is not None:
        return merge(base, trainable, spec.lora)  # the adapter path `apply_adapter` uses too
    f = spec.first_layer
    hi = upper_layers(base, trainable, spec)
    layers = {n: base["layers"][n].at[f:].set(hi[n]) for n in base["layers"]}
    return {**base, "layers": layers}


def stitched_hidden(params_lo, layers_hi, embed_table, batch, cfg: ModelConfig, global_rows: int):
    """Final residual stream at each example's answer position [B, D].

    Every query attends along the block path (canonical positions, block mask); the forced ones
    (at most `global_rows` per example, gathered first) attend again along the global path (real
    positions, every earlier key) and that result replaces theirs: the global path costs
    global_rows x T scores instead of T x T."""
    inv = inv_freq(cfg)
    b, t = batch["tokens"].shape
    real = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    forced = batch["forced"]
    cpos = jnp.where(forced, real, batch["canon_pos"])
    block, glob = stitched_masks(real, cpos, batch["seg"], forced, batch["valid"], cfg)
    f = min(global_rows, t)
    rows = jnp.argsort(~forced, axis=1, stable=True)[:, :f]  # forced rows first, in order  [B, F]
    take = lambda a: jnp.take_along_axis(a, rows.reshape(b, f, *([1] * (a.ndim - 2))), axis=1)  # noqa: E731
    glob_f, sel = jax.tree.map(take, glob), take(forced)[:, :, None]
    bi = jnp.arange(b)[:, None]

    def layer(x, xs):
        i, p = xs
        inv_i = layer_inv(inv, i)
        q, k, v = qkv(cfg, inv_i, x, p, cpos)
        out = attend(cfg, q, k, v, layer_mask(block, cfg, i))
        out_f = attend(cfg, take(q), rerotate(k, cpos, real, inv_i), v, layer_mask(glob_f, cfg, i))
        out = out.at[bi, rows].set(jnp.where(sel, out_f, out[bi, rows]))
        return out_mlp(cfg, x, p, out), None

    x = embed({"embed": embed_table}, cfg, batch["tokens"])
    lo = 0
    if params_lo is not None:
        lo = jax.tree.leaves(params_lo)[0].shape[0]
        x, _ = jax.lax.scan(layer, x, (jnp.arange(lo), params_lo))
        x = jax.lax.stop_gradient(x)
    x, _ = jax.lax.scan(layer, x, (jnp.arange(lo, cfg.num_layers), layers_hi))
    return x[jnp.arange(b), batch["answer_index"]]


def _hidden(base, trainable, batch, spec: Spec):
    lo = jax.tree.map(lambda a: a[:spec.first_layer], base["layers"]) if spec.first_layer else None
    return stitched_hidden(lo, upper_layers(base, trainable, spec),
                           base["embed"], batch, spec.cfg, spec.global_rows)


def loss_fn(trainable, base, batch, spec: Spec):
    """(1 - w) x cross-entropy of the answer's label token over the full vocabulary
    + w x cross-entropy of the soft teacher target over the candidates' label logits."""
    h = _hidden(base, trainable, batch, spec)
    logits = lm_head(base, spec.cfg, h)  # [B, V] f32
    lp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lp, batch["label"][:, None], axis=1)[:, 0]
    cand = jnp.take_along_axis(logits, batch["cand_ids"], axis=1)
    correct = jnp.argmax(cand, axis=1) == batch["target_index"]
    loss = nll
    if spec.teacher_weight:
        soft = -jnp.sum(batch["teacher"] * jax.nn.log_softmax(cand, axis=-1), axis=-1)
        loss = (1 - spec.teacher_weight) * nll + spec.teacher_weight * soft
    return jnp.mean(loss), {"nll": nll, "correct": correct}


def make_optimizer(lr: float, warmup: int, total: int, weight_decay: float, clip: float = 1.0):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total, warmup + 1), end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=weight_decay)), sched


def make_train_step(optimizer, spec: Spec):
    """jitted (state, base, batch [A, M, ...]) -> (state, metrics): A micro-batches of M examples,
    gradients accumulated in f32 over A, one optimizer update. `state` is donated."""
    grad = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, base, batch):
        def micro(acc, mb):
            (loss, aux), g = grad(state["trainable"], base, mb, spec)
            return jax.tree.map(jnp.add, acc, g), (loss, aux["nll"], aux["correct"])

        zero = jax.tree.map(jnp.zeros_like, state["trainable"])
        g, (losses, nll, correct) = jax.lax.scan(micro, zero, batch)
        g = jax.tree.map(lambda x: x / losses.shape[0], g)
        updates, opt_state = optimizer.update(g, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        return new, {"loss": jnp.mean(losses), "nll": jnp.mean(nll), "acc": jnp.mean(correct),
                     "grad_norm": optax.global_norm(g)}

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(spec: Spec):
    """jitted (trainable, base, batch [B, ...]) -> candidate logits [B, K] (for HR/NDCG)."""
    def ev(trainable, base, batch):
        h = _hidden(base, trainable, batch, spec)
        return lm_head(base, spec.cfg, h)[jnp.arange(h.shape[0])[:, None], batch["cand_ids"]]
    return jax.jit(ev)
