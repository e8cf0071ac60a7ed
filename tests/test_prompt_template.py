"""Prompt templates (rcllm_jax/data/prompt_template.py): the default is today's prompt, written
out by hand below; a preset changes every kind of block and nothing else; templates whose blocks
could not be cached, broken presets and multi-token slots are refused with the reason; the block
modes stay exact under another template; a slot head refuses a prompt it was not trained on."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from rcllm_jax.data.movielens import Item
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.data.prompt_template import DEFAULT_TEMPLATE, TemplateError, load_template

ROOT = Path(__file__).resolve().parents[1]
ITEMS = {1: Item(1, "Heat", 1995, ("Action", "Crime")), 2: Item(2, "Babe", 1995, ("Comedy",)),
         3: Item(3, "Fargo", 1996, ("Crime", "Drama", "Thriller")), 4: Item(4, "Nell", None, ())}
CHAT_HEAD = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
CHAT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def test_the_default_template_is_the_documented_prompt(smollm2):
    """Hand-written: the label and slot prompts every snapshot and the shipped head were made with."""
    system = ("You are a movie recommender. From the movies a user watched, pick the one movie from a list of "
              "candidates that they will watch next.")
    head = CHAT_HEAD.format(system=system) + "Movies I watched, oldest first:\n"
    label = PromptBuilder(smollm2.tokenizer, ITEMS, history_len=2).build([4, 1, 2], [3, 4])
    assert label.text == (head + "Heat (1995; Action, Crime)\nBabe (1995; Comedy)\nCandidates:\n(A) Fargo (1996; "
                          "Crime, Drama, Thriller)\n(B) Nell\nWhich candidate will I watch next? Answer with its "
                          "label." + CHAT_TAIL + "(")
    assert [b.kind for b in label.blocks] == ["instruction", "history", "glue", "item", "glue", "item", "glue"]
    slot = PromptBuilder(smollm2.tokenizer, ITEMS, history_len=2, head="slot").build([], [3, 4])
    assert slot.text == (head + "(none)\nCandidates:\n- Fargo (1996; Crime, Drama, Thriller)\n- Nell\n"
                         "Which candidate will I watch next?" + CHAT_TAIL)
    assert [b.kind for b in slot.blocks] == ["instruction", "history", "glue", "item", "slot", "glue", "item",
                                             "slot", "glue"]
    assert load_template(ROOT / "configs" / "prompts" / "movielens.toml") == DEFAULT_TEMPLATE
    assert load_template(None) is DEFAULT_TEMPLATE


def test_a_preset_sets_every_kind_of_block(smollm2):
    t = load_template(ROOT / "configs" / "prompts" / "candidate_pool.toml")
    b = PromptBuilder(smollm2.tokenizer, ITEMS, history_len=5, template=t)
    p = b.build([1, 2], [3, 4])
    texts = {kind: [x.text for x in p.blocks if x.kind == kind] for kind in ("instruction", "history", "glue", "item")}
    assert texts["instruction"] == [CHAT_HEAD.format(system=t.system) + "User history:\n"]
    assert texts["history"] == ["* Heat (1995; Action, Crime)\n* Babe (1995; Comedy)\n"]
    assert texts["item"] == [" Fargo (1996; Crime, Drama, Thriller)", " Nell"]
    assert texts["glue"] == ["Candidate pool:\n(A)", "\n(B)",
                             "\nAnswer with the index letter of the recommended item." + CHAT_TAIL + "("]
    assert b.build([], [3]).blocks[1].text == "* (nothing yet)\n"
    assert b.first_lead() == "Candidate pool:\n(A)" and t.label_close == DEFAULT_TEMPLATE.label_close
    # the blocks tokenize as the whole text does, so the model reads what it would from the text
    assert smollm2.tokenizer.encode(p.text) == p.tokens.tolist()


@pytest.mark.parametrize("field, text, message", [
    ("item", " {item} ({label})", "placeholder {label} names a candidate's label"),
    ("item", " {title}", "placeholder {title} is not known (this field takes {item})"),
    ("item", " a movie", "must contain {item}"),
    ("history_item", "{user}: {item}\n", "placeholder {user} names the user"),
    ("instruction", "About {item}:\n", "the instruction is one block shared by every prompt"),
    ("system", "Hi {name}", "this field takes no placeholder"),
    ("next_label", "\n{label}. {position}", "placeholder {position} names a candidate's position"),
    ("label_question", "\nWhich one?(", "must contain {chat_tail}"),
    ("first_slot", "Pick {", "Single '{' encountered"),
    ("item", " {item!r}", "must be a plain name"),
])
def test_templates_whose_blocks_cannot_be_cached_are_refused_with_the_reason(field, text, message):
    with pytest.raises(TemplateError, match=f"prompt field '{field}'") as e:
        dataclasses.replace(DEFAULT_TEMPLATE, **{field: text})
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('[prompt]\nitems = " {item}"\n', "unknown key 'items'; known: empty_history, first_label"),
    ('[prompt]\nitem = 3\n', "prompt field 'item' must be text"),
    ('item = " {item}"\n', "expected one [prompt] table"),
    ('[prompt]\nitem = " {label}"\n', "placeholder {label}"),
    ('[prompt\n', "prompt preset"),
    (b'[prompt]\nitem = " \xff{item}"\n', "codec can't decode"),
])
def test_broken_presets_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TemplateError, match=str(path)) as e:
        load_template(path)
    assert message in str(e.value)
    with pytest.raises(TemplateError, match="No such file"):
        load_template(tmp_path / "absent.toml")


def test_a_slot_or_label_close_of_several_tokens_is_refused(smollm2):
    for field, text in (("slot", "\n\n--\n"), ("label_close", ") and")):
        with pytest.raises(TemplateError, match=f"prompt field '{field}' = .* must be one token"):
            PromptBuilder(smollm2.tokenizer, ITEMS, template=dataclasses.replace(DEFAULT_TEMPLATE, **{field: text}))


def test_the_launchers_refuse_a_broken_preset_before_loading(tmp_path):
    from absl import app, flags

    from rcllm_jax.settings import CatalogSettings, define_flags, read
    path = tmp_path / "p.toml"
    path.write_text('[prompt]\nitem = "{item} for {user}"\n')
    fv = flags.FlagValues()
    define_flags(CatalogSettings, flag_values=fv)
    fv(["prog", f"--prompt={path}"])
    with pytest.raises(app.UsageError, match="placeholder {user} names the user"):
        read(CatalogSettings, flag_values=fv)


def test_block_modes_stay_exact_and_slot_heads_check_the_prompt(smollm2):
    """Under another template the block modes recomputing everything equal full prefill (label
    and slot prompts); the cached item blocks are the new template's; a slot head trained on the
    default template is refused on another, one whose card names this template is accepted."""
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.ranking_head import HeadError, SlotHead
    from rcllm_jax.engine.selective_recompute import Policy
    from rcllm_jax.model import ModelConfig, forward, init_params
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)
    params = init_params(cfg, jax.random.key(0), scale=0.1)
    split = LeaveOneOut(load_dataset("ml-100k"))
    reqs = list(eval_requests(split, num_users=2, num_candidates=5, seed=3))
    items = sorted({i for r in reqs for i in r.candidates})
    t = load_template(ROOT / "configs" / "prompts" / "candidate_pool.toml")
    rng = np.random.default_rng(0)
    for head_kind in ("label", "slot"):
        builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=4, head=head_kind, template=t)
        head = None
        if head_kind == "slot":
            probe = Engine(params, cfg, builder, item_ids=items[:1], user_pages=8, prefix_pages=1)
            theta = rng.normal(size=cfg.hidden_size + 1).astype(np.float32)
            with pytest.raises(HeadError, match="trained on another prompt template"):
                Engine(params, cfg, builder, item_ids=items, head=SlotHead(theta, 0.1, probe.fingerprint))
            head = SlotHead(theta, 0.1, probe.fingerprint, card={"prompt_digest": t.digest()})
        eng = Engine(params, cfg, builder, item_ids=items, user_pages=64, prefix_pages=1, head=head)
        eng.build_store()
        assert eng.store.lookup("item", builder.item_block(items[0]).tokens) is not None
        for r in reqs:
            p = builder.build(r.history, r.candidates)
            assert "Candidate pool:" in p.text
            eng.update_user(r.user_id, p)
            full = eng.rank(p, "full").scores
            toks = jnp.asarray(p.tokens)[None]
            logits = np.asarray(forward(params, toks, jnp.arange(toks.shape[1])[None], cfg=cfg)[0][0])
            if head_kind == "label":  # full prefill's label log-probabilities, from the plain forward
                picked = logits[[smollm2.tokenizer.encode(lb)[0] for lb in p.labels]]
                assert rel_err(full, picked - np.log(np.exp(picked - picked.max()).sum()) - picked.max()) <= 1e-5
            for policy in (Policy(sink=10 ** 6), Policy(ratio=1.0, check_layer=1)):
                assert rel_err(eng.rank(p, policy, r.user_id).scores, full) <= 1e-5, (head_kind, policy)
