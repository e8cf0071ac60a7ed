"""The score-slot ranking head: slot prompts ranked in every mode against the full-prefill
reference computed independently (plain `forward` + the head's formula in numpy), head
persistence and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.engine.selective_recompute import Policy
from rcllm_jax.engine.slot_head import HeadError, SlotHead
from rcllm_jax.model import ModelConfig, forward, init_params

CFG = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)


@pytest.fixture(scope="module")
def world(smollm2):
    split = LeaveOneOut(load_dataset("ml-100k"))
    params = init_params(CFG, jax.random.key(0), scale=0.3)
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=5, head="slot")
    reqs = list(eval_requests(split, num_users=3, num_candidates=7, seed=2))
    probe = Engine(params, CFG, PromptBuilder(smollm2.tokenizer, split.dataset.items), item_ids=[])
    rng = np.random.default_rng(0)
    head = SlotHead(rng.normal(size=CFG.hidden_size + 1).astype(np.float32), 0.3, probe.fingerprint)
    eng = Engine(params, CFG, builder, item_ids=sorted({i for r in reqs for i in r.candidates}), user_pages=128,
                 prefix_pages=64, head=head, max_candidates=8)
    eng.build_store(batch=8)
    return eng, reqs, [builder.build(r.history, r.candidates) for r in reqs], head


def reference_scores(eng, prompt, head):
    """Plain full prefill; final norm at the slots; the head's formula in numpy."""
    toks = jnp.asarray(prompt.tokens)[None]
    hidden, _ = forward(eng.params, toks, jnp.arange(toks.shape[1])[None], cfg=CFG, return_hidden="all")
    h = np.asarray(hidden[0], np.float64)[prompt.slot_positions]
    h = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + CFG.rms_eps) * np.asarray(eng.params["final_norm"])
    feats = np.concatenate([h, np.log1p(np.arange(len(h)))[:, None]], axis=1)
    raw = feats @ head.theta + head.bias
    return raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())


def test_slot_prompts_in_every_mode(world):
    eng, reqs, prompts, head = world
    for r, p in zip(reqs, prompts):
        assert p.head == "slot" and len(p.slot_positions) == len(p.candidates)
        ref = reference_scores(eng, p, head)
        assert rel_err(eng.rank(p, "full").scores, ref) <= 1e-4
        # recomputing every suffix token = full prefill; the prefix cache on a miss and a hit too
        assert rel_err(eng.rank(p, Policy(sink=10 ** 6), user_id=r.user_id).scores, ref) <= 1e-4
        assert rel_err(eng.rank(p, Policy(sink=10 ** 6, cached_glue=True), user_id=r.user_id).scores, ref) <= 1e-4
        assert rel_err(eng.rank(p, "prefix").scores, ref) <= 1e-4
        assert rel_err(eng.rank(p, "prefix").scores, ref) <= 1e-4
        # the cached modes recompute the slots: one per candidate, plus the last token
        res = eng.rank(p, "rcllm", user_id=r.user_id)
        assert np.isfinite(res.scores).all() and abs(np.exp(res.scores).sum() - 1) < 1e-5
        lay, _ = eng._stitch(p, r.user_id, Policy(cached_glue=True))
        slots = p.slot_positions - lay.n_prefix
        assert lay.forced[slots].all() and not lay.cached[slots].any()
        assert int(lay.forced[:lay.n_suffix].sum()) == len(p.candidates) + 1


def test_head_round_trip_and_refusals(world, tmp_path):
    eng, _, prompts, head = world
    path = head.save(tmp_path / "head")
    back = SlotHead.load(tmp_path / "head", expect_fingerprint=eng.fingerprint)
    assert np.array_equal(back.theta, head.theta) and back.bias == pytest.approx(head.bias)
    with pytest.raises(HeadError, match="other base weights"):
        SlotHead.load(path, expect_fingerprint="f" * 32)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(HeadError, match="damaged"):
        SlotHead.load(path)
    with pytest.raises(HeadError, match="other weights"):
        Engine(jax.tree.map(lambda a: a * 1.01, eng.params), CFG, eng.builder, item_ids=[], head=head)
    with pytest.raises(ValueError, match="need a trained ranking head"):
        Engine(eng.params, CFG, eng.builder, item_ids=[])
