"""Checkpoint loaders: GGUF files (any tensor type the `gguf` package dequantizes) and HF
directories (config.json + safetensors, single or sharded). Both give the same parameter pytree."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from rcllm_jax.model.config import (SUPPORTED_ARCHS, ModelConfig, RopeScaling, UnsupportedModelError,
                                    sliding_pattern)
from rcllm_jax.model.decoder import Params, params_from_numpy
from rcllm_jax.model.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    source: str
    load_seconds: float


def load_model(path: str | Path | None = None, dtype: str = "float32", with_tokenizer: bool = True,
               adapter: str | Path | None = None, random_weights: bool = False) -> LoadedModel:
    """Load a GGUF file or a HF model directory; None means the default model (fetched on first use).
    adapter: a LoRA adapter directory merged into the weights: a Hugging Face PEFT adapter
    (`peft_adapter`), or one of launch/train.py's, refused unless it was trained on exactly these
    weights. random_weights: the model's config and tokenizer with seeded random weights (timing
    on a machine that cannot fetch the weights: a HF directory needs only config.json and the
    tokenizer files, `export.save_hf_meta`); its rankings mean nothing."""
    t0 = time.perf_counter()
    if path is None:
        from rcllm_jax.downloads import default_model_path
        path = default_model_path()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if random_weights and adapter is not None:
        raise ValueError("an adapter cannot be merged into random weights")
    if path.is_dir() and random_weights:
        import jax
        from rcllm_jax.model.decoder import init_params
        cfg = _hf_dir_config(path, dtype)
        params = init_params(cfg, jax.random.key(0))
        tok = Tokenizer.from_hf_dir(path) if with_tokenizer else None
    elif path.is_dir():
        cfg, params = load_hf_dir(path, dtype)
        tok = Tokenizer.from_hf_dir(path) if with_tokenizer else None
    elif path.suffix == ".gguf":
        import gguf
        reader = gguf.GGUFReader(str(path))
        cfg, params = load_gguf(reader, dtype)
        if random_weights:
            import jax
            from rcllm_jax.model.decoder import init_params
            params = init_params(cfg, jax.random.key(0))
        tok = Tokenizer.from_gguf(reader) if with_tokenizer else None
    else:
        raise ValueError(f"{path}: expected a .gguf file or a HF model directory")
    source = str(path) + (" (random weights)" if random_weights else "")
    if adapter is not None:
        from rcllm_jax.model.peft_adapter import is_peft_adapter, merge_peft_adapter
        if is_peft_adapter(adapter):  # a Hugging Face PEFT LoRA (adapter_model.safetensors)
            params = merge_peft_adapter(params, cfg, adapter)
        else:  # this project's own (launch/train.py), bound to the base weights' fingerprint
            from rcllm_jax.cache.keys import model_fingerprint
            from rcllm_jax.model.lora import apply_adapter
            params = apply_adapter(params, cfg, adapter, model_fingerprint(params, cfg))
        source = f"{path} + adapter {adapter}"
    dt = time.perf_counter() - t0
    logging.info("loaded %s (%s, %d layers, %s) in %.2fs", path, cfg.arch, cfg.num_layers, dtype, dt)
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, source=source, load_seconds=dt)


# --- GGUF -----------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_mlp_norm",  # Gemma 3
}


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate_half halves)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_PERMUTED = ("llama", "mistral")  # llama.cpp permutes these families' Q/K rows (interleaved RoPE pairs)


def _gguf_config(reader, dtype: str, rope_freqs: np.ndarray | None) -> ModelConfig:
    def get(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    n = int(get(f"{arch}.attention.head_count"))
    d = int(get(f"{arch}.embedding_length"))
    head_dim = int(get(f"{arch}.attention.key_length", get(f"{arch}.rope.dimension_count", d // n)))
    if int(get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    scaling_type = get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", factor=float(get(f"{arch}.rope.scaling.factor", 1.0)))
    elif scaling_type in ("none", None):
        scaling = RopeScaling()
    else:
        raise UnsupportedModelError(f"unsupported GGUF rope scaling {scaling_type!r}")
    tokens = get("tokenizer.ggml.tokens")
    vocab = int(get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    window = get(f"{arch}.attention.sliding_window")
    layers = int(get(f"{arch}.block_count"))
    theta = float(get(f"{arch}.rope.freq_base", 10000.0))
    gemma = {}
    if arch == "gemma3":  # what llama.cpp assumes for Gemma 3 (not in the file): every 6th layer
        # global, sliding layers at RoPE base 10000 unscaled, scores scaled by 1/sqrt(head_dim)
        # (by 1/sqrt(D / N) for the 62-layer 27B); norms are stored as 1 + w already
        gemma = sliding_pattern([(i + 1) % 6 != 0 for i in range(layers)], int(window) if window else None,
                                theta, 10000.0)
        window, theta = gemma.pop("sliding_window"), gemma.pop("rope_theta")
        gemma.update(embed_scale=True, sandwich_norm=True, hidden_act="gelu_tanh",
                     query_scale=float(d // n if layers == 62 else head_dim))
    return ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=d,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_layers=layers, num_heads=n,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", n)), head_dim=head_dim,
        rms_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta, rope_scaling=scaling,
        rope_freq_factors=None if rope_freqs is None else tuple(float(x) for x in rope_freqs),
        max_position=int(get(f"{arch}.context_length", 4096)),
        tie_embeddings=False,  # decided below from the presence of output.weight
        qkv_bias=False, qk_norm=arch in ("qwen3", "gemma3"), sliding_window=int(window) if window else None,
        dtype=dtype, **gemma)


def _dequantize(t) -> np.ndarray:
    from gguf import quants
    try:
        return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError as e:
        raise UnsupportedModelError(
            f"tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package cannot dequantize") from e


def load_gguf(reader, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = _dequantize(by_name["rope_freqs.weight"]) if "rope_freqs.weight" in by_name else None
    cfg = _gguf_config(reader, dtype, rope_freqs)
    tensors: dict[str, np.ndarray] = {}
    for name, t in by_name.items():
        if name == "rope_freqs.weight":
            continue
        w = _dequantize(t)  # numpy layout [out, in] (ggml dims reversed)
        if name == "token_embd.weight":
            tensors["embed"] = w
        elif name == "output_norm.weight":
            tensors["final_norm"] = w
        elif name == "output.weight":
            tensors["lm_head"] = w.T
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise UnsupportedModelError(f"unexpected GGUF tensor {name!r} for architecture {cfg.arch}")
            ours = _GGUF_LAYER_NAMES[rest]
            if cfg.arch in _GGUF_PERMUTED and ours in ("wq", "bq", "wk", "bk"):
                w = _unpermute_rope_rows(w, cfg.num_heads if ours in ("wq", "bq") else cfg.num_kv_heads)
            tensors[f"layers.{idx}.{ours}"] = w.T if w.ndim == 2 else w
        else:
            raise UnsupportedModelError(f"unexpected GGUF tensor {name!r}")
    cfg = cfg.replace(tie_embeddings="lm_head" not in tensors,
                      qkv_bias="layers.0.bq" in tensors,
                      vocab_size=tensors["embed"].shape[0])
    return cfg, params_from_numpy(tensors, cfg)


# --- Hugging Face directories ------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
}
# Gemma 3 names its norms after where they sit: a norm after attention and one each side of the MLP
_HF_GEMMA_NAMES = dict(_HF_LAYER_NAMES, **{
    "post_attention_layernorm.weight": "post_attn_norm", "pre_feedforward_layernorm.weight": "mlp_norm",
    "post_feedforward_layernorm.weight": "post_mlp_norm"})
# Where a multimodal Gemma 3 (Gemma3ForConditionalGeneration) keeps its language model's tensors
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: shards named in the index are missing: {missing}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")


def _hf_dir_config(path: Path, dtype: str) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    hf = json.loads(cfg_file.read_text())
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # multimodal: its language model only
        hf = dict(hf["text_config"], model_type="gemma3_text")
    return ModelConfig.from_hf_config(hf, dtype=dtype)


def load_hf_dir(path: Path, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    from safetensors import safe_open
    cfg = _hf_dir_config(path, dtype)
    layer_names = _HF_GEMMA_NAMES if cfg.arch == "gemma3" else _HF_LAYER_NAMES
    tensors: dict[str, np.ndarray] = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="flax") as sf:
            for stored in sf.keys():
                if stored.startswith(_VISION_PREFIXES):
                    continue
                name = next((new + stored[len(old):] for old, new in _TEXT_PREFIXES.items()
                             if stored.startswith(old)), stored)
                w = np.asarray(sf.get_tensor(stored).astype("float32"))
                if name == "model.embed_tokens.weight":
                    tensors["embed"] = w
                elif name == "model.norm.weight":
                    tensors["final_norm"] = w
                elif name == "lm_head.weight":
                    tensors["lm_head"] = w.T
                elif name.startswith("model.layers."):
                    idx, rest = name[len("model.layers."):].split(".", 1)
                    if rest.endswith("rotary_emb.inv_freq"):
                        continue
                    if rest not in layer_names:
                        raise UnsupportedModelError(f"unexpected tensor {stored!r} for {cfg.arch}")
                    tensors[f"layers.{idx}.{layer_names[rest]}"] = w.T if w.ndim == 2 else w
                else:
                    raise UnsupportedModelError(f"unexpected tensor {stored!r}")
    if cfg.arch == "gemma3":  # Gemma's norms multiply by 1 + w: stored here as the factor itself
        tensors = {n: w + np.float32(1.0) if n == "final_norm" or n.endswith("norm") else w for n, w in tensors.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head", None)
    return cfg, params_from_numpy(tensors, cfg)
