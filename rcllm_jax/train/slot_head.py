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
slots), so training and serving share one definition. The base model stays frozen, so the states
are computed once; the head (`engine/slot_head.py`) is fitted on them with a listwise softmax
cross-entropy + L2 on the hidden-state weights (the position weight is not penalised), full batch,
Adam (optax), for every L2 strength of a grid; the strength with the best validation NDCG@10
wins.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rcllm_jax.data.pipeline import retrieved_candidates
from rcllm_jax.engine.slot_head import head_scores, slot_features
from rcllm_jax.eval.metrics import per_request_metrics
from rcllm_jax.retrieval import ItemKNN, fit_on_split


@dataclasses.dataclass(frozen=True)
class Example:
    user: int
    history: tuple[int, ...]
    candidates: tuple[int, ...]
    target_index: int


def training_examples(split, *, positions=(5, 4, 3), num_candidates: int = 20, order: str = "retriever",
                      min_history: int = 3, seed: int = 0) -> tuple[list[Example], dict]:
    """Examples at held-back positions (each from the end of a user's sequence; 3 = the last
    training item), each with a retriever fitted strictly before that position. Returns
    (examples ordered by user, then growing history; stats)."""
    seqs = split.dataset.sequences
    items = sorted(split.dataset.items)
    out, stats = [], {}
    for p in sorted(positions, reverse=True):
        retr = ItemKNN.fit([seqs[u][:-p] for u in split.users if len(seqs[u]) > p], items)
        kept = total = 0
        for u in split.users:
            seq = seqs[u]
            if len(seq) < p + min_history:
                continue
            hist, target = tuple(seq[:-p]), seq[-p]
            cands = retrieved_candidates(retr, u, hist, num_candidates, seed, order)
            total += 1
            if target in cands:
                out.append(Example(u, hist, cands, cands.index(target)))
                kept += 1
        stats[f"position_{p}"] = {"requests": total, "target_retrieved": kept}
    out.sort(key=lambda e: (e.user, len(e.history)))  # a user's history grows: the user store extends
    return out, stats


def validation_examples(split, *, num_candidates: int = 20, order: str = "retriever", seed: int = 0):
    """(examples whose validation target was retrieved, number of validation requests)."""
    retr = fit_on_split(split)
    out = []
    for u in split.users:
        hist, target = tuple(split.history(u, "valid")), split.target(u, "valid")
        cands = retrieved_candidates(retr, u, hist, num_candidates, seed, order)
        if target in cands:
            out.append(Example(u, hist, cands, cands.index(target)))
    return out, len(split.users)


def _loss(params, feats, targets, l2):
    scores = jax.vmap(lambda f: head_scores(params["theta"], params["bias"], f))(feats)  # [N, K]
    nll = -jnp.mean(jnp.take_along_axis(scores, targets[:, None], axis=1))
    return nll + l2 * jnp.sum(jnp.square(params["theta"][:-1]))


def ndcg_at_10(theta, bias, feats, targets) -> float:
    scores = np.asarray(jax.vmap(lambda f: head_scores(theta, bias, f))(feats))
    t = scores[np.arange(len(targets)), targets]
    ranks = (scores > t[:, None]).sum(1) + (scores == t[:, None]).sum(1) - 1  # ties: pessimistic
    return float(per_request_metrics(ranks)["ndcg@10"].mean())


def fit_head(states, targets, *, l2: float, steps: int = 300, lr: float = 0.01, val=None, log_every: int = 25):
    """Fit theta, bias on [N, K, D] states. val: (states, targets) for the learning curve.
    Returns (theta [D + 1], bias, curve: [{step, loss, val_ndcg@10}])."""
    feats = jax.vmap(slot_features)(jnp.asarray(states))
    targets = jnp.asarray(targets, jnp.int32)
    vfeats = None if val is None else (jax.vmap(slot_features)(jnp.asarray(val[0])), np.asarray(val[1]))
    params = {"theta": jnp.zeros(feats.shape[-1], jnp.float32), "bias": jnp.float32(0.0)}
    opt = optax.adam(lr)
    state = opt.init(params)
    step_fn = jax.jit(jax.value_and_grad(_loss))
    curve = []
    for i in range(steps + 1):
        loss, grads = step_fn(params, feats, targets, l2)
        if i % log_every == 0 or i == steps:
            row = {"step": i, "loss": float(loss)}
            if vfeats is not None:
                row["val_ndcg@10"] = ndcg_at_10(params["theta"], params["bias"], *vfeats)
            curve.append(row)
        if i == steps:
            break
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["theta"]), float(params["bias"]), curve


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
