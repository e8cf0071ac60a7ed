"""Hugging Face PEFT LoRA adapters (`--adapter=DIR` in the peft layout) against `peft` +
`transformers` on small random models with random adapters: the same logits, the engine's block
modes exact at 100% recompute under the adapter, a base-model item cache refused under it, and
what the engine does not implement refused by name."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import hf_model, save_hf
from conftest import rel_err, require
from rcllm_jax.model import load_model
from rcllm_jax.model.decoder import forward
from rcllm_jax.model.lora import AdapterMismatchError

torch = require("torch")
peft = require("peft")


def _adapter(model, path, seed=1, **kw):
    """A random PEFT LoRA over `model` (B random too, so the adapter matters), saved to `path`;
    the PeftModel for reference."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, **kw})
    pm = peft.get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(path)
    return pm


def _logits_ours(m, toks):
    t = jnp.asarray(toks)
    logits, _ = forward(m.params, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), cfg=m.cfg, all_logits=True)
    return np.asarray(logits)


def _logits_hf(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.float().numpy()


@pytest.mark.parametrize("family, kw", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    ("qwen3", dict(target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2})),
    ("qwen2", dict(target_modules=["k_proj", "o_proj", "up_proj"], layers_to_transform=[1])),
    ("gemma3", dict(target_modules="all-linear", lora_alpha=24)),
])
def test_peft_adapter_logits_equal_peft_and_transformers(tmp_path, family, kw):
    base = hf_model(family, **({"head_dim": 32} if family == "qwen3" else {}))
    base_dir = save_hf(base, tmp_path / "base")
    toks = np.random.default_rng(0).integers(0, base.config.vocab_size, size=(2, 20))
    plain = _logits_hf(base, toks)
    pm = _adapter(base, tmp_path / "adapter", **kw)
    ref = _logits_hf(pm, toks)
    assert rel_err(ref, plain) > 1e-2  # the adapter really changes the model
    m = load_model(base_dir, adapter=tmp_path / "adapter", with_tokenizer=False)
    assert rel_err(_logits_ours(m, toks), ref) <= 1e-4


def test_peft_adapter_block_modes_and_cache_identity(tmp_path, smollm2):
    """Under a PEFT adapter the engine's block modes at 100% recompute equal its full prefill, and
    the adapter changes the model's fingerprint: an item cache saved for the base is refused."""
    from rcllm_jax.cache.snapshot import SnapshotMismatchError
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.selective_recompute import Policy
    base = hf_model("llama", vocab=smollm2.cfg.vocab_size)
    base_dir = save_hf(base, tmp_path / "base")
    _adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    split = LeaveOneOut(load_dataset("ml-100k"))
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=4)
    req = next(iter(eval_requests(split, num_users=1, num_candidates=5, seed=3)))
    prompt = builder.build(req.history, req.candidates)
    engines = {}
    for name, adapter in (("base", None), ("adapted", tmp_path / "adapter")):
        m = load_model(base_dir, adapter=adapter, with_tokenizer=False)
        engines[name] = Engine(m.params, m.cfg, builder, item_ids=sorted(req.candidates), user_pages=64,
                               prefix_pages=4)
    eng = engines["adapted"]
    eng.build_store()
    full = eng.rank(prompt, "full").scores
    assert rel_err(full, engines["base"].rank(prompt, "full").scores) > 1e-3
    eng.update_user(req.user_id, prompt)
    for policy in (Policy(sink=10 ** 6), Policy(ratio=1.0, check_layer=1)):
        got = eng.rank(prompt, policy, user_id=req.user_id).scores
        assert rel_err(got, full) <= 1e-5, policy
    assert engines["base"].fingerprint != eng.fingerprint
    engines["base"].build_store()
    engines["base"].save(tmp_path / "snap")
    with pytest.raises(SnapshotMismatchError):
        Engine(eng.params, eng.cfg, builder, item_ids=sorted(req.candidates), user_pages=64,
               prefix_pages=4).restore(tmp_path / "snap")


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "trains biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"peft_type": "IA3"}, "only LORA"),
])
def test_peft_features_this_engine_lacks_are_refused_by_name(tmp_path, change, message):
    base = hf_model("llama")
    base_dir = save_hf(base, tmp_path / "base")
    _adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))
    with pytest.raises(AdapterMismatchError, match=message):
        load_model(base_dir, adapter=tmp_path / "adapter", with_tokenizer=False)


def test_peft_adapter_for_another_model_is_refused(tmp_path):
    base_dir = save_hf(hf_model("llama"), tmp_path / "base")
    _adapter(hf_model("llama", hidden=96, heads=4), tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(AdapterMismatchError, match="do not fit"):
        load_model(base_dir, adapter=tmp_path / "adapter", with_tokenizer=False)
