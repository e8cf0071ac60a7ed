"""Model configuration: one frozen dataclass read from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}  # HF model_type -> arch, where they differ
ACTIVATIONS = ("silu", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# ModelConfig fields added after the first fingerprints were shipped (`identity_text`)
_LATER_FIELDS = ("qk_norm", "embed_scale", "hidden_act", "sandwich_norm", "query_scale", "sliding_layers",
                 "local_rope_theta")


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture, tensor type or option this engine does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder. Hashable: used as a static jit argument."""

    arch: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    # Per-frequency divisors written by llama.cpp as the `rope_freqs` tensor (llama3-style scaling).
    rope_freq_factors: tuple[float, ...] | None = None
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMS norm over each head's query and key (weights [H]) before RoPE
    sliding_window: int | None = None
    dtype: str = "float32"
    # Gemma 3: embeddings times sqrt(D); GeGLU (tanh-approximate gelu); a norm after attention and
    # after the MLP too ("sandwich"); scores scaled by query_scale ** -0.5 (query_pre_attn_scalar)
    # instead of head_dim ** -0.5; `sliding_window` only on the layers marked in `sliding_layers`
    # (the others attend globally), those with RoPE base `local_rope_theta` and no RoPE scaling.
    # Norm weights are stored as the factor they multiply by (Gemma's 1 + w, added at load).
    embed_scale: bool = False
    hidden_act: str = "silu"
    sandwich_norm: bool = False
    query_scale: float | None = None
    sliding_layers: tuple[bool, ...] | None = None  # None: `sliding_window` (if any) on every layer
    local_rope_theta: float | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling type {self.rope_scaling.rope_type!r}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported activation {self.hidden_act!r}; "
                                        f"supported: {', '.join(ACTIVATIONS)}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers names {len(self.sliding_layers)} layers, the model has {self.num_layers}")
        if self.sliding_layers is not None and self.sliding_window is None:
            raise ValueError("sliding_layers without a sliding_window")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        """What attention scores are multiplied by."""
        return (self.query_scale or self.head_dim) ** -0.5

    @property
    def mixed_layers(self) -> bool:
        """Do layers differ in window or RoPE base (Gemma 3's sliding / global pattern)? Such a
        model's per-layer masks and RoPE tables go through the layer loops (`decoder.layer_mask`,
        `rope.layer_inv`)."""
        return self.sliding_layers is not None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def identity_text(self) -> str:
        """The configuration as the model fingerprint hashes it: the dataclass repr, with fields
        added after fingerprints were first shipped left out while at their defaults, so a model's
        fingerprint (and the heads, adapters and caches bound to it) does not change with the code."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if not (f.name in _LATER_FIELDS and getattr(self, f.name) == f.default)]
        return f"{type(self).__name__}({', '.join(parts)})"

    @classmethod
    def from_hf_config(cls, c: Mapping[str, Any], dtype: str = "float32") -> "ModelConfig":
        model_type = c.get("model_type")
        arch = HF_MODEL_TYPES.get(model_type, model_type)
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={c.get('architectures')}); supported: {', '.join(SUPPORTED_ARCHS)}")
        act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
        act = {"gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported activation {act!r} (hidden_act); supported: silu, "
                                        "gelu_pytorch_tanh")
        for softcap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if c.get(softcap) is not None:
                raise UnsupportedModelError(f"{softcap}={c[softcap]} (Gemma 2's soft-capping) is not implemented")
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside; Gemma 3: one entry per
        # layer type); older files write `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`).
        rp = dict(c.get("rope_parameters") or {})
        per_type = rp if "full_attention" in rp or "sliding_attention" in rp else None
        if per_type is not None:
            rp = dict(per_type.get("full_attention") or {})
        rs = dict(c.get("rope_scaling") or {}) or rp
        theta = float(c.get("rope_theta", rp.get("rope_theta", 10000.0)))
        rope_type = rs.get("rope_type", rs.get("type", "default")) or "default"
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        )
        n = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        window = c.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
            window = None
        gemma = dict(sliding_layers=None, local_rope_theta=None)
        if arch == "gemma3":
            local = dict((per_type or {}).get("sliding_attention") or {})
            if local.get("rope_type", "default") not in ("default", None):
                raise UnsupportedModelError(f"RoPE scaling {local['rope_type']!r} on sliding layers is not implemented")
            gemma = sliding_pattern(_layer_types(c, layers), int(window) if window else None, theta,
                                    float(local.get("rope_theta", c.get("rope_local_base_freq", 10000.0))))
            window = gemma.pop("sliding_window")
            theta = gemma.pop("rope_theta")
            if window is not None and gemma["sliding_layers"] is None:
                scaling = RopeScaling()  # every layer slides: the local base, unscaled
            gemma.update(embed_scale=True, sandwich_norm=True, query_scale=float(c.get("query_pre_attn_scalar", 256)))
        return cls(
            arch=arch,
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=layers,
            num_heads=n,
            num_kv_heads=int(c.get("num_key_value_heads") or n),
            head_dim=int(c.get("head_dim") or hidden // n),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=int(c.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(c.get("tie_word_embeddings", arch == "gemma3")),
            qkv_bias=(model_type == "qwen2") or bool(c.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "gemma3"),
            sliding_window=int(window) if window else None,
            hidden_act=act,
            dtype=dtype,
            **gemma,
        )


def _layer_types(c: Mapping[str, Any], layers: int) -> list[bool]:
    """Which layers of a Gemma 3 config slide (`layer_types`, else every `sliding_window_pattern`-th
    layer global, as transformers fills it in)."""
    types = c.get("layer_types")
    if types is None:
        every = int(c.get("sliding_window_pattern", 6))
        return [(i + 1) % every != 0 for i in range(layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise UnsupportedModelError(f"layer_types {unknown or types} (expected {layers} of sliding_attention / "
                                    "full_attention)")
    return [t == "sliding_attention" for t in types]


def sliding_pattern(sliding: list[bool], window: int | None, global_theta: float, local_theta: float) -> dict:
    """ModelConfig fields of a sliding / global layer pattern: per-layer fields only when the layers
    really differ (all sliding: one window and the local RoPE base everywhere; none: no window)."""
    if window is None or not any(sliding):
        return dict(sliding_window=None, rope_theta=global_theta, sliding_layers=None, local_rope_theta=None)
    if all(sliding):
        return dict(sliding_window=window, rope_theta=local_theta, sliding_layers=None, local_rope_theta=None)
    return dict(sliding_window=window, rope_theta=global_theta, sliding_layers=tuple(sliding),
                local_rope_theta=local_theta)


def kv_bytes_per_token(cfg: ModelConfig, dtype="float32") -> int:
    """Bytes of one token's K and V over all layers, stored as `dtype` (int8: with an f32 scale per
    token, layer and KV head for each of K and V, `rcllm_jax.cache.quant`)."""
    import numpy as np
    scales = 2 * cfg.num_layers * cfg.num_kv_heads * 4 if np.dtype(dtype) == np.int8 else 0
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize + scales


# Real dimensions of 8B-class models (HF config fields), for memory plans and shape tests with random
# weights: `shape_preset(name, layers=...)`.
SHAPE_PRESETS = {
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen3-8b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960},
}


def shape_preset(name: str, layers: int | None = None, dtype: str = "float32") -> ModelConfig:
    """A `SHAPE_PRESETS` model's config, optionally with fewer layers (every other dimension real)."""
    if name not in SHAPE_PRESETS:
        raise ValueError(f"unknown shape preset {name!r}; presets: {', '.join(SHAPE_PRESETS)}")
    hf = dict(SHAPE_PRESETS[name])
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return ModelConfig.from_hf_config(hf, dtype=dtype)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by how tensor parallelism splits them: `heads` (query/output projections, split by
    query head), `kv_heads` (key/value projections, split by KV head), `mlp` (split along the
    intermediate dim), `vocab` (embedding and LM head, split along the vocabulary), `replicated`
    (norms)."""
    d, h, l = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    heads = l * 2 * d * cfg.num_heads * h + (l * cfg.num_heads * h if cfg.qkv_bias else 0)
    kv = l * 2 * d * cfg.num_kv_heads * h + (l * 2 * cfg.num_kv_heads * h if cfg.qkv_bias else 0)
    norms = l * (4 if cfg.sandwich_norm else 2) * d + d + (l * 2 * h if cfg.qk_norm else 0)
    return {"heads": heads, "kv_heads": kv, "mlp": l * 3 * d * cfg.intermediate_size,
            "vocab": cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2), "replicated": norms}
