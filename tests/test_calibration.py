"""rcllm's calibrated policy (rcllm_jax/engine/calibration.py): the cheapest candidate meeting the
fidelity target wins, an unreachable target serves the exact policy (equal to full prefill, read
from the plain forward pass), the engine runs what was chosen, and a saved calibration is reused
only under the same key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine import calibration as cal
from rcllm_jax.engine.engine import Engine
from rcllm_jax.model import ModelConfig, forward, init_params
from rcllm_jax.recommender import Recommender, calibration_requests
from rcllm_jax.retrieval import ItemKNN

CFG = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)


@pytest.fixture(scope="module")
def world(smollm2):
    ds = LeaveOneOut(load_dataset("ml-100k")).dataset
    params = init_params(CFG, jax.random.key(2), scale=0.3)
    builder = PromptBuilder(smollm2.tokenizer, ds.items, history_len=5)
    items = sorted(ds.items)[:300]
    retriever = ItemKNN.fit([ds.sequences[u] for u in sorted(ds.sequences)], items)
    eng = Engine(params, CFG, builder, item_ids=items, user_pages=256, prefix_pages=1)
    eng.build_store()
    rec = Recommender(eng, retriever, "rcllm")
    return rec, calibration_requests(ds, retriever, items, 6, 8)


def test_the_cheapest_passing_candidate_is_chosen_and_served(world):
    rec, requests = world
    assert len(requests) == 6 and all(len(c) == 8 and not set(c) & set(h) for _, h, c in requests)
    loose = cal.FidelityTarget(top1=0.0, kendall_tau=-1.0, kl=1e9)  # every candidate passes
    got = cal.calibrate(rec, requests, loose)
    cost = {n: m["computed_tokens_mean"] for n, m in got.measured.items()}
    assert got.met and cost[got.name] == min(cost.values()) and "exact" not in got.measured
    strict = cal.FidelityTarget(top1=1.0, kendall_tau=0.999, kl=1e-4)
    got2 = cal.calibrate(rec, requests, strict)
    passing = [n for n, m in got2.measured.items() if strict.met(m) and n != "exact"]
    if got2.met:  # the cheapest of those that pass, by tokens computed
        assert got2.name in passing and cost[got2.name] == min(cost[n] for n in passing)
    else:  # none passed: the exact policy, measured then, is exact
        assert not passing and got2.name == "exact" and got2.measured["exact"]["kl_mean"] < 1e-6
    rec.engine.set_policy("rcllm", got.policy, got)
    assert rec.engine.policy("rcllm") == got.policy and rec.engine.calibration.summary()["policy"] == got.name
    rec.engine.set_policy("rcllm", cal.BLOCK_MODES["rcllm"])


def test_an_unreachable_target_serves_the_exact_policy(world):
    rec, requests = world
    got = cal.calibrate(rec, requests[:3], cal.FidelityTarget(top1=1.0, kendall_tau=1.0, kl=-1.0))
    assert not got.met and got.name == "exact" and got.policy == cal.EXACT
    assert got.measured["exact"]["top1_agreement"] == 1.0 and got.measured["exact"]["kl_mean"] < 1e-6
    eng = rec.engine
    eng.set_policy("rcllm", got.policy, got)
    try:
        for user, history, cands in requests[:3]:
            p = eng.builder.build(history, cands)
            toks = jnp.asarray(p.tokens)[None]
            logits = np.asarray(forward(eng.params, toks, jnp.arange(toks.shape[1])[None], cfg=CFG)[0][0])
            picked = logits[[eng.builder.tok.encode(lb)[0] for lb in p.labels]]
            want = picked - picked.max() - np.log(np.exp(picked - picked.max()).sum())
            assert rel_err(eng.rank(p, "rcllm", user_id=user).scores, want) <= 1e-5
    finally:
        eng.set_policy("rcllm", cal.BLOCK_MODES["rcllm"])


def test_a_saved_calibration_is_reused_only_under_its_key(world, tmp_path):
    rec, requests = world
    got = cal.calibrate(rec, requests[:2], cal.FidelityTarget(top1=0.0, kendall_tau=-1.0, kl=1e9))
    cal.save(tmp_path, got)
    assert cal.load(tmp_path, got.key) == got
    eng = rec.engine
    assert got.key == cal.calibration_key(eng, 8)
    assert cal.calibration_key(eng, 20) != got.key  # another candidate count
    other = dataclasses.replace(eng.builder.template, instruction="Films I saw:\n")
    builder = PromptBuilder(eng.builder.tok, eng.builder.items, history_len=5, template=other)
    eng2 = Engine(eng.params, CFG, builder, item_ids=sorted(eng.item_blocks)[:4], user_pages=8, prefix_pages=1)
    assert cal.load(tmp_path, cal.calibration_key(eng2, 8)) is None  # another prompt
    (tmp_path / "calibration" / f"{got.key}.json").write_text("{broken")
    assert cal.load(tmp_path, got.key) is None
    with pytest.raises(ValueError, match="at least one request"):
        cal.calibrate(rec, [])


def test_the_default_setup_ships_its_calibration(smollm2):
    """The default model, shipped head and default prompt, as serve.py and recommend.py set them up,
    find their calibration among the head's assets (measured once: the README's first command
    does not pay for it); it chose the built-in policy, within the target."""
    from rcllm_jax.data.prompt import SERVED_HEAD, SERVED_HISTORY_LEN
    from rcllm_jax.engine.ranking_head import DEFAULT_HEAD, SlotHead
    from rcllm_jax.settings import EngineSettings, MeshSettings
    ds = load_dataset("ml-100k")
    builder = PromptBuilder(smollm2.tokenizer, ds.items, history_len=SERVED_HISTORY_LEN, head=SERVED_HEAD,
                            max_prompt_tokens=smollm2.cfg.max_position)
    eng = Engine(smollm2.params, smollm2.cfg, builder, item_ids=[1, 2], user_pages=8, prefix_pages=1,
                 kv_dtype=MeshSettings().kv_dtype, head=SlotHead.load(DEFAULT_HEAD))
    e = EngineSettings()
    got = cal.load(cal.SHIPPED, cal.calibration_key(eng, min(e.calibration_candidates, e.max_candidates)))
    assert got is not None and got.met and got.requests == 16
    assert got.policy == cal.BLOCK_MODES["rcllm"] and cal.FidelityTarget().met(got.measured[got.name])
