"""LoRA adapters over the stacked decoder weights: W' = W + (alpha / rank) * A @ B on the
projections of the top layers, saved as safetensors + a JSON config bound to the base weights'
fingerprint (an adapter is refused on any other base)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import Params

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
ADAPTER_FORMAT = 1


class AdapterMismatchError(ValueError):
    """An adapter saved for other base weights or another model shape."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = PROJECTIONS
    first_layer: int = 0  # layers first_layer .. L-1 carry adapters

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError("LoRA rank must be positive")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {', '.join(PROJECTIONS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(params: Params, lcfg: LoraConfig, key) -> dict:
    """A ~ N(0, 1/in), B = 0: the adapted model starts equal to the base."""
    out = {}
    keys = jax.random.split(key, len(lcfg.targets))
    for k, name in zip(keys, lcfg.targets):
        w = params["layers"][name][lcfg.first_layer:]  # [Lt, in, out]
        lt, din, dout = w.shape
        out[name] = {"a": jax.random.normal(k, (lt, din, lcfg.rank), jnp.float32) * din ** -0.5,
                     "b": jnp.zeros((lt, lcfg.rank, dout), jnp.float32)}
    return out


def lora_delta(lora: dict, name: str, lcfg: LoraConfig):
    ab = lora[name]
    return lcfg.scale * jnp.einsum("lir,lro->lio", ab["a"], ab["b"])


def merge_layers(layers: dict, lora: dict, lcfg: LoraConfig) -> dict:
    """Layer weights [Lt, ...] (the adapted layers only) with the adapters folded in."""
    out = dict(layers)
    for name in lcfg.targets:
        out[name] = (layers[name].astype(jnp.float32) + lora_delta(lora, name, lcfg)).astype(layers[name].dtype)
    return out


def merge(params: Params, lora: dict, lcfg: LoraConfig) -> Params:
    """Full parameter pytree with the adapters folded into layers first_layer.. ."""
    f = lcfg.first_layer
    layers = dict(params["layers"])
    upper = merge_layers({n: layers[n][f:] for n in lcfg.targets}, lora, lcfg)
    for name in lcfg.targets:
        layers[name] = layers[name].at[f:].set(upper[name])
    return {**params, "layers": layers}


def save_adapter(path: str | Path, lora: dict, lcfg: LoraConfig, cfg: ModelConfig, base_fingerprint: str,
                 extra: dict | None = None):
    from safetensors.numpy import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{ab}": np.asarray(lora[name][ab]) for name in lora for ab in ("a", "b")}
    save_file(tensors, str(path / "adapter.safetensors"))
    meta = {"format": ADAPTER_FORMAT, "rank": lcfg.rank, "alpha": lcfg.alpha, "targets": list(lcfg.targets),
            "first_layer": lcfg.first_layer, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "base_fingerprint": base_fingerprint, **(extra or {})}
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=1))


def load_adapter(path: str | Path) -> tuple[dict, LoraConfig, dict]:
    from safetensors.numpy import load_file
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{path} is not a LoRA adapter directory: {f.name} is missing")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterMismatchError(f"{path}: adapter format {meta.get('format')!r}, expected {ADAPTER_FORMAT}")
    lcfg = LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]),
                      first_layer=int(meta["first_layer"]))
    t = load_file(str(weights))
    lora = {n: {ab: jnp.asarray(t[f"{n}.{ab}"]) for ab in ("a", "b")} for n in lcfg.targets}
    return lora, lcfg, meta


def apply_adapter(params: Params, cfg: ModelConfig, path: str | Path, base_fingerprint: str) -> Params:
    """Base weights + the adapter at `path`, merged. Refused unless the adapter was trained on
    exactly these base weights."""
    lora, lcfg, meta = load_adapter(path)
    if (meta["num_layers"], meta["hidden_size"]) != (cfg.num_layers, cfg.hidden_size):
        raise AdapterMismatchError(
            f"{path}: adapter is for a model with {meta['num_layers']} layers x {meta['hidden_size']} "
            f"hidden, this model has {cfg.num_layers} x {cfg.hidden_size}")
    if meta["base_fingerprint"] != base_fingerprint:
        raise AdapterMismatchError(
            f"{path}: adapter was trained on other base weights (fingerprint {meta['base_fingerprint'][:12]}..., "
            f"loaded model {base_fingerprint[:12]}...); load the model it was trained on")
    try:
        check_fits(params, lora, lcfg)
    except AdapterMismatchError as e:
        raise AdapterMismatchError(f"{path}: {e}") from None
    return merge(params, lora, lcfg)


def check_fits(params: Params, lora: dict, lcfg: LoraConfig):
    """AdapterMismatchError unless every adapted projection's [layers, in, out] is the model's."""
    for name in lcfg.targets:
        base = params["layers"].get(name)
        want = None if base is None else tuple(base[lcfg.first_layer:].shape)
        got = (lora[name]["a"].shape[0], lora[name]["a"].shape[1], lora[name]["b"].shape[2])
        if want != got:
            raise AdapterMismatchError(f"adapter {name} has shape {got}, model needs {want}")
