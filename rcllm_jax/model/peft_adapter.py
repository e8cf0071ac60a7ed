"""Hugging Face PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`, what
`PeftModel.save_pretrained` writes) folded into the decoder's weights at load time.

Each adapted projection gets W' = W + s * (B @ A)^T in our [in, out] layout, with s = alpha / r
(`use_rslora`: alpha / sqrt(r)) and r each module's own rank (so `rank_pattern` needs nothing
more). Dropout is a training-time option and is ignored. What this engine does not implement is
refused with an `AdapterMismatchError` naming it (DoRA, LoRA biases, `modules_to_save`,
`alpha_pattern`, embedding or output-layer adapters, ...), as is a tensor whose shape does not fit
the model. Merged weights change the model's fingerprint, so an item cache built on the base model
is refused under the adapter (`cache/snapshot.py`), as it must be: the adapter changes every row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from rcllm_jax.model.config import ModelConfig
from rcllm_jax.model.decoder import Params
from rcllm_jax.model.lora import AdapterMismatchError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_MODULES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
            "up_proj": "w_up", "down_proj": "w_down"}
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (an adapter name may follow lora_A)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")
# options that change the computation beyond W + s * B @ A: refused, with the option's name
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
                "modules_to_save": "fully trained modules (modules_to_save)",
                "alpha_pattern": "per-module alphas (alpha_pattern)", "layer_replication": "layer_replication",
                "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts)", "use_qalora": "QALoRA (use_qalora)",
                "target_parameters": "parameter targets (target_parameters)",
                "trainable_token_indices": "trainable token embeddings (trainable_token_indices)"}


def is_peft_adapter(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (its config names a peft_type)."""
    f = Path(path) / CONFIG_FILE
    try:
        return f.exists() and "peft_type" in json.loads(f.read_text())
    except (OSError, ValueError):
        return False


def read_config(path: Path) -> dict:
    """The adapter's config, checked: LoRA, nothing this engine does not implement."""
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterMismatchError(f"{path / CONFIG_FILE}: not a readable PEFT adapter config ({e})") from None
    if meta.get("peft_type") != "LORA":
        raise AdapterMismatchError(f"{path}: PEFT adapter type {meta.get('peft_type')!r}; only LORA is supported")
    for key, what in _UNSUPPORTED.items():
        if meta.get(key):
            raise AdapterMismatchError(f"{path}: the adapter uses {what}, which this engine does not implement")
    if meta.get("bias", "none") != "none":
        raise AdapterMismatchError(f"{path}: the adapter trains biases (bias={meta['bias']!r}), which this engine "
                                   "does not implement")
    if not (path / WEIGHTS_FILE).exists():
        other = " (adapter_model.bin: save it with safe_serialization=True)" if (path / "adapter_model.bin").exists() \
            else ""
        raise AdapterMismatchError(f"{path}: {WEIGHTS_FILE} is missing{other}")
    return meta


def read_pairs(path: Path, cfg: ModelConfig) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, our projection name) -> (A [r, in], B [out, r]) of every adapted module."""
    from safetensors.numpy import load_file
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, t in load_file(str(path / WEIGHTS_FILE)).items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in _MODULES:
            raise AdapterMismatchError(f"{path}: adapter tensor {key!r} is not a LoRA factor of a decoder projection "
                                       f"({', '.join(_MODULES)}); embedding / output-layer adapters are not "
                                       "implemented")
        layer = int(m.group(1))
        if layer >= cfg.num_layers:
            raise AdapterMismatchError(f"{path}: {key} adapts layer {layer}; the model has {cfg.num_layers} layers")
        halves.setdefault((layer, _MODULES[m.group(2)]), {})[m.group(3)] = np.asarray(t, np.float32)
    pairs = {}
    for (layer, name), ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise AdapterMismatchError(f"{path}: layer {layer} {name} has lora_{''.join(ab)} but not both factors")
        pairs[layer, name] = ab["A"], ab["B"]
    if not pairs:
        raise AdapterMismatchError(f"{path}: the adapter holds no LoRA factors")
    return pairs


def merge_peft_adapter(params: Params, cfg: ModelConfig, path: str | Path) -> Params:
    """`params` with the PEFT LoRA adapter at `path` folded in (f32 arithmetic, the model's dtype
    after)."""
    path = Path(path)
    meta = read_config(path)
    alpha, rslora = float(meta.get("lora_alpha", 8)), bool(meta.get("use_rslora", False))
    deltas: dict[str, np.ndarray] = {}
    for (layer, name), (a, b) in sorted(read_pairs(path, cfg).items()):
        w = params["layers"][name]
        din, dout = w.shape[1:]
        r = a.shape[0]
        if a.shape != (r, din) or b.shape != (dout, r):
            raise AdapterMismatchError(f"{path}: layer {layer} {name}: lora_A {a.shape} / lora_B {b.shape} do not fit "
                                       f"the model's projection [{dout}, {din}] (another base model?)")
        scale = alpha / (np.sqrt(r) if rslora else r)
        d = deltas.setdefault(name, np.zeros(w.shape, np.float32))
        d[layer] += scale * (a.T @ b.T)
    layers = dict(params["layers"])
    for name, d in deltas.items():
        layers[name] = (layers[name].astype(jnp.float32) + jnp.asarray(d)).astype(layers[name].dtype)
    return {**params, "layers": layers}
