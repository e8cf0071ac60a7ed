"""rcllm-jax: beyond-prefix KV caching for LLM-based generative recommendation, in JAX."""

__version__ = "0.1.0"
