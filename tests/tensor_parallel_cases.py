"""Tensor parallelism on a simulated CPU mesh, collected only through tests/test_mesh.py (which runs
this file by pytest in a process of its own): items:2,model:3 against items:1, and the weights'
tensor-parallel specs by hand. References: the items:1 engine on the same weights."""

import dataclasses

import jax
import pytest

from conftest import rel_err
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import stream_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.model import ModelConfig, init_params
from rcllm_jax.parallel.mesh import MeshSpec, make_mesh


@pytest.fixture(scope="module")
def world(smollm2):
    split = LeaveOneOut(load_dataset("ml-100k"))
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=5)
    reqs = stream_requests(split, num_users=3, requests_per_user=2, num_candidates=8, negatives="retrieval", seed=3)
    prompts = [builder.build(r.history, r.candidates) for r in reqs]
    return builder, reqs, prompts


# tensor parallelism: 6 query / 3 KV heads as the default model's 9 / 3 split by model:3 (one KV
# head and two query heads per device), head dim 32 (the GPU kernels' smallest)
CFG_TP = ModelConfig(arch="llama", vocab_size=49152, hidden_size=96, intermediate_size=192, num_layers=3,
                     num_heads=6, num_kv_heads=3, head_dim=32, rope_theta=10000.0, max_position=4096)
TP_MODES = ("full", "prefix", "prefix_warm", "stitch", "sink", "deviation", "rcllm")


def test_tensor_parallel_rankings_equal_items1(world, tmp_path):
    """items:2,model:3 (6 simulated devices) against items:1: every mode one by one and block modes in
    serving steps give the same scores (f32 round-off: the heads' partial sums are all-reduced in
    another order), with remote rows fetched by both paths; each device holds a third of the heads'
    weights and one KV head of the store and the pool; snapshots restore across model sizes; the
    int8 store and the Pallas paths (interpreted, both variants) agree too."""
    builder, reqs, prompts = world
    items = sorted({i for r in reqs for i in r.candidates} | set(range(1, 41)))
    params = init_params(CFG_TP, jax.random.key(1), scale=0.1)

    def engine(n, m, build=True, **kw):
        e = Engine(params, CFG_TP, builder, item_ids=items, mesh=make_mesh(MeshSpec(n, m)), user_pages=64,
                   prefix_pages=16, max_candidates=8, **kw)
        if build:
            e.build_store()
        return e
    e1, tp = engine(1, 1), engine(2, 3)
    wq = tp.params["layers"]["wq"]
    assert {s.data.shape for s in wq.addressable_shards} == {(3, 96, 64)}  # 2 of 6 query heads x 32 per device
    assert {s.data.shape[2] for s in tp.store.k.addressable_shards} == {1}  # one KV head per device
    assert {s.data.shape[2] for s in tp.pool.k.addressable_shards} == {1}
    row = tp.weights(1)["layers"]["w_down"]
    assert row.sharding.device_set == set(tp.mesh.devices[1]) and row.addressable_shards[0].data.shape == (3, 64, 96)
    ref, remote = {}, 0
    for i, (r, p) in enumerate(zip(reqs, prompts)):
        for mode in TP_MODES:
            ref[i, mode] = e1.rank(p, mode, user_id=r.user_id).scores
            got = tp.rank(p, mode, user_id=r.user_id)
            assert rel_err(got.scores, ref[i, mode]) <= 1e-5, (i, mode)
            remote += got.remote_item_blocks
    assert remote > 0
    tp.store.exact_fetch = False  # the whole-mesh collective: each device receives its KV head
    for i, (r, p) in enumerate(zip(reqs[:2], prompts[:2])):
        assert rel_err(tp.rank(p, "rcllm", user_id=r.user_id).scores, ref[i, "rcllm"]) <= 1e-5
    tp.store.exact_fetch = True
    batch = [(p, r.user_id, None) for p, r in zip(prompts, reqs)]
    for mode in ("rcllm", "deviation"):
        for g, i in zip(tp.rank_step(batch, mode), range(len(batch))):
            assert rel_err(g.scores, ref[i, mode]) <= 1e-5, ("step", mode)
    # snapshots across model sizes, both ways
    tp.save(tmp_path / "tp")
    e1.save(tmp_path / "one")
    for n, m, snap in ((1, 1, "tp"), (2, 3, "one"), (1, 3, "one")):
        back = engine(n, m, build=False)
        back.restore(tmp_path / snap)
        for i, (r, p) in enumerate(zip(reqs[:2], prompts[:2])):
            assert rel_err(back.rank(p, "rcllm", user_id=r.user_id).scores, ref[i, "rcllm"]) <= 1e-5, (n, m, snap)
    q1, q23 = engine(1, 1, kv_dtype="int8"), engine(2, 3, kv_dtype="int8")
    pk = engine(2, 3, attention_impl="pallas")
    for i, (r, p) in enumerate(zip(reqs[:2], prompts[:2])):
        assert rel_err(q23.rank(p, "rcllm", user_id=r.user_id).scores,
                       q1.rank(p, "rcllm", user_id=r.user_id).scores) <= 1e-5
        for impl in ("interpret", "interpret:gpu"):
            pk.impl = impl
            assert rel_err(pk.rank(p, "stitch", user_id=r.user_id).scores, ref[i, "stitch"]) <= 1e-5, impl


def test_warm_up_on_model3_leaves_rcllm_requests_nothing_to_compile(world):
    """items:2,model:3 after `Engine.warm_up` (serving steps up to 2 per shard): rcllm requests of
    new users (their remote rows fetched per column device, each device's own KV head), one at a
    time and in serving steps, compile nothing, and score as items:1."""
    from conftest import CompileCounter
    builder, reqs, prompts = world
    items = sorted({i for r in reqs for i in r.candidates} | set(range(1, 41)))
    params = init_params(CFG_TP, jax.random.key(1), scale=0.1)
    e1, tp = (Engine(params, CFG_TP, builder, item_ids=items, mesh=make_mesh(MeshSpec(n, m)), user_pages=64,
                     prefix_pages=16, max_candidates=8) for n, m in ((1, 1), (2, 3)))
    for e in (e1, tp):
        e.build_store()
    assert tp.warm_up("rcllm", 8, max_batch=2) > 0
    tp.reset_caches()
    got, remote = [], 0
    with CompileCounter() as c:
        for r, p in zip(reqs, prompts):
            res = tp.rank(p, "rcllm", user_id=r.user_id)
            got.append(res.scores)
            remote += res.remote_item_blocks
    assert remote > 0 and c.count == 0
    tp.reset_caches()
    batch = [(p, r.user_id, None) for p, r in zip(prompts, reqs)]
    with CompileCounter() as c:
        stepped = [g.scores for i in range(0, len(batch), 2) for g in tp.rank_step(batch[i:i + 2], "rcllm")]
    assert c.count == 0, f"{c.count} programs compiled by serving steps after the warm-up"
    for g, s, r, p in zip(got, stepped, reqs, prompts):
        ref = e1.rank(p, "rcllm", user_id=r.user_id).scores
        assert rel_err(g, ref) <= 1e-5 and rel_err(s, ref) <= 1e-5


def test_weight_shardings_split_heads_mlp_and_vocabulary():
    """Megatron-style specs by parameter name on items:2,model:3: projections into heads / MLP
    features split on their output dim, out of them on their input dim, biases with their
    projection, the vocabulary of embed and lm_head; norms whole; an odd vocabulary (49153) whole;
    model:1 everything whole."""
    from jax.sharding import PartitionSpec as P

    from rcllm_jax.parallel.mesh import weight_shardings
    cfg = ModelConfig(arch="qwen2", vocab_size=49152, hidden_size=96, intermediate_size=192, num_layers=2,
                      num_heads=6, num_kv_heads=3, head_dim=16, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    sh = weight_shardings(params, make_mesh(MeshSpec(2, 3)))
    cols, rows, bias = P(None, None, "model"), P(None, "model", None), P(None, "model")
    assert {k: v.spec for k, v in sh["layers"].items()} == {
        "wq": cols, "wk": cols, "wv": cols, "w_gate": cols, "w_up": cols, "wo": rows, "w_down": rows,
        "bq": bias, "bk": bias, "bv": bias, "attn_norm": P(), "mlp_norm": P()}
    assert sh["embed"].spec == P("model", None) and sh["lm_head"].spec == P(None, "model")
    assert sh["final_norm"].spec == P()
    odd = init_params(dataclasses.replace(cfg, vocab_size=49153), jax.random.key(0))
    assert weight_shardings(odd, make_mesh(MeshSpec(2, 3)))["embed"].spec == P()
    assert all(s.spec == P() for s in jax.tree.leaves(weight_shardings(params, make_mesh(MeshSpec(2)))))
