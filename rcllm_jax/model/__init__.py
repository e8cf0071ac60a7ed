"""Llama-family decoder, its loaders and tokenizer."""

from rcllm_jax.model.config import ModelConfig, UnsupportedModelError
from rcllm_jax.model.decoder import KVCache, attention_mask, forward, init_params
from rcllm_jax.model.loaders import LoadedModel, load_model

__all__ = [
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "UnsupportedModelError",
    "attention_mask",
    "forward",
    "init_params",
    "load_model",
]
