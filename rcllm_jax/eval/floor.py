"""The floor of a prefill: FLOPs of the tokens that must be computed and bytes of KV that must be
read, and this machine's measured matmul peak and memory bandwidth to turn them into seconds."""

from __future__ import annotations

import time

from rcllm_jax.model.config import ModelConfig


def linear_flops_per_token(cfg: ModelConfig) -> float:
    d, f = cfg.hidden_size, cfg.intermediate_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return 2 * cfg.num_layers * (d * (nh + 2 * kh) + nh * d + 3 * d * f)


def prefill_flops(cfg: ModelConfig, t: int) -> float:
    """Matmul FLOPs of a causal prefill of t tokens, logits for the last token only."""
    attn = 2 * 2 * cfg.num_heads * cfg.head_dim * t * (t + 1) / 2 * cfg.num_layers
    return linear_flops_per_token(cfg) * t + attn + 2 * cfg.hidden_size * cfg.vocab_size


def selective_flops(cfg: ModelConfig, computed_tokens: float, prompt_tokens: int) -> float:
    """FLOPs when `computed_tokens` (layer-averaged) queries attend over about half the prompt."""
    attn = 2 * 2 * cfg.num_heads * cfg.head_dim * computed_tokens * prompt_tokens / 2 * cfg.num_layers
    return linear_flops_per_token(cfg) * computed_tokens + attn + 2 * cfg.hidden_size * cfg.vocab_size


def _best(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Best observed f32 matmul rate of this machine (FLOP/s)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / _best(lambda: f(a).block_until_ready(), reps)


def memory_bandwidth(mbytes: int = 512, reps: int = 5) -> float:
    """Best observed read bandwidth of a large reduction (bytes/s)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((mbytes * (1 << 20) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return a.nbytes / _best(lambda: f(a).block_until_ready(), reps)


def weight_bytes(cfg: ModelConfig, itemsize: int = 4, vocab_rows: int | None = None) -> int:
    """Bytes of weights one forward pass must read: every layer, and `vocab_rows` rows of the
    output projection (all V when None). At a few query rows this, not FLOPs, is the floor."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * (nh + 2 * kh) + nh * d + 3 * d * f + 2 * d
    rows = cfg.vocab_size if vocab_rows is None else vocab_rows
    return itemsize * (cfg.num_layers * per_layer + rows * d)


def prompt_weight_bytes(cfg: ModelConfig, prompt, itemsize: int = 4) -> int:
    """Weights a ranking request of `prompt` must read: one pass reading only the label rows of
    the output projection (score-slot head, or single-token labels), else two passes over the
    whole projection (multi-token labels are scored by a second pass)."""
    single = prompt.head == "slot" or prompt.single_token_labels
    return weight_bytes(cfg, itemsize, len(prompt.labels) if single else None) * (1 if single else 2)


def request_floor_s(cfg: ModelConfig, computed_tokens: float, prompt_tokens: int, read_bytes: float, peak: float,
                    bandwidth: float) -> float:
    """The floor of one request, the one definition every launcher reports against: compute and
    memory traffic overlapped perfectly, the larger of the FLOPs of the computed tokens
    (`selective_flops`) at the measured matmul peak and the bytes that must be read (cached KV
    rows + weights) at the measured bandwidth."""
    return max(selective_flops(cfg, computed_tokens, prompt_tokens) / peak, read_bytes / bandwidth)
