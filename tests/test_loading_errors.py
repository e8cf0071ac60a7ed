"""Bad checkpoints and assets are refused with a message that names the problem."""

import json

import numpy as np
import pytest

from rcllm_jax.model import ModelConfig, UnsupportedModelError, load_model
from rcllm_jax.model.rope import inv_freq

BASE = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(tmp_path)


def test_unsupported_rope_scaling_is_named():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_legacy_and_v5_rope_fields_agree():
    legacy = {**BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}
    v5 = {**BASE, "rope_parameters": {**legacy["rope_scaling"], "rope_theta": 500000.0}}
    a, b = ModelConfig.from_hf_config(legacy), ModelConfig.from_hf_config(v5)
    assert a == b and a.rope_scaling.rope_type == "llama3"
    assert not np.allclose(inv_freq(a), inv_freq(a.replace(rope_scaling=type(a.rope_scaling)())))


def test_missing_weights_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_random_weights_need_only_the_config(tmp_path):
    """--random_weights: a directory with config.json alone loads the model's shapes (seeded, the
    same each time); without the flag the missing weights are named; an adapter is refused."""
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, with_tokenizer=False)
    a, b = (load_model(tmp_path, with_tokenizer=False, random_weights=True) for _ in range(2))
    assert a.cfg == ModelConfig.from_hf_config(BASE) and "random weights" in a.source
    assert a.params["layers"]["wq"].shape == (1, 16, 16) and a.params["layers"]["wk"].shape == (1, 16, 8)
    assert np.array_equal(np.asarray(a.params["embed"]), np.asarray(b.params["embed"]))
    assert float(np.std(np.asarray(a.params["embed"]))) > 0
    with pytest.raises(ValueError, match="adapter"):
        load_model(tmp_path, random_weights=True, adapter=tmp_path)


def test_not_a_model_path(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="gguf"):
        load_model(f)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.gguf")


def _gguf(path, tensor_type="F32", tokenizer_model=None, arch="llama"):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=32,
                     head_count=2, head_count_kv=1).items():
        getattr(w, f"add_{k}")(v)
    w.add_layer_norm_rms_eps(1e-5)
    if tokenizer_model:
        w.add_tokenizer_model(tokenizer_model)
        w.add_token_list(["a", "b"])
    if tensor_type == "Q8_1":  # a type gguf can store but not dequantize: 40-byte blocks of 32
        w.add_tensor("token_embd.weight", np.zeros((8, 40), np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    else:
        w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_tensor_type_that_cannot_be_dequantized(tmp_path):
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        load_model(_gguf(tmp_path / "m.gguf", "Q8_1"), with_tokenizer=False)


def test_gguf_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedModelError, match="falcon"):
        load_model(_gguf(tmp_path / "m.gguf", arch="falcon"), with_tokenizer=False)


def test_gguf_sentencepiece_tokenizer_is_refused_clearly(tmp_path):
    import gguf
    from rcllm_jax.model.tokenizer import Tokenizer
    reader = gguf.GGUFReader(str(_gguf(tmp_path / "m.gguf", tokenizer_model="llama")))
    with pytest.raises(UnsupportedModelError, match="tokenizer.json"):
        Tokenizer.from_gguf(reader)


def test_tampered_asset_is_refused_and_cache_left_alone(tmp_path, monkeypatch):
    from rcllm_jax import downloads
    monkeypatch.setenv("RCLLM_JAX_CACHE", str(tmp_path))
    bad = downloads.WheelAsset(name="tampered", package="recbole", version="1.2.1",
                           wheel_sha256="0" * 64, members=downloads.ML_100K.members)
    with pytest.raises(downloads.AssetError, match="sha256"):
        downloads.download(bad)
    assert not (tmp_path / "tampered").exists()


def test_model_identity_text_keeps_shipped_fingerprints():
    """The text the model fingerprint hashes is the configuration as it was written before
    `qk_norm` existed (the shipped head and every saved cache are bound to it), written out by
    hand here; a Qwen3 configuration names its q/k norms."""
    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4)
    assert cfg.identity_text() == (
        "ModelConfig(arch='llama', vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, "
        "num_kv_heads=1, head_dim=4, rms_eps=1e-05, rope_theta=10000.0, rope_scaling=RopeScaling(rope_type='default', "
        "factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192), rope_freq_factors=None, "
        "max_position=4096, tie_embeddings=False, qkv_bias=False, sliding_window=None, dtype='float32')")
    assert "qk_norm=True" in cfg.replace(arch="qwen3", qk_norm=True).identity_text()


@pytest.mark.parametrize("change, match", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0 .*soft-capping"),
    (dict(hidden_activation="relu"), "unsupported activation 'relu'"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "chunked_attention"),
    (dict(model_type="gemma2"), "unsupported architecture model_type='gemma2'"),
])
def test_gemma_features_not_implemented_are_named(change, match):
    """A Gemma-family config asking for what the decoder does not compute is refused, naming it;
    a Gemma 3 config's own features land in the configuration (and its fingerprint text)."""
    from rcllm_jax.model.config import UnsupportedModelError
    c = dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=4, query_pre_attn_scalar=8,
             layer_types=["sliding_attention", "full_attention"], hidden_activation="gelu_pytorch_tanh",
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    cfg = ModelConfig.from_hf_config(c)
    assert (cfg.sliding_layers, cfg.rope_theta, cfg.local_rope_theta, cfg.query_scale, cfg.hidden_act) == \
        ((True, False), 1e6, 1e4, 8.0, "gelu_tanh")
    assert "sliding_layers=(True, False)" in cfg.identity_text()
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf_config({**c, **change})
