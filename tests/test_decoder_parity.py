"""Our decoder vs Hugging Face transformers on tiny random checkpoints the tests write themselves."""

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import ROPE_LLAMA3, hf_model, save_gguf, save_hf
from conftest import rel_err, require
from rcllm_jax.model import load_model
from rcllm_jax.model.decoder import forward

torch = require("torch")
require("transformers")

TOL = 1e-4  # max relative error in float32


def hf_logits(model, tokens, positions=None):
    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": torch.as_tensor(positions)}
        return model(torch.as_tensor(tokens), **kw).logits.float().numpy()


def ours(m, tokens, positions=None, **kw):
    tokens = jnp.asarray(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, kv = forward(m.params, tokens, jnp.asarray(positions), cfg=m.cfg, all_logits=True, **kw)
    return np.asarray(logits), kv


def random_tokens(vocab, b=2, t=24, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t))


FAMILIES = {
    "llama_llama3rope_gqa_untied": dict(arch="llama", rope=ROPE_LLAMA3, tie=False),
    "qwen2_bias_tied": dict(arch="qwen2", tie=True, kv_heads=1),
    "mistral_mha": dict(arch="mistral", kv_heads=4),
    "qwen3_qknorm_wide_heads": dict(arch="qwen3", head_dim=32),  # head_dim 32 != hidden 64 / 4 heads
    # sliding (window 8, RoPE base 1e4) and global (1e6, linear x4) layers, GeGLU, sandwich norms
    "gemma3_sliding_global_scaled_rope": dict(
        arch="gemma3", layers=4, tie=True, rope={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_dir_logits_match_transformers(tmp_path, family):
    model = hf_model(**FAMILIES[family])
    m = load_model(save_hf(model, tmp_path / family), with_tokenizer=False)
    toks = random_tokens(m.cfg.vocab_size)
    got, _ = ours(m, toks)
    assert rel_err(got, hf_logits(model, toks)) <= TOL


def test_sharded_hf_dir_loads_all_shards(tmp_path):
    model = hf_model("llama", layers=3)
    path = save_hf(model, tmp_path / "sharded", shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    m = load_model(path, with_tokenizer=False)
    toks = random_tokens(m.cfg.vocab_size)
    assert rel_err(ours(m, toks)[0], hf_logits(model, toks)) <= TOL


def test_non_contiguous_positions(tmp_path):
    model = hf_model("llama", rope=ROPE_LLAMA3)
    m = load_model(save_hf(model, tmp_path / "m"), with_tokenizer=False)
    toks = random_tokens(m.cfg.vocab_size, t=20)
    gaps = np.random.default_rng(3).integers(1, 40, size=(2, 20))
    positions = np.cumsum(gaps, axis=1) + 5  # strictly increasing, far from 0..T-1
    got, _ = ours(m, toks, positions)
    assert rel_err(got, hf_logits(model, toks, positions)) <= TOL


def test_continue_from_kv_input(tmp_path):
    model = hf_model("qwen2")
    m = load_model(save_hf(model, tmp_path / "m"), with_tokenizer=False)
    toks = random_tokens(m.cfg.vocab_size, t=30)
    ref = hf_logits(model, toks)
    pos = np.broadcast_to(np.arange(30), (2, 30))
    _, kv = ours(m, toks[:, :17], pos[:, :17])
    got, _ = ours(m, toks[:, 17:], pos[:, 17:], cache=kv)
    assert rel_err(got, ref[:, 17:]) <= TOL


def test_padding_is_never_attended(tmp_path):
    """Right-padded rows with garbage tokens give the same logits on their valid part."""
    model = hf_model("llama")
    m = load_model(save_hf(model, tmp_path / "m"), with_tokenizer=False)
    toks = random_tokens(m.cfg.vocab_size, b=1, t=12)
    padded = np.concatenate([toks, random_tokens(m.cfg.vocab_size, b=1, t=4, seed=9)], axis=1)
    valid = np.arange(16)[None] < 12
    got, _ = ours(m, padded, valid=jnp.asarray(valid))
    assert rel_err(got[:, :12], hf_logits(model, toks)) <= TOL


def test_mistral_sliding_window(tmp_path):
    model = hf_model("mistral", sliding_window=8)
    m = load_model(save_hf(model, tmp_path / "m"), with_tokenizer=False)
    assert m.cfg.sliding_window == 8
    toks = random_tokens(m.cfg.vocab_size, t=24)
    assert rel_err(ours(m, toks)[0], hf_logits(model, toks)) <= TOL


def test_segments_give_independent_blocks(tmp_path):
    """A block in its own segment sees only SHARED keys and itself: its logits equal those of the
    block run directly after the shared prefix at the same positions (transformers as reference)."""
    from rcllm_jax.model.decoder import SEG_SHARED
    model = hf_model("llama")
    m = load_model(save_hf(model, tmp_path / "m"), with_tokenizer=False)
    rng = np.random.default_rng(5)
    prefix, a, b = (rng.integers(0, m.cfg.vocab_size, size=(1, n)) for n in (6, 5, 7))
    toks = np.concatenate([prefix, a, b], axis=1)
    segs = np.array([[SEG_SHARED] * 6 + [1] * 5 + [2] * 7])
    got, _ = ours(m, toks, segments=jnp.asarray(segs))
    # block b as if a were absent: positions 11..17 right after the prefix (a gap of 5)
    alone = np.concatenate([prefix, b], axis=1)
    ref = hf_logits(model, alone, np.concatenate([np.arange(6), np.arange(11, 18)])[None])
    assert rel_err(got[:, 11:], ref[:, 6:]) <= TOL
    assert rel_err(got[:, :11], hf_logits(model, toks[:, :11])) <= TOL


GGUF_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_logits_match_transformers(tmp_path, qtype):
    """Same GGUF file, two independent loaders and dequantizers (ours via gguf, transformers' own)."""
    import transformers as tf
    k_quant = qtype.endswith("_K")
    model = hf_model("llama", hidden=256 if k_quant else 64, intermediate=512 if k_quant else 128, heads=4)
    path = save_gguf(model, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ref_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    m = load_model(path, with_tokenizer=False)
    toks = random_tokens(m.cfg.vocab_size)
    assert rel_err(ours(m, toks)[0], hf_logits(ref_model, toks)) <= TOL


def test_gguf_qwen2_with_bias_matches_transformers(tmp_path):
    import transformers as tf
    model = hf_model("qwen2", tie=True)
    path = save_gguf(model, tmp_path / "qwen.gguf", "Q8_0")
    ref_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    m = load_model(path, with_tokenizer=False)
    assert m.cfg.qkv_bias and m.cfg.tie_embeddings
    toks = random_tokens(m.cfg.vocab_size)
    assert rel_err(ours(m, toks)[0], hf_logits(ref_model, toks)) <= TOL


def test_gguf_qwen3_matches_transformers(tmp_path):
    """A Qwen3 GGUF as llama.cpp writes it (q/k norm tensors, no Q/K row permutation). head_dim 128:
    transformers' GGUF reader ignores attention.key_length and takes Qwen3's default 128."""
    import transformers as tf
    model = hf_model("qwen3", hidden=256, heads=2, kv_heads=1, head_dim=128)
    path = save_gguf(model, tmp_path / "qwen3.gguf", "Q8_0")
    ref_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    m = load_model(path, with_tokenizer=False)
    assert m.cfg.arch == "qwen3" and m.cfg.qk_norm and m.cfg.head_dim == 128 and not m.cfg.qkv_bias
    toks = random_tokens(m.cfg.vocab_size)
    assert rel_err(ours(m, toks)[0], hf_logits(ref_model, toks)) <= TOL


def test_gguf_gemma3_matches_transformers(tmp_path):
    """A Gemma 3 GGUF as llama.cpp writes it (norms as 1 + w, only the window in the metadata: every
    6th layer global, sliding layers at RoPE base 1e4, scores by 1/sqrt(head_dim)). head_dim 256:
    transformers' GGUF reader takes Gemma 3's default query_pre_attn_scalar, 256."""
    import transformers as tf
    types = ["sliding_attention"] * 5 + ["full_attention"]
    model = hf_model("gemma3", layers=6, heads=2, kv_heads=1, head_dim=256, query_scale=256, tie=True,
                     layer_types=types)
    path = save_gguf(model, tmp_path / "gemma3.gguf", "Q8_0")
    ref_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert ref_model.config.layer_types == types
    m = load_model(path, with_tokenizer=False)
    assert m.cfg.arch == "gemma3" and m.cfg.sliding_layers == (True,) * 5 + (False,) and m.cfg.query_scale == 256
    toks = random_tokens(m.cfg.vocab_size)
    assert rel_err(ours(m, toks)[0], hf_logits(ref_model, toks)) <= TOL


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration directory (4B and up): the language model's tensors under
    `model.language_model.` or `language_model.model.`, its config under text_config, the vision
    tower's tensors skipped: the same logits as the text model in transformers."""
    import json
    from safetensors.numpy import load_file, save_file
    model = hf_model("gemma3", layers=2, tie=True)
    src = save_hf(model, tmp_path / "text")
    text_cfg = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    for prefix in ("model.language_model.", "language_model.model."):
        out = tmp_path / prefix.strip(".")
        out.mkdir()
        moved = {prefix + k[len("model."):]: v for k, v in tensors.items()}
        moved["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
        save_file(moved, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_cfg,
                                                     "architectures": ["Gemma3ForConditionalGeneration"]}))
        m = load_model(out, with_tokenizer=False)
        toks = random_tokens(m.cfg.vocab_size)
        assert rel_err(ours(m, toks)[0], hf_logits(model, toks)) <= TOL


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_export_round_trips_through_transformers(tmp_path, family):
    """Our HF export of a Qwen3 / Gemma 3 model (what train.py writes as merged/) loads in
    transformers with the same logits."""
    import transformers as tf
    from rcllm_jax.model.export import save_hf_dir
    model = hf_model(**FAMILIES["gemma3_sliding_global_scaled_rope" if family == "gemma3" else
                                "qwen3_qknorm_wide_heads"])
    m = load_model(save_hf(model, tmp_path / "src"), with_tokenizer=False)
    save_hf_dir(tmp_path / "out", m.params, m.cfg)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    toks = random_tokens(m.cfg.vocab_size)
    assert rel_err(hf_logits(back, toks), hf_logits(model, toks)) <= TOL


def test_bfloat16_close_to_float32_reference(tmp_path):
    model = hf_model("llama", rope=ROPE_LLAMA3)
    m = load_model(save_hf(model, tmp_path / "m"), dtype="bfloat16", with_tokenizer=False)
    assert m.params["embed"].dtype == jnp.bfloat16
    toks = random_tokens(m.cfg.vocab_size)
    got, ref = ours(m, toks)[0], hf_logits(model, toks)
    assert rel_err(got, ref) <= 3e-2
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9
