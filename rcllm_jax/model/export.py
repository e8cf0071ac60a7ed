"""Write a parameter pytree as a Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that `load_model` and `transformers` both read."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from rcllm_jax.model.config import ModelConfig, UnsupportedModelError
from rcllm_jax.model.decoder import Params
from rcllm_jax.model.tokenizer import Tokenizer

_HF_NAMES = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
             "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
             "k_norm": "self_attn.k_norm.weight"}
_GEMMA_NAMES = dict(_HF_NAMES, mlp_norm="pre_feedforward_layernorm.weight",
                    post_attn_norm="post_attention_layernorm.weight",
                    post_mlp_norm="post_feedforward_layernorm.weight")
_ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPE = {"gemma3": "gemma3_text"}


def hf_config(cfg: ModelConfig) -> dict:
    if cfg.rope_freq_factors is not None:
        raise UnsupportedModelError("per-frequency rope factors (GGUF rope_freqs) have no HF config form")
    c = {"architectures": [_ARCH_CLASS[cfg.arch]], "model_type": _MODEL_TYPE.get(cfg.arch, cfg.arch),
         "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
         "max_position_embeddings": cfg.max_position, "tie_word_embeddings": cfg.tie_embeddings,
         "torch_dtype": "float32"}
    rs = cfg.rope_scaling
    if rs.rope_type != "default":
        c["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor}
        if rs.rope_type == "llama3":
            c["rope_scaling"].update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                                     original_max_position_embeddings=rs.original_max_position)
    if cfg.arch in ("llama", "qwen3"):
        c["attention_bias"] = cfg.qkv_bias
    if cfg.sliding_window is not None:
        c["sliding_window"] = cfg.sliding_window
        if cfg.arch in ("qwen2", "qwen3"):
            c["use_sliding_window"] = True
    if cfg.arch == "gemma3":
        c.update(_gemma_config(cfg, c.pop("rope_theta"), c.pop("rope_scaling", None)))
    return c


def _gemma_config(cfg: ModelConfig, theta: float, scaling: dict | None) -> dict:
    """Gemma 3's own fields: the layer pattern with one RoPE entry per layer type."""
    sliding = cfg.sliding_layers or (cfg.sliding_window is not None,) * cfg.num_layers
    local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or theta}
    scale = cfg.query_scale or cfg.head_dim
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(scale) if float(scale).is_integer() else scale,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "sliding_window": cfg.sliding_window or cfg.max_position,
            "rope_parameters": {"full_attention": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
                                "sliding_attention": local},
            "attn_logit_softcapping": None, "final_logit_softcapping": None}


def save_hf_meta(path: str | Path, cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> Path:
    """config.json and the tokenizer files of a HF directory, without weights: what
    `load_model(..., random_weights=True)` needs to run a model's shapes elsewhere."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    if tokenizer is not None:
        tokenizer.tok.save(str(path / "tokenizer.json"))
        tc = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              "chat_template": tokenizer.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
        (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    return path


def save_hf_dir(path: str | Path, params: Params, cfg: ModelConfig, tokenizer: Tokenizer | None = None,
                extra_meta: dict | None = None):
    """Write atomically: into a temp dir beside `path`, renamed into place (an existing `path` is
    replaced only once the new one is complete)."""
    from safetensors.numpy import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        gemma = cfg.arch == "gemma3"  # Gemma's norms multiply by 1 + w (stored here as the factor)
        shift = np.float32(1.0 if gemma else 0.0)
        names = _GEMMA_NAMES if gemma else _HF_NAMES
        t = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
             "model.norm.weight": np.asarray(params["final_norm"], np.float32) - shift}
        if not cfg.tie_embeddings:
            t["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
        for name, stacked in params["layers"].items():
            arr = np.asarray(stacked, np.float32) - (shift if name.endswith("norm") else 0)
            for i in range(cfg.num_layers):
                w = arr[i].T if arr[i].ndim == 2 else arr[i]
                t[f"model.layers.{i}.{names[name]}"] = np.ascontiguousarray(w)
        save_file(t, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_hf_meta(tmp, cfg, tokenizer)
        if extra_meta:
            (tmp / "rcllm_meta.json").write_text(json.dumps(extra_meta, indent=1))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
