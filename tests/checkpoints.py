"""Tiny random checkpoints written by the tests themselves: HF directories (by transformers) and
GGUF files (llama.cpp conventions: Q/K rows permuted for `llama`, [out, in] tensors, quantized by
the gguf package or, for K-quants it cannot write, random blocks with sane f16 scales)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def hf_model(arch: str, *, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=160,
             tie=False, rope=None, seed=0, sliding_window=None, head_dim=None, layer_types=None,
             query_scale=None):
    """A random transformers model of the given family (float32, eval mode)."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                  rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common, use_sliding_window=False), tf.Qwen2ForCausalLM
    elif arch == "qwen3":  # q/k RMS norms; head_dim need not be hidden / heads
        cfg, cls = tf.Qwen3Config(**common, head_dim=head_dim or hidden // heads, use_sliding_window=False), \
            tf.Qwen3ForCausalLM
    elif arch == "gemma3":  # GeGLU, sandwich norms, sliding/global layers with two RoPE bases
        common["rope_parameters"] = {"full_attention": rope or {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        cfg = tf.Gemma3TextConfig(**common, head_dim=head_dim or hidden // heads, sliding_window=sliding_window or 8,
                                  layer_types=layer_types, query_pre_attn_scalar=query_scale or 24)
        cls = tf.Gemma3ForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=sliding_window), tf.MistralForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so that the logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms multiply by 1 + w
                p.copy_((0.0 if arch == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_hf(model, path: Path, shard_size: str | None = None) -> Path:
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf: HF rotate_half row order -> interleaved pairs.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# byte offsets of the f16 scale fields (d, dmin) inside one 256-element K-quant block
_K_BLOCK = {"Q2_K": (84, [80, 82]), "Q3_K": (110, [108]), "Q4_K": (144, [0, 2]),
            "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}


def _encode(w: np.ndarray, qtype: str, rng) -> tuple[np.ndarray, object]:
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in _K_BLOCK:
        rows, cols = w.shape
        nbytes, scale_at = _K_BLOCK[qtype]
        blocks = rng.integers(0, 256, size=(rows, cols // 256, nbytes), dtype=np.uint8)
        for off in scale_at:
            d = rng.uniform(2e-4, 6e-4, size=(rows, cols // 256)).astype(np.float16)
            blocks[..., off:off + 2] = d.view(np.uint8).reshape(rows, cols // 256, 2)
        return blocks.reshape(rows, -1), t
    if qtype == "F32":
        return w.astype(np.float32), t
    if qtype == "F16":
        return w.astype(np.float16), t
    return gguf.quants.quantize(w.astype(np.float32), t), t


def save_gguf(model, path: Path, qtype: str = "F32", *, arch: str | None = None, seed: int = 0) -> Path:
    """Write `model` as a GGUF file; 2-D weights (except norms) in `qtype`."""
    import gguf
    cfg = model.config
    arch = arch or cfg.model_type
    gg_arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(arch, arch)
    gemma = gg_arch == "gemma3"  # llama.cpp's Gemma 3: norms stored as 1 + w, a window in the metadata
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), gg_arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if gemma:
        w.add_sliding_window(cfg.sliding_window)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(0)
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight"}
    if gemma:
        names.update({"post_attention_layernorm.weight": "post_attention_norm.weight",
                      "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                      "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            idx, rest = k[len("model.layers."):].split(".", 1)
            name = f"blk.{idx}.{names[rest]}"
            if gg_arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads
                v = _permute(v, heads)
        if gemma and "norm" in name:
            v = v + 1.0
        if v.ndim == 2 and "norm" not in name:
            data, t = _encode(v, qtype, rng)
            w.add_tensor(name, data, raw_dtype=t)
        else:
            w.add_tensor(name, v.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
