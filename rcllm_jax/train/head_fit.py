"""The score-slot head's training data and its stage-1 fit (launch/train.py; stage 2, the head
with a query adapter, is `train/ranker.py`).

Examples (no leakage): for each held-back position p (target = the p-th item from the end of a
user's sequence, history = everything before it), an item-kNN retriever fitted on every user's
sequence cut before that position proposes the candidates; the examples whose target was
retrieved are kept (the listwise loss needs the target among the candidates). Validation: the
leave-one-out validation targets with the training-split retriever, as `bench.py --stage=valid
--candidates=retrieved` evaluates them.

Each example's features are the slot states the engine computes when it serves the prompt
(`train/ranker.py::base_states`, the rcllm path: cached item blocks, recomputed glue and
slots), so training and serving share one definition, and the retriever's collaborative
features of its candidates (`ItemKNN.candidate_features`, from the same retriever that proposed
them). The base model stays frozen, so the states are computed once; the head
(`engine/ranking_head.py`) is fitted on them with a listwise softmax cross-entropy + L2 on the
hidden-state weights (the position and collaborative weights are not penalised), full batch,
Adam (optax), for every L2 strength of a grid; the strength with the best validation NDCG@10
wins. `fit_collaborative` fits the same scorer without the model's states: the baseline that
says what the LLM adds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rcllm_jax.data.pipeline import retrieved_candidates
from rcllm_jax.engine.ranking_head import head_scores, position_feature, slot_features
from rcllm_jax.eval.metrics import per_request_metrics
from rcllm_jax.retrieval import CANDIDATE_FEATURES, UNLINKED, check_features, fit_before


@dataclasses.dataclass(frozen=True)
class Example:
    user: int
    history: tuple[int, ...]
    candidates: tuple[int, ...]
    target_index: int
    side: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)  # [K, C] collaborative


def _example(retr, user, hist, target, num_candidates, seed, order, features):
    cands = retrieved_candidates(retr, user, hist, num_candidates, seed, order)
    if target not in cands:
        return None
    return Example(user, hist, cands, cands.index(target), retr.candidate_features(hist, cands, features))


def training_examples(split, *, positions=(5, 4, 3), num_candidates: int = 20, order: str = "retriever",
                      min_history: int = 3, seed: int = 0,
                      features=CANDIDATE_FEATURES) -> tuple[list[Example], dict]:
    """Examples at held-back positions (each from the end of a user's sequence), each with a
    retriever fitted strictly before that position (`retrieval.fit_before`) and its `features` of
    the candidates. Returns (examples with users in the split's order, each user's history
    growing; stats)."""
    seqs = split.dataset.sequences
    out, stats = [], {}
    for p in sorted(positions, reverse=True):
        retr = fit_before(split, p)
        kept = total = 0
        for u in split.users:
            seq = seqs[u]
            if len(seq) < p + min_history:
                continue
            e = _example(retr, u, tuple(seq[:-p]), seq[-p], num_candidates, seed, order, features)
            total += 1
            if e is not None:
                out.append(e)
                kept += 1
        stats[f"position_{p}"] = {"requests": total, "target_retrieved": kept}
    order_of = {u: i for i, u in enumerate(split.users)}
    out.sort(key=lambda e: (order_of[e.user], len(e.history)))  # a user's history grows: the user store extends
    return out, stats


def validation_examples(split, *, position: int = 2, num_candidates: int = 20, order: str = "retriever",
                        seed: int = 0, features=CANDIDATE_FEATURES):
    """(examples whose target held back at `position` was retrieved, number of requests there),
    users in the split's order. Position 2 is the leave-one-out validation target (retriever =
    the training split's); a head meant for an evaluation over test positions 1..k validates at
    k + 1 and trains above it."""
    out, stats = training_examples(split, positions=(position,), num_candidates=num_candidates, order=order,
                                   min_history=1, seed=seed, features=features)
    return out, stats[f"position_{position}"]["requests"]


def drop_features(examples, rate: float, seed: int = 0, share: float = 0.5,
                  features=CANDIDATE_FEATURES) -> list[Example]:
    """Examples as the head would meet cold candidates: in a `rate` share of them (seeded), each
    candidate's interaction-borne features (the examples' `features`, in order) are replaced,
    with probability `share` and the target no more or less likely than the others, by those of
    a candidate no history links to (`retrieval.UNLINKED`: no kNN or follow score, cold = 1; its
    content score stays), so a head fitted on them learns to rank such candidates from what
    remains (`launch/train.py --cold_dropout`)."""
    if not 0 <= rate <= 1 or not 0 < share <= 1:
        raise ValueError(f"drop rate must be in [0, 1] and share in (0, 1], got {rate}, {share}")
    features = check_features(features)
    cols = [i for i, n in enumerate(features) if n in UNLINKED]
    values = np.asarray([UNLINKED[features[i]] for i in cols], np.float32)
    rng = np.random.default_rng([seed, 41])
    out = []
    for e in examples:
        side = np.array(e.side, np.float32, copy=True)
        if side.shape[-1] != len(features):
            raise ValueError(f"examples carry {side.shape[-1]} features, {len(features)} named: {list(features)}")
        if rng.random() < rate:
            rows = np.flatnonzero(rng.random(len(side)) < share)
            side[np.ix_(rows, cols)] = values
        out.append(dataclasses.replace(e, side=side))
    return out


def head_ndcg(theta, bias, side_weights, states, targets, side=None) -> float:
    """NDCG@10 of a fitted head (`fit_head`'s output: theta over [h, position], side weights or None)
    on examples' slot states [N, K, D], targets [N] and collaborative features [N, K, C]."""
    off = None if side_weights is None else np.asarray(side, np.float32) @ np.asarray(side_weights, np.float32)
    return ndcg_at_10(jnp.asarray(theta), bias, head_features(states), np.asarray(targets), off)


def head_features(states):
    """[N, K, D] slot states -> [N, K, D + 1] head features."""
    return jax.vmap(slot_features)(jnp.asarray(states))


def _loss(params, feats, targets, offset, l2, penalized):
    scores = jax.vmap(lambda f, o: jax.nn.log_softmax(head_scores(params["theta"], params["bias"], f) + o))(
        feats, offset)  # [N, K]
    nll = -jnp.mean(jnp.take_along_axis(scores, targets[:, None], axis=1))
    return nll + l2 * jnp.sum(jnp.square(params["theta"][:penalized]))


def ndcg_at_10(theta, bias, feats, targets, offset=None) -> float:
    scores = np.asarray(jax.vmap(lambda f: head_scores(theta, bias, f))(feats))
    if offset is not None:
        scores = scores + np.asarray(offset)
    t = scores[np.arange(len(targets)), targets]
    ranks = (scores > t[:, None]).sum(1) + (scores == t[:, None]).sum(1) - 1  # ties: pessimistic
    return float(per_request_metrics(ranks)["ndcg@10"].mean())


def fit_listwise(feats, targets, offset=None, *, penalized: int, l2: float, steps: int = 300, lr: float = 0.01,
                 val=None, log_every: int = 25):
    """A linear listwise scorer on features [N, K, F] added to fixed logits offset [N, K] (none:
    0), L2 on the first `penalized` weights. val: (features, targets, offset or None) for the
    learning curve. Returns (weights [F], bias, curve)."""
    targets = jnp.asarray(targets, jnp.int32)
    offset = jnp.zeros(feats.shape[:2], jnp.float32) if offset is None else jnp.asarray(offset, jnp.float32)
    params = {"theta": jnp.zeros(feats.shape[-1], jnp.float32), "bias": jnp.float32(0.0)}
    opt = optax.adam(lr)
    state = opt.init(params)
    step_fn = jax.jit(jax.value_and_grad(_loss), static_argnums=5)
    curve = []
    for i in range(steps + 1):
        loss, grads = step_fn(params, feats, targets, offset, l2, penalized)
        if i % log_every == 0 or i == steps:
            row = {"step": i, "loss": float(loss)}
            if val is not None:
                row["val_ndcg@10"] = ndcg_at_10(params["theta"], params["bias"], *val)
            curve.append(row)
        if i == steps:
            break
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["theta"]), float(params["bias"]), curve


def collaborative_features(side):
    """[N, K, C] collaborative features -> [N, K, 1 + C]: the position feature first, no model states."""
    side = jnp.asarray(side, jnp.float32)
    pos = jnp.broadcast_to(position_feature(side.shape[1])[None], side.shape[:2] + (1,))
    return jnp.concatenate([pos, side], axis=-1)


@dataclasses.dataclass(frozen=True)
class Collaborative:
    """The listwise scorer on [log(1 + j), side_j] alone: the baseline that says what the LLM adds,
    and the fixed part of a head fitted over it (`fit_head(..., base=...)`)."""
    position: float
    side: np.ndarray  # [C]

    def logits(self, side) -> np.ndarray:
        """[N, K] its logits of [N, K, C] features."""
        return np.asarray(collaborative_features(side) @ jnp.asarray(np.r_[self.position, self.side], jnp.float32))


def fit_collaborative(side, targets, *, steps: int = 300, lr: float = 0.05, val=None) -> tuple[Collaborative, list]:
    """Fit the collaborative scorer on [N, K, C] features (cheap: fit it on many examples).
    val: (side, targets). Returns (scorer, curve)."""
    vf = None if val is None else (collaborative_features(val[0]), np.asarray(val[1]))
    w, _, curve = fit_listwise(collaborative_features(side), targets, penalized=0, l2=0.0, steps=steps, lr=lr,
                               val=vf)
    return Collaborative(float(w[0]), w[1:]), curve


def fit_head(states, targets, side=None, *, base: Collaborative | None = None, l2: float, steps: int = 300,
             lr: float = 0.01, val=None, log_every: int = 25):
    """Fit the head on [N, K, D] slot states. With `base` (a fitted `Collaborative`) and the
    examples' features side [N, K, C], the head learns what to add to it: its logits are a fixed
    offset, and the returned head holds both (position weights summed, side weights = base's).
    val: (states, targets[, side]). Returns (theta [D + 1], bias, side weights [C] or None, curve)."""
    d = np.shape(states)[-1]
    off = None if base is None else base.logits(side)
    vf = None
    if val is not None:
        vf = (head_features(val[0]), np.asarray(val[1]), None if base is None else base.logits(val[2]))
    w, bias, curve = fit_listwise(head_features(states), targets, off, penalized=d, l2=l2, steps=steps, lr=lr,
                                  val=vf, log_every=log_every)
    if base is None:
        return w, bias, None, curve
    w = w.copy()
    w[d] += base.position
    return w, bias, np.asarray(base.side, np.float32), curve


def save_states(path, states, examples_key: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, states=np.asarray(states, np.float32), key=np.asarray(examples_key))
    tmp.replace(path)


def load_states(path, examples_key: str):
    """States saved by an earlier run of the same examples and model, or None."""
    path = Path(path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != examples_key:
            return None
        return list(z["states"])
