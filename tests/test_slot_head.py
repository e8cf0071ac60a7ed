"""The score-slot ranking head: slot prompts ranked in every mode against the full-prefill
reference computed independently (plain `forward` + the head's formula in numpy), head
persistence and refusals."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.engine.selective_recompute import Policy
from rcllm_jax.engine.ranking_head import HeadError, SlotHead
from rcllm_jax.model import forward, init_params

CFG = tiny_config()


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
    eng.build_store()
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
        _, lay, _ = eng.prefill_inputs(p, Policy(cached_glue=True), r.user_id)
        slots = p.slot_positions - lay.n_prefix
        assert lay.forced[slots].all() and not lay.cached[slots].any()
        assert int(lay.forced[:lay.n_suffix].sum()) == len(p.candidates) + 1


def test_transformers_peer_scores_slot_prompts_with_the_same_head(world, smollm2, tmp_path):
    """The benchmark's transformers rows (hf_full, hf_prefix) on slot prompts: Hugging Face's
    decoder (an independent implementation of the same weights) at the slots, the same head,
    equal to the numpy reference; a head with a query adapter is refused."""
    pytest.importorskip("transformers")
    import dataclasses as dc

    from rcllm_jax.eval.peers import load_peer
    from rcllm_jax.model.export import save_hf_dir
    eng, reqs, prompts, head = world
    save_hf_dir(tmp_path / "m", eng.params, CFG, smollm2.tokenizer)
    peer, why = load_peer(tmp_path / "m", head)
    assert why is None
    for p in prompts:
        ref = reference_scores(eng, p, head)
        assert rel_err(peer.rank(p, "hf_full").scores, ref) <= 1e-4
        for _ in range(2):  # a miss, then a hit on the instruction + history stored by the first
            res = peer.rank(p, "hf_prefix")
            assert rel_err(res.scores, ref) <= 1e-4
        assert res.cache_hit_tokens == len(p.blocks[0].tokens) + len(p.blocks[1].tokens)
    assert load_peer(tmp_path / "m", dc.replace(head, adapter={"wq": {}}))[0] is None


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
    bare = Engine(eng.params, CFG, eng.builder, item_ids=[])
    with pytest.raises(ValueError, match="needs? a trained ranking head"):
        bare.rank(prompts[0], "full")
    # a head over collaborative features: saved with their weights and names; final scores =
    # log_softmax(engine scores + side @ weights), worked out here in numpy
    from rcllm_jax.recommender import Recommender
    from rcllm_jax.retrieval import CANDIDATE_FEATURES
    sided = SlotHead(head.theta, head.bias, head.base_fingerprint, side_weights=np.asarray([1.0, -0.5, 2.0], np.float32),
                     side_features=CANDIDATE_FEATURES)
    back = SlotHead.load(sided.save(tmp_path / "sided"))
    assert back.side_features == CANDIDATE_FEATURES and np.array_equal(back.side_weights, sided.side_weights)
    s, side = np.log([0.5, 0.3, 0.2]), np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    z = s + np.array([1.0, -0.5, 2.0])
    assert np.allclose(back.combine(s, side), z - np.log(np.exp(z).sum()))
    assert np.array_equal(head.combine(s, side), s)  # no collaborative weights: unchanged
    with pytest.raises(ValueError, match="3 collaborative features"):
        back.combine(s, side[:, :2])
    sided_eng = Engine(eng.params, CFG, eng.builder, item_ids=[], head=back)
    with pytest.raises(ValueError, match="load a retriever"):
        Recommender(sided_eng)
    from dataclasses import replace
    renamed = Engine(eng.params, CFG, eng.builder, item_ids=[], head=replace(back, side_features=("x", "y", "z")))
    with pytest.raises(ValueError, match="retrain the head"):
        Recommender(renamed, retriever=object())
    # what a head reads: the slot states of the serving path, whose head formula gives the scores
    states = eng.slot_states(prompts[0], "full")
    assert states.shape == (len(prompts[0].candidates), CFG.hidden_size)
    assert rel_err(head.scores(states), eng.rank(prompts[0], "full").scores) <= 1e-6


def test_training_examples_use_only_data_before_each_target():
    from rcllm_jax.data.pipeline import retrieved_candidates
    from rcllm_jax.retrieval import ItemKNN
    from rcllm_jax.train.head_fit import training_examples, validation_examples
    split = LeaveOneOut(load_dataset("ml-100k"))
    split.users = split.users[:80]
    ex, stats = training_examples(split, positions=(4, 3), num_candidates=20)
    assert stats["position_3"]["target_retrieved"] + stats["position_4"]["target_retrieved"] == len(ex) > 0
    seqs = split.dataset.sequences
    retr = {p: ItemKNN.fit([seqs[u][:-p] for u in split.users], sorted(split.dataset.items)) for p in (3, 4)}
    for e in ex[:20]:
        p = len(seqs[e.user]) - len(e.history)
        assert p in (3, 4) and e.history == tuple(seqs[e.user][:-p])
        assert e.candidates[e.target_index] == seqs[e.user][-p] and not set(e.candidates) & set(e.history)
        assert e.candidates == retrieved_candidates(retr[p], e.user, e.history, 20, order="retriever")
    val, n = validation_examples(split, num_candidates=20)
    assert n == 80 and all(e.candidates[e.target_index] == split.target(e.user, "valid") for e in val)


def test_training_reads_the_serving_computation(world, tmp_path):
    """Stage 1 fits the head on `base_states` = what the engine computes when it serves the
    prompt (padded training shapes, prefixes from the prefix bank): the trained head applied to
    those states gives the engine's rcllm scores. Saved states come back only for the same
    examples; the loss falls."""
    from rcllm_jax.train import ranker as rk
    from rcllm_jax.train import head_fit as sh
    eng, reqs, prompts, _ = world
    examples = [sh.Example(r.user_id, tuple(r.history), tuple(r.candidates), i % len(r.candidates))
                for i, r in enumerate(reqs)]
    cfg = rk.RankerConfig(pad_prefix=256, pad_suffix=256, pad_select=32)
    full = np.stack(rk.base_states(eng, eng.builder, examples, cfg, rk.PrefixBank(tmp_path / "prefixes")))
    again = np.stack(rk.base_states(eng, eng.builder, examples, cfg, rk.PrefixBank(tmp_path / "prefixes")))
    assert np.array_equal(again, full)  # prefixes restored from the bank, not recomputed: the same states
    path = tmp_path / "s.npz"
    sh.save_states(path, list(full[:2]), "k1")
    assert sh.load_states(path, "other examples") is None
    assert np.array_equal(np.stack(sh.load_states(path, "k1")), full[:2])
    targets = np.asarray([e.target_index for e in examples])
    theta, bias, side_w, curve = sh.fit_head(full, targets, l2=1e-3, steps=60, lr=0.05, val=(full, targets),
                                             log_every=30)
    assert side_w is None and curve[-1]["loss"] < curve[0]["loss"] - 0.5  # 3 examples: the head fits them
    assert curve[-1]["val_ndcg@10"] > curve[0]["val_ndcg@10"]
    # over a collaborative scorer: the saved head (position weights summed, its side weights)
    # combined with the features scores what the fit minimised (its final loss, l2 = 0)
    side = np.random.default_rng(1).normal(size=full.shape[:2] + (3,)).astype(np.float32)
    base = sh.Collaborative(0.7, np.asarray([0.5, -0.2, 1.5], np.float32))
    th2, b2, sw2, c2 = sh.fit_head(full, targets, side, base=base, l2=0.0, steps=20, lr=0.05)
    both = SlotHead(th2, b2, eng.fingerprint, side_weights=sw2, side_features=("a", "b", "c"))
    nll = [-both.combine(both.scores(st), sd)[t] for st, sd, t in zip(full, side, targets)]
    assert np.array_equal(sw2, base.side) and abs(np.mean(nll) - c2[-1]["loss"]) < 1e-5
    trained = SlotHead(theta, bias, eng.fingerprint)
    saved, eng.head = eng.head, trained
    try:
        for e, p, st in zip(examples, prompts, full):
            assert rel_err(trained.scores(st), eng.rank(p, "rcllm", user_id=e.user).scores) <= 1e-5
            assert rel_err(st, eng.slot_states(p, "rcllm", user_id=e.user)) <= 1e-5
    finally:
        eng.head = saved


@pytest.mark.slow
def test_shipped_head_serves_the_default_model(smollm2):
    """The head in the package is the default model's: the engine accepts it, and its card says
    how it was made; any other weights are refused."""
    from rcllm_jax.engine.ranking_head import DEFAULT_HEAD, ranking_head
    head = ranking_head("slot")
    assert (DEFAULT_HEAD / "README.md").exists() and head.theta.shape == (smollm2.cfg.hidden_size + 1,)
    assert head.card["base_fingerprint"] == head.base_fingerprint and head.card["val_examples"] > 0
    from rcllm_jax.retrieval import CANDIDATE_FEATURES
    assert head.side_features == CANDIDATE_FEATURES  # it weighs the retriever's collaborative features
    split = LeaveOneOut(load_dataset("ml-100k"))
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=5, head="slot")
    eng = Engine(smollm2.params, smollm2.cfg, builder, item_ids=[1, 2, 3], head=head, user_pages=64, prefix_pages=1)
    res = eng.rank(builder.build([50, 181], [1, 2, 3]), "full")
    assert np.isfinite(res.scores).all()
    with pytest.raises(ValueError, match="--ranking_head applies to --head=slot only"):
        ranking_head("label", str(DEFAULT_HEAD))


def test_service_answers_the_recommenders_final_scores(world):
    """The in-process service over a slot engine whose head weighs collaborative features: every
    answer (batched serving steps and one request at a time) has the final scores worked out here
    by hand — the engine's scores plus the retriever's features weighed by the head, normalised —
    not the engine's scores alone; after a warm-up, the same requests compile nothing."""
    from dataclasses import replace

    from rcllm_jax.retrieval import CANDIDATE_FEATURES, ItemKNN
    from rcllm_jax.serve.scheduler import Scheduler
    from rcllm_jax.serve.service import RecommenderService
    eng, reqs, prompts, head = world
    ds = load_dataset("ml-100k")
    w = np.asarray([1.5, -0.5, 2.0], np.float32)
    sided = Engine(eng.params, CFG, eng.builder, item_ids=sorted(eng.item_blocks), user_pages=128, prefix_pages=8,
                   head=replace(head, side_weights=w, side_features=CANDIDATE_FEATURES), max_candidates=8)
    sided.build_store()
    retriever = ItemKNN.fit([ds.sequences[u] for u in sorted(ds.sequences)], sorted(ds.items))
    want, reordered = [], 0
    for r, p in zip(reqs, prompts):
        base = np.asarray(sided.rank(p, "rcllm", user_id=str(r.user_id)).scores, np.float64)
        z = base + retriever.candidate_features(r.history, r.candidates) @ w.astype(np.float64)
        want.append(z - np.logaddexp.reduce(z))
        reordered += not np.array_equal(np.argsort(-want[-1], kind="stable"), np.argsort(-base, kind="stable"))
    assert reordered  # the collaborative term changes some ranking: the check below can tell
    bodies = [{"user_id": r.user_id, "history": list(r.history), "candidates": list(r.candidates)} for r in reqs]

    def burst(step):  # every request queued before the loop starts: the same windows each time
        import tempfile

        import test_scheduler
        from rcllm_jax.serve.service import compiles, count_compiles
        from rcllm_jax.serve.state import StateStore
        count_compiles()
        svc = RecommenderService(sided, ds.items, StateStore(Path(tempfile.mkdtemp()) / "state.sqlite3"),
                                 scheduler=Scheduler(1), max_candidates=8, retriever=retriever, serving_step=step)
        before = compiles()
        outs = test_scheduler.burst(svc, bodies)
        return outs, compiles() - before
    for step in ("batched", "serial"):
        burst(step)  # warm-up: compiles these shapes
        outs, compiles = burst(step)
        assert compiles == 0, step  # the same requests again: nothing compiled on the request path
        for r, out, z in zip(reqs, outs, want):
            order = np.argsort(-z, kind="stable")
            assert [x["item_id"] for x in out["ranking"]] == [r.candidates[i] for i in order], step
            assert rel_err([x["score"] for x in out["ranking"]], z[order]) <= 1e-4, step


def test_collaborative_only_ablation_is_the_head_without_slot_weights():
    """The ablation bench.py reports as `collaborative_only` (what the LLM adds is the head minus it):
    the shipped head with its slot-state weights zeroed, checked against the formula by hand."""
    import dataclasses

    from rcllm_jax.engine.ranking_head import DEFAULT_HEAD
    head = SlotHead.load(DEFAULT_HEAD)
    k, d = 9, len(head.theta) - 1
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(k, d)).astype(np.float32)
    side = rng.normal(size=(k, len(head.side_weights))).astype(np.float32)
    ablation = head.collaborative_only()
    got = ablation.combine(ablation.scores(hidden), side)
    raw = float(head.theta[-1]) * np.log1p(np.arange(k)) + side.astype(np.float64) @ head.side_weights
    want = raw - np.log(np.exp(raw - raw.max()).sum()) - raw.max()  # log-softmax; the bias cancels
    assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(ablation.combine(ablation.scores(np.zeros_like(hidden)), side), want, atol=1e-5)
    zeroed = dataclasses.replace(head, theta=np.r_[np.zeros(d, np.float32), head.theta[-1:]])
    assert np.allclose(zeroed.combine(zeroed.scores(hidden), side), want, atol=1e-5)
    assert not np.allclose(head.combine(head.scores(hidden), side), want, atol=1e-3)  # the head reads the states
    assert ablation.adapter is None and np.array_equal(head.side_weights, ablation.side_weights)
