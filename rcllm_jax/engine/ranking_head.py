"""The score-slot ranking head: a candidate's score from its slot's final hidden state.

A slot prompt (`PromptBuilder(head="slot")`) ends each candidate's line with a slot token that
every mode recomputes; the engine returns the final-normed hidden state h_j of each slot
([K, D], all candidates from one prefill). The head is a linear listwise scorer

  features_j = [h_j, log(1 + j)]            (j: the candidate's position in the prompt)
  score_j    = features_j . theta + b,      scores = log_softmax over the K candidates

The position feature lets the head use the order the candidates are listed in (the retriever's
order when the prompt lists them so; `--candidate_order`).

A head may also weigh **collaborative features** of each candidate (`side_features`, computed by
the retriever: `retrieval.ItemKNN.candidate_features`, e.g. how strongly the item follows the
user's latest items in training sequences; the head names which of `retrieval.FEATURES`, which
include the item text's similarity to the history and whether the item is cold). They do not
depend on the model, so they are added after the engine's scores, the same in every mode:

  final = log_softmax(scores + side @ side_weights)     (`SlotHead.combine`)

which equals one linear listwise scorer over [h_j, log(1 + j), side_j] (the engine's scores are
log-softmax of the first part). `Recommender` and `bench.py` apply it. Its weights apply only to recomputed
rows, so training it never invalidates a cached block, and its training examples are computed by
the engine's own serving path (`train/head_fit.py`): one definition for training and serving.

A head may carry a **query adapter**: LoRA weights (`model/lora.py`) that apply only to the rows
the engine computes per request (glue, score slots, question), never to the cached rows (item
blocks, the user's history prefix), which stay the base model's. Its scores are defined as:
the base model reads the whole prompt (a full prefill), then the adapted weights recompute the
query rows over that KV (`engine/ranking.py::rank_full`); the block modes replace the base KV of
the item blocks with their cached copies. Retraining it never invalidates an item cache.

Saved as safetensors (`theta`, `bias`, `adapter.<projection>.a|b`) with the base model's
fingerprint and the adapter's LoRA config in the metadata; loading it onto other weights is
refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import log_softmax

from rcllm_jax.model.lora import LoraConfig, merge


def position_feature(k: int) -> np.ndarray:
    """[K, 1] log(1 + j) of each candidate's prompt position j: the head's (and its collaborative
    scorer's) position feature. A host array: a constant inside traced code, and serving's host-side
    scores (`SlotHead.scores`) compile nothing per candidate count."""
    return np.log1p(np.arange(k, dtype=np.float32))[:, None]


def slot_features(hidden):
    """[K, D] slot hidden states -> [K, D + 1] head features (hidden, log(1 + position))."""
    return jnp.concatenate([hidden.astype(jnp.float32), position_feature(hidden.shape[0])], axis=-1)


def head_scores(theta, bias, features, valid=None):
    """Log-softmax scores [K] of features [K, F] (valid [K]: real candidates; padding gets -inf)."""
    raw = features @ theta + bias
    if valid is not None:
        raw = jnp.where(valid, raw, -jnp.inf)
    return jax.nn.log_softmax(raw)


DEFAULT_HEAD = Path(__file__).resolve().parents[1] / "assets" / "slot_head"  # the shipped head (its card: README.md)
HEADS = ("label", "slot")


def ranking_head(kind: str, path: str | None = None):
    """The launchers' --head / --ranking_head: None for label prompts; for slot prompts the head
    at `path`, default the shipped one (checked against the model by the Engine)."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    if kind == "label":
        if path:
            raise ValueError("--ranking_head applies to --head=slot only")
        return None
    return SlotHead.load(path or DEFAULT_HEAD)


class HeadError(ValueError):
    """A head file that is missing, damaged or made for other base weights."""


def head_prompt(head) -> str:
    """Digest of the prompt template `head` reads slot states of (its card's `prompt_digest`; a
    head whose card has none was trained on the default template)."""
    from rcllm_jax.data.prompt_template import DEFAULT_TEMPLATE
    return (getattr(head, "card", None) or {}).get("prompt_digest", DEFAULT_TEMPLATE.digest())


@dataclasses.dataclass(frozen=True)
class SlotHead:
    theta: np.ndarray  # [D + 1]
    bias: float
    base_fingerprint: str  # the weights whose slot hidden states it reads
    card: dict = dataclasses.field(default_factory=dict)  # how it was made (command, data, metrics)
    adapter: dict | None = None  # query adapter: {projection: {"a": [Lt, in, r], "b": [Lt, r, out]}}
    adapter_cfg: LoraConfig | None = None
    side_weights: np.ndarray | None = None  # [C] weights of the collaborative features (None: none)
    side_features: tuple[str, ...] = ()  # their names, in order (among `retrieval.FEATURES`)

    def digest(self) -> str:
        """Content digest of the head's weights (theta, bias, collaborative weights, adapter): which
        head a training run started from or a benchmark served."""
        import hashlib
        h = hashlib.blake2b(np.asarray(self.theta, np.float32).tobytes(), digest_size=12)
        h.update(np.float32(self.bias).tobytes())
        if self.side_weights is not None:
            h.update(np.asarray(self.side_weights, np.float32).tobytes())
        for n in sorted(self.adapter or {}):
            for ab in ("a", "b"):
                h.update(np.asarray(self.adapter[n][ab], np.float32).tobytes())
        return h.hexdigest()

    def combine(self, scores, side) -> np.ndarray:
        """[K] final log-softmax scores: the engine's head scores [K] plus the collaborative
        features side [K, C] weighed by `side_weights` (the scores unchanged for a head without)."""
        scores = np.asarray(scores, np.float64)
        if self.side_weights is None:
            return scores
        side = np.asarray(side, np.float64)
        if side.shape != (len(scores), len(self.side_weights)):
            raise ValueError(f"the head weighs {len(self.side_weights)} collaborative features "
                             f"({', '.join(self.side_features)}) of {len(scores)} candidates; got {side.shape}")
        return log_softmax(scores + side @ np.asarray(self.side_weights, np.float64))

    def collaborative_only(self) -> "SlotHead":
        """The ablation that measures what the LLM adds: this head with its slot-state weights zeroed
        (its position weight, bias, collaborative weights and card kept; no query adapter), so its
        scores are log_softmax(theta_pos * log(1 + j) + side @ side_weights) whatever the model reads."""
        theta = np.zeros_like(np.asarray(self.theta))
        theta[-1] = np.asarray(self.theta)[-1]
        return dataclasses.replace(self, theta=theta, adapter=None, adapter_cfg=None)

    def query_params(self, params):
        """The weights that compute the query rows: the base with the query adapter folded in
        (the base itself without one)."""
        if self.adapter is None:
            return params
        return merge(params, jax.tree.map(jnp.asarray, self.adapter), self.adapter_cfg)

    def scores(self, hidden) -> np.ndarray:
        """[K] log-softmax scores of the K candidates from their slot hidden states [K, D]: `head_scores`
        of `slot_features`, on the host (serving compiles no program per candidate count)."""
        h = np.asarray(hidden, np.float64)
        f = np.concatenate([h, position_feature(len(h))], axis=-1)
        return log_softmax(f @ np.asarray(self.theta, np.float64) + float(self.bias)).astype(np.float32)

    def save(self, directory) -> Path:
        """<directory>/head.safetensors (+ README.md: the card), written atomically."""
        from safetensors.numpy import save_file
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "head.safetensors.tmp"
        tensors = {"theta": np.asarray(self.theta, np.float32), "bias": np.asarray([self.bias], np.float32)}
        meta = {"base_fingerprint": self.base_fingerprint, "card": json.dumps(self.card)}
        if self.side_weights is not None:
            tensors["side_weights"] = np.asarray(self.side_weights, np.float32)
            meta["side_features"] = json.dumps(list(self.side_features))
        if self.adapter is not None:
            tensors.update({f"adapter.{n}.{ab}": np.asarray(w[ab], np.float32)
                            for n, w in self.adapter.items() for ab in ("a", "b")})
            c = self.adapter_cfg
            meta["adapter"] = json.dumps({"rank": c.rank, "alpha": c.alpha, "targets": list(c.targets),
                                          "first_layer": c.first_layer})
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(d / "head.safetensors")
        return d / "head.safetensors"

    @classmethod
    def load(cls, path, expect_fingerprint: str | None = None) -> "SlotHead":
        from safetensors import safe_open
        p = Path(path)
        if p.is_dir():
            p = p / "head.safetensors"
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
                theta, bias = f.get_tensor("theta"), f.get_tensor("bias")
                adapter = lcfg = None
                if "adapter" in meta:
                    a = json.loads(meta["adapter"])
                    lcfg = LoraConfig(rank=int(a["rank"]), alpha=float(a["alpha"]), targets=tuple(a["targets"]),
                                      first_layer=int(a["first_layer"]))
                    adapter = {n: {ab: f.get_tensor(f"adapter.{n}.{ab}") for ab in ("a", "b")} for n in lcfg.targets}
                side = f.get_tensor("side_weights") if "side_features" in meta else None
                names = tuple(json.loads(meta["side_features"])) if side is not None else ()
            if side is not None and side.shape != (len(names),):
                raise ValueError(f"{len(names)} collaborative feature names for {side.shape} weights")
            head = cls(theta, float(bias[0]), meta["base_fingerprint"], json.loads(meta.get("card", "{}")),
                       adapter, lcfg, side, names)
        except Exception as e:  # noqa: BLE001 - any read failure: a missing or damaged file
            raise HeadError(f"ranking head {p} is missing or damaged ({type(e).__name__}: {e})") from e
        if expect_fingerprint is not None and head.base_fingerprint != expect_fingerprint:
            raise HeadError(f"ranking head {p} was trained on other base weights "
                            f"({head.base_fingerprint[:12]}…, this model {expect_fingerprint[:12]}…)")
        return head
