"""Model configuration: one frozen dataclass read from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# ModelConfig fields added after the first fingerprints were shipped (`identity_text`)
_LATER_FIELDS = ("qk_norm",)


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
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

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
        if model_type not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={c.get('architectures')}); supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {c.get('hidden_act')!r}; only silu")
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older files
        # write `rope_theta` + `rope_scaling`.
        rp = dict(c.get("rope_parameters") or {})
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
        window = c.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
            window = None
        return cls(
            arch=model_type,
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=n,
            num_kv_heads=int(c.get("num_key_value_heads") or n),
            head_dim=int(c.get("head_dim") or hidden // n),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=int(c.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2") or bool(c.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window else None,
            dtype=dtype,
        )


def kv_bytes_per_token(cfg: ModelConfig, dtype="float32") -> int:
    """Bytes of one token's K and V over all layers, stored as `dtype` (int8: with an f32 scale per
    token, layer and KV head for each of K and V, `rcllm_jax.cache.quant`)."""
    import numpy as np
    scales = 2 * cfg.num_layers * cfg.num_kv_heads * 4 if np.dtype(dtype) == np.int8 else 0
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize + scales
