"""The ranker's query adapter (LoRA on the rows computed per request) and its training: the
adapted full prefill against an independent reference (the plain decoder with adapted weights
over the base model's KV), training's scores equal serving's, the loss falls, resume is exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.engine.plan import query_rows, stitch_plan
from rcllm_jax.engine.ranking_head import HeadError, SlotHead
from rcllm_jax.model import forward, init_params
from rcllm_jax.model.decoder import KVCache
from rcllm_jax.model.lora import LoraConfig, init_lora, merge
from rcllm_jax.train import ranker as rk
from rcllm_jax.train.head_fit import Example

CFG = tiny_config()
LCFG = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "wo", "w_up"), first_layer=1)
SMALL = dict(pad_prefix=128, pad_suffix=192, pad_select=32)


@pytest.fixture(scope="module")
def world(smollm2):
    split = LeaveOneOut(load_dataset("ml-100k"))
    params = init_params(CFG, jax.random.key(0), scale=0.3)
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=4, head="slot")
    reqs = list(eval_requests(split, num_users=4, num_candidates=5, seed=3))
    items = sorted({i for r in reqs for i in r.candidates})
    probe = Engine(params, CFG, PromptBuilder(smollm2.tokenizer, split.dataset.items), item_ids=[])
    rng = np.random.default_rng(1)
    base_head = SlotHead(rng.normal(size=CFG.hidden_size + 1).astype(np.float32), 0.1, probe.fingerprint)
    lora = init_lora(params, LCFG, jax.random.key(5))
    lora = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.normal(size=a.shape).astype(np.float32), lora)  # B != 0
    adapted_head = SlotHead(base_head.theta, base_head.bias, probe.fingerprint, adapter=lora, adapter_cfg=LCFG)
    base = Engine(params, CFG, builder, item_ids=items, user_pages=128, prefix_pages=64, head=base_head, max_candidates=6)
    base.build_store()
    adapted = Engine(params, CFG, builder, item_ids=items, user_pages=128, prefix_pages=64, head=adapted_head,
                     max_candidates=6)
    adapted.copy_blocks_from(base)
    examples = [Example(r.user_id, tuple(r.history), tuple(r.candidates), i % len(r.candidates))
                for i, r in enumerate(reqs)]
    return params, builder, base, adapted, adapted_head, examples


def reference_scores(params, head, prompt):
    """Independent of the engine: the base model's full-prefill KV of the prompt; the plain
    decoder with adapted weights runs the query rows over the KV of the other rows (masking by
    position); final norm at the slots and the head's formula in numpy."""
    toks = jnp.asarray(prompt.tokens)[None]
    n = toks.shape[1]
    pos = jnp.arange(n)[None]
    _, kv = forward(params, toks, pos, cfg=CFG)
    q = np.flatnonzero(query_rows(prompt))
    ctx = np.setdiff1d(np.arange(n), q)
    cache = KVCache(k=kv.k[:, :, ctx], v=kv.v[:, :, ctx], pos=pos[:, ctx], seg=jnp.zeros((1, len(ctx)), jnp.int32),
                    valid=jnp.ones((1, len(ctx)), bool))
    hidden, _ = forward(merge(params, head.adapter, head.adapter_cfg), toks[:, q], pos[:, q], cfg=CFG, cache=cache,
                        return_hidden="all")
    h = np.asarray(hidden[0], np.float64)[np.searchsorted(q, prompt.slot_positions)]
    h = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + CFG.rms_eps) * np.asarray(params["final_norm"])
    raw = np.concatenate([h, np.log1p(np.arange(len(h)))[:, None]], axis=1) @ head.theta + head.bias
    return raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())


def test_query_rows_are_what_rcllm_recomputes(world):
    _, builder, base, _, _, examples = world
    e = examples[0]
    p = builder.build(e.history, e.candidates)
    starts = [None, None] + [0 if b.kind == "item" else None for b in p.blocks[2:]]
    assert np.array_equal(query_rows(p), stitch_plan(p, starts).forced)
    assert query_rows(p)[p.slot_positions].all() and not query_rows(p)[:len(p.blocks[0].tokens)].any()


def test_adapted_full_and_prefix_equal_the_reference(world):
    params, builder, base, adapted, head, examples = world
    for e in examples:
        p = builder.build(e.history, e.candidates)
        ref = reference_scores(params, head, p)
        assert rel_err(adapted.rank(p, "full").scores, ref) <= 1e-4
        assert rel_err(adapted.rank(p, "prefix").scores, ref) <= 1e-4  # a miss, then a hit
        assert rel_err(adapted.rank(p, "prefix").scores, ref) <= 1e-4
        # the adapter changes the scores (the test is not vacuous); the base head ignores it
        assert rel_err(base.rank(p, "full").scores, ref) > 1e-3
        assert np.isfinite(adapted.rank(p, "rcllm", user_id=e.user).scores).all()


def test_training_scores_are_the_serving_scores(world):
    """The trainer's differentiated function, on padded shapes, gives what Engine.rank serves
    with the same head and adapter in rcllm mode (one definition)."""
    params, builder, base, adapted, head, examples = world
    cfg = rk.RankerConfig(lora_rank=LCFG.rank, lora_alpha=LCFG.alpha, targets=LCFG.targets,
                          first_layer=LCFG.first_layer, **SMALL)
    trainable = {"lora": jax.tree.map(jnp.asarray, head.adapter), "theta": jnp.asarray(head.theta),
                 "bias": jnp.float32(head.bias)}
    for e in examples:
        p = builder.build(e.history, e.candidates)
        arrays, static, valid, _ = rk.request(base, builder, e, cfg)
        got = np.asarray(rk.ranker_scores(trainable, base.params, arrays, valid, static=static, lcfg=LCFG))
        served = adapted.rank(p, "rcllm", user_id=e.user).scores
        assert rel_err(got[:len(e.candidates)], served) <= 1e-5
        assert np.all(np.isneginf(got[len(e.candidates):]))
        loss = rk.batch_loss(trainable, base.params, tuple(arrays[:2]), jax.tree.map(lambda a: a[None], arrays[2:]),
                             jnp.asarray(valid)[None], jnp.asarray([e.target_index]), 0.0, static=static, lcfg=LCFG)
        assert float(loss) == pytest.approx(-float(got[e.target_index]), rel=1e-5)
        # a head over collaborative features: the trainer's offset gives SlotHead.combine of the served scores
        side = np.random.default_rng(e.user).normal(size=(len(e.candidates), 3))
        sided = dataclasses.replace(head, side_weights=np.asarray([0.4, -1.0, 0.8], np.float32),
                                    side_features=("a", "b", "c"))
        off = np.zeros(len(valid), np.float32)
        off[:len(e.candidates)] = side @ sided.side_weights
        got = np.asarray(rk.ranker_scores(trainable, base.params, arrays, valid, jnp.asarray(off), static=static,
                                          lcfg=LCFG))
        assert rel_err(got[:len(e.candidates)], sided.combine(served, side)) <= 1e-5


def _trainer(world, tmp_path, **kw):
    params, builder, base, _, head, examples = world
    cfg = rk.RankerConfig(steps=6, batch_size=2, lr=3e-2, warmup=1, lora_rank=4, lora_alpha=8.0,
                          targets=("wq", "wv"), first_layer=1, checkpoint_every=2, **SMALL, **kw)
    init = SlotHead(head.theta * 0.1, 0.0, base.fingerprint)
    return rk.RankerTrainer(base, builder, examples, cfg, init, checkpoint_dir=tmp_path / "ckpt",
                            prefixes=rk.PrefixBank(tmp_path / "prefixes"))


def test_loss_falls_and_resume_is_exact(world, tmp_path):
    examples = world[5]

    def nll(t):
        return np.mean([-s[e.target_index] for s, e in zip(t.scores(examples), examples)])
    straight = _trainer(world, tmp_path / "a")
    before = nll(straight)
    for _ in range(12):
        straight.train_step()
    assert nll(straight) < before - 0.2  # 4 examples: head + adapter fit them
    # interrupted after 2 steps (checkpoint), resumed by a new trainer: bit-identical to straight
    ref = _trainer(world, tmp_path / "b")
    ref.run(until=4)
    part = _trainer(world, tmp_path / "c")
    part.run(until=2)
    resumed = _trainer(world, tmp_path / "c")
    assert resumed.step == 2
    resumed.run(until=4)
    for a, b in zip(jax.tree.leaves(ref.state), jax.tree.leaves(resumed.state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(rk.CheckpointMismatchError, match="another run"):
        _trainer(world, tmp_path / "c", l2=0.5)
    # the prefix bank put every example's prefix on disk and serves it back unchanged
    assert len(list((tmp_path / "c" / "prefixes").glob("*.npz"))) == len(world[5])
    # the trained ranker round-trips as a head with its adapter, and serves
    out = resumed.head({"note": "test"})
    out.save(tmp_path / "ranker")
    back = SlotHead.load(tmp_path / "ranker", expect_fingerprint=world[2].fingerprint)
    assert back.adapter_cfg == resumed.lcfg and back.card == {"note": "test"}
    for n in back.adapter:
        assert np.array_equal(back.adapter[n]["b"], np.asarray(resumed.state["trainable"]["lora"][n]["b"]))


def test_adapter_refused_on_other_shapes(world):
    _, builder, _, _, head, _ = world
    wide = dataclasses.replace(CFG, intermediate_size=96)
    other = init_params(wide, jax.random.key(1))
    fp = Engine(other, wide, builder, item_ids=[]).fingerprint
    odd = SlotHead(head.theta, head.bias, fp, adapter=head.adapter, adapter_cfg=head.adapter_cfg)
    with pytest.raises(HeadError, match="query adapter does not fit"):
        Engine(other, wide, builder, item_ids=[], head=odd)
