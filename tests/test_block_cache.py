"""Block KV caching: stitching, selective recompute, prefix caching, history extension.

A tiny random Llama (real SmolLM2 tokenizer vocabulary, real ML-100k prompts) keeps these fast;
references are the plain full prefill (`forward`) and hand-computed selections."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompileCounter, rel_err
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.engine.selective_recompute import Policy, selection_size
from rcllm_jax.model import ModelConfig, forward, init_params
from rcllm_jax.model.rope import inv_freq, rerotate

CFG = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)


@pytest.fixture(scope="module")
def world(smollm2):
    split = LeaveOneOut(load_dataset("ml-100k"))
    params = init_params(CFG, jax.random.key(0), scale=0.1)
    builder = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=6)
    reqs = list(eval_requests(split, num_users=3, num_candidates=8, seed=11))
    prompts = [builder.build(r.history, r.candidates) for r in reqs]
    eng = Engine(params, CFG, builder, item_ids=sorted({i for r in reqs for i in r.candidates}),
                 user_pages=256, prefix_pages=64)
    eng.build_store()
    return eng, reqs, prompts


def full_logits(eng, prompt):
    toks = jnp.asarray(prompt.tokens)[None]
    logits, kv = forward(eng.params, toks, jnp.arange(toks.shape[1])[None], cfg=CFG)
    return np.asarray(logits[0]), kv


def run(eng, prompt, user, policy):
    """The engine's blended prefill of a block-mode request (`Engine.prefill_inputs`), with the
    next token's logits over the whole vocabulary."""
    inputs, lay, _ = eng.prefill_inputs(prompt, policy, user, shard=0)
    assert inputs.n_select == selection_size(lay.forced, lay.cached, lay.valid, policy)
    arrays = list(inputs.arrays)
    arrays[9] = None  # logit_ids: every vocabulary entry
    logits, r, sel, _ = dataclasses.replace(inputs, arrays=tuple(arrays)).run(eng.params)
    return np.asarray(logits), np.asarray(r)[np.asarray(sel)], lay


@pytest.mark.parametrize("policy", [Policy(sink=10 ** 6), Policy(ratio=1.0, check_layer=1),
                                    Policy(ratio=1.0, check_layer=2, deviation_on="v")])
def test_recompute_everything_equals_full_prefill(world, policy):
    eng, reqs, prompts = world
    for req, p in zip(reqs, prompts):
        eng.update_user(req.user_id, p)
        got, _, _ = run(eng, p, req.user_id, policy)
        assert rel_err(got, full_logits(eng, p)[0]) <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_prefix_is_read_in_place_from_its_pool_pages_only(world, impl):
    """The blended prefill reads the user's prefix where it lies in the pool (XLA: by slot, per
    layer; the Pallas path: whole pages through the paged kernel's block table, interpreted here):
    with every other page of the pool NaN (but the scratch page), recompute-everything still equals
    the plain full prefill, for requests of different prefix lengths."""
    from rcllm_jax import kernels
    from rcllm_jax.cache.pool import PAGE
    eng, reqs, prompts = world
    for req, p in zip(reqs, prompts):
        eng.update_user(req.user_id, p)
    saved = (jnp.copy(eng.pool.k), jnp.copy(eng.pool.v), eng.impl)  # writes donate the pool's buffers
    try:
        eng.impl = kernels.resolve(impl)
        keep = np.zeros(eng.pool.k.shape[1], bool)
        keep[:PAGE] = True  # the scratch page: padding rows are gathered from it
        for req in reqs:
            keep[eng.users.slots(req.user_id)] = True
        eng.pool.k = eng.pool.k.at[:, ~keep].set(jnp.nan)
        eng.pool.v = eng.pool.v.at[:, ~keep].set(jnp.nan)
        for req, p in zip(reqs, prompts):
            got, _, _ = run(eng, p, req.user_id, Policy(sink=10 ** 6))
            assert np.isfinite(got).all()
            assert rel_err(got, full_logits(eng, p)[0]) <= 1e-5
    finally:
        eng.pool.k, eng.pool.v, eng.impl = saved


PATHS = [(impl, in_place, deviation, batched) for impl, in_place in (("xla", False), ("pallas", False), ("pallas", True))
         for deviation in (False, True) for batched in (False, True)]


@pytest.mark.parametrize("impl,in_place,deviation,batched", PATHS)
def test_every_attention_path_equals_full_prefill(world, impl, in_place, deviation, batched):
    """The path matrix: kernels (XLA references, Pallas interpreted) x cached rows fetched into a
    suffix buffer or read in place in the block store x selection by a deviation check or by the
    forced rows x one request at a time (`rank`) or a serving step of every request (`rank_step`).
    Recomputing every cached row, each path's scores equal the full prefill's. A deviation check
    needs the cached rows in a buffer: asking for in place then fetches."""
    from rcllm_jax import kernels
    eng, reqs, prompts = world
    policy = Policy(ratio=1.0, check_layer=1) if deviation else Policy(sink=10 ** 6)
    for req, p in zip(reqs, prompts):
        eng.update_user(req.user_id, p)
    want = [eng.rank(p, "full").scores for p in prompts]
    saved = eng.impl
    try:
        eng.impl, eng.read_in_place = kernels.resolve(impl), in_place
        inputs = eng.prefill_inputs(prompts[0], policy, reqs[0].user_id, shard=0)[0]
        assert (inputs.store is not None) == (in_place and impl != "xla" and not deviation)
        if batched:
            got = [r.scores for r in eng.rank_step([(p, r.user_id, 0) for r, p in zip(reqs, prompts)], policy)]
            assert eng.last_step["requests"] == len(prompts) and eng.last_step["in_place"] == (inputs.store is not None)
        else:
            got = [eng.rank(p, policy, r.user_id, shard=0).scores for r, p in zip(reqs, prompts)]
    finally:
        eng.impl, eng.read_in_place = saved, True
    for g, w in zip(got, want):
        assert np.isfinite(g).all()
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-4


def _blocks_encoded_where_they_land(eng, prompt, lay):
    """k, v [L, T, K, H] of the suffix with each block the store serves encoded again: its canonical
    context then the block, run at positions that put the block where it lands in the prompt (no
    stored row, no rotation). Other rows zero."""
    k = np.zeros((CFG.num_layers, len(lay.tokens), CFG.num_kv_heads, CFG.head_dim), np.float32)
    v = np.zeros_like(k)
    for blk, (a, b) in list(zip(prompt.blocks, prompt.spans()))[2:]:
        rows = np.arange(a, b) - lay.n_prefix
        if not lay.cached[rows].any():
            continue
        assert lay.cached[rows].all()
        ctx = list(eng.store.contexts[blk.kind])
        toks = jnp.asarray(ctx + list(blk.tokens))[None]
        _, kv = forward(eng.params, toks, a - len(ctx) + jnp.arange(toks.shape[1])[None], cfg=CFG)
        k[:, rows], v[:, rows] = np.asarray(kv.k[:, 0, len(ctx):]), np.asarray(kv.v[:, 0, len(ctx):])
    return jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cached_rows_read_in_place_equal_blocks_encoded_where_they_land(world, impl):
    """The item and glue rows read where they lie in the block store, the query rotated back by each
    span's offset (the paged kernel, interpreted here; "xla": its pure-JAX reference), give the
    logits of the same prefill fed every cached block encoded again at its real position. Every
    store row the request does not read is NaN; a sink policy splits spans around recomputed rows."""
    from rcllm_jax import kernels
    from rcllm_jax.cache.block_store import PAD
    from rcllm_jax.engine.plan import store_spans
    eng, reqs, prompts = world
    saved = (eng.store.k, eng.store.v, eng.impl)
    try:
        for policy in (Policy(cached_glue=True), Policy(sink=2)):
            for req, p in zip(reqs, prompts):
                eng.update_user(req.user_id, p)
                eng.store.k, eng.store.v, eng.impl = saved
                inputs, lay, _ = eng.prefill_inputs(p, policy, req.user_id, shard=0)
                assert inputs.store is None  # the XLA path fetches
                arrays = list(inputs.arrays)
                arrays[9] = None  # logit_ids: every vocabulary entry
                arrays[10], arrays[11] = _blocks_encoded_where_they_land(eng, p, lay)
                want = dataclasses.replace(inputs, arrays=tuple(arrays)).run(eng.params)[0]
                table, start, length = store_spans(lay, eng.store.shard_slots, PAD)[:3]
                keep = np.zeros(eng.store.k.shape[1], bool)
                for page, a, n in zip(table, start, length):
                    keep[page * PAD + a:page * PAD + a + n] = True
                assert keep.sum() == (lay.cached & lay.valid & ~lay.forced).sum()
                eng.store.k, eng.store.v = (a.at[:, ~keep].set(jnp.nan) for a in saved[:2])
                if impl == "xla":  # the engine's XLA path fetches: ask for the in-place read directly
                    got_inputs = dataclasses.replace(inputs, store=(*eng.store.local_arrays(0),
                                                                    *store_spans(lay, eng.store.shard_slots, PAD)))
                else:
                    eng.impl = kernels.resolve(impl)
                    got_inputs = eng.prefill_inputs(p, policy, req.user_id, shard=0)[0]
                    assert got_inputs.store is not None
                arrays = list(got_inputs.arrays)
                arrays[9:12] = None, None, None
                got = dataclasses.replace(got_inputs, arrays=tuple(arrays)).run(eng.params)[0]
                assert np.isfinite(np.asarray(got)).all()
                assert rel_err(got, want) <= 1e-5
    finally:
        eng.store.k, eng.store.v, eng.impl = saved


def test_store_spans_by_hand():
    """Suffix rows at 100.. served on shard 1 of 64-row shards, read in pages of 8: a block at local
    rows 6..9 crosses a page; a fresh row; a block with its middle row recomputed; a block stored
    right after it with another offset; a fresh row; padding. A row on another shard, or more
    spans than a quarter of the suffix rows: no spans (the request fetches)."""
    from rcllm_jax.engine.plan import Layout, store_spans
    local = np.array([-1, 6, 7, 8, 9, -1, 16, 17, 18, 19, -1] + [-1] * 13)
    canon = np.r_[100, 10, 11, 12, 13, 105, 10, 11, 12, 20, 110, 111 + np.arange(13)]
    lay = Layout(prefix_slots=np.zeros(16, np.int32), prefix_valid=np.ones(16, bool), tokens=np.zeros(24, np.int32),
                 real_pos=100 + np.arange(24, dtype=np.int32), canon_pos=canon,
                 block_slots=np.where(local >= 0, 64 + local, -1), forced=np.isin(np.arange(24), [0, 5, 7, 10]),
                 valid=np.arange(24) < 11, n_prefix=100, n_suffix=11, shard=1)
    table, start, length, pos, delta = store_spans(lay, 64, 8)
    assert table[:5].tolist() == [0, 1, 2, 2, 2] and start[:5].tolist() == [6, 0, 0, 2, 3]
    assert length.tolist() == [2, 2, 1, 1, 1, 0]  # 24 rows: 6 entries
    assert pos[:5].tolist() == [101, 103, 106, 108, 109] and delta[:5].tolist() == [91, 91, 96, 96, 89]
    assert store_spans(dataclasses.replace(lay, block_slots=np.where(local >= 0, local, -1)), 64, 8) is None
    short = {f: getattr(lay, f)[:16] for f in ("tokens", "real_pos", "canon_pos", "block_slots", "forced", "valid")}
    assert store_spans(dataclasses.replace(lay, **short), 64, 8) is None  # 5 spans, 4 entries


def test_rerotated_block_equals_block_encoded_there():
    """Context + block encoded at positions 0.. and at 37.., the first moved by +37 with `rerotate`,
    agree at every layer (RoPE attention depends on relative positions only)."""
    params = init_params(CFG, jax.random.key(1), scale=0.1)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 1000, size=(1, 12)))
    _, kv0 = forward(params, toks, jnp.arange(12)[None], cfg=CFG)
    _, kv1 = forward(params, toks, 37 + jnp.arange(12)[None], cfg=CFG)
    moved = jax.vmap(lambda k: rerotate(k, kv0.pos, kv1.pos, inv_freq(CFG)))(kv0.k)
    assert rel_err(moved, kv1.k) <= 1e-5
    assert rel_err(kv0.v, kv1.v) <= 1e-5


def test_pack_rows_next_fit_in_decreasing_length():
    """Hand-computed: lengths 5, 3, 7, 2, 4 (in order 7, 5, 4, 3, 2) into rows of 9 -> [7], [5, 4], [3, 2]."""
    from rcllm_jax.cache.block_store import pack_rows
    assert pack_rows([5, 3, 7, 2, 4], 9) == [[(2, 0)], [(0, 0), (4, 5)], [(1, 0), (3, 3)]]


def test_packed_build_equals_each_block_encoded_alone(smollm2):
    """Blocks packed many to a row, over several passes: every stored block's KV and embedding
    equal plain `forward` of its context followed by the block alone (nothing packed, no cache)."""
    from rcllm_jax.cache.block_store import to_host
    ds = load_dataset("ml-100k")
    params = init_params(CFG, jax.random.key(3), scale=0.1)
    items = sorted(ds.items)[:40]
    eng = Engine(params, CFG, PromptBuilder(smollm2.tokenizer, ds.items), item_ids=items, max_candidates=4,
                 user_pages=16, prefix_pages=1)
    report = eng.build_store(row_tokens=128, rows=2)
    item_passes = [p for p in report["passes"] if p["kind"] == "item"]
    assert len(item_passes) >= 2 and max(p["blocks"] for p in item_passes) > 2  # packed, several passes
    assert sum(p["tokens"] for p in report["passes"]) == eng.store.num_tokens("item") + eng.store.num_tokens("glue")
    k, v = to_host(eng.store.k), to_host(eng.store.v)
    for kind, blocks in (("item", list(eng.item_blocks.values())), ("glue", eng.glue_blocks)):
        ctx = eng.store.contexts[kind]
        for toks in blocks:
            e = eng.store.lookup(kind, toks)
            seq = jnp.asarray([ctx + tuple(toks)], jnp.int32)
            hid, ref = forward(params, seq, jnp.arange(seq.shape[1])[None], cfg=CFG, return_hidden="all")
            g, c = eng.store.slot(e, 0), len(ctx)
            assert rel_err(k[:, g:g + e.length], np.asarray(ref.k[:, 0, c:])) <= 1e-5
            assert rel_err(v[:, g:g + e.length], np.asarray(ref.v[:, 0, c:])) <= 1e-5
            if kind == "item":
                assert rel_err(eng.store.embeddings[e.key], np.asarray(hid[0, c:]).mean(axis=0)) <= 1e-5


def test_prefix_mode_equals_full_prefill_on_miss_and_hit(world):
    eng, _, prompts = world
    for p in prompts:
        ref = eng.rank(p, "full").scores
        miss = eng.rank(p, "prefix")
        hit = eng.rank(p, "prefix")
        assert hit.cache_hit_tokens >= len(p) - 16 and hit.cache_hit_tokens % 16 == 0
        np.testing.assert_allclose(miss.scores, ref, atol=1e-5)
        np.testing.assert_allclose(hit.scores, ref, atol=1e-5)


def _glue_and_item_offsets(prompt):
    glue, items = [], []
    off = 0
    for b in prompt.blocks[2:]:
        idx = list(range(off, off + len(b.tokens)))
        (glue if b.kind == "glue" else items).append(idx)
        off += len(b.tokens)
    return [i for g in glue for i in g], items


def test_stitch_recomputes_exactly_the_glue(world):
    eng, reqs, prompts = world
    glue, _ = _glue_and_item_offsets(prompts[0])
    eng.update_user(reqs[0].user_id, prompts[0])
    _, chosen, _ = run(eng, prompts[0], reqs[0].user_id, Policy())
    assert chosen.tolist() == glue


def test_sink_adds_the_first_k_tokens_of_each_item_block(world):
    eng, reqs, prompts = world
    glue, items = _glue_and_item_offsets(prompts[1])
    eng.update_user(reqs[1].user_id, prompts[1])
    _, chosen, _ = run(eng, prompts[1], reqs[1].user_id, Policy(sink=2))
    assert sorted(chosen.tolist()) == sorted(glue + [i for blk in items for i in blk[:2]])


def test_deviation_picks_the_tokens_whose_k_deviates_most(world):
    """Reference: full-prefill K at the check layer vs the cached, re-rotated K, ranked in numpy."""
    eng, reqs, prompts = world
    p, user, c = prompts[2], reqs[2].user_id, 1
    eng.update_user(user, p)
    _, chosen, lay = run(eng, p, user, Policy(ratio=0.25, check_layer=c))
    _, kv = full_logits(eng, p)
    n = lay.n_suffix
    fresh = np.asarray(kv.k[c, 0, lay.n_prefix:lay.n_prefix + n])
    block_k = np.asarray(eng.store.k[c])  # the block store, read back whole: [slots, K, H]
    stored = np.where(lay.block_slots[:n, None, None] >= 0, block_k[np.maximum(lay.block_slots[:n], 0)], 0)
    cached = np.asarray(rerotate(jnp.asarray(stored)[None], lay.canon_pos[None, :n],
                                 lay.real_pos[None, :n], inv_freq(CFG))[0])
    dev = ((fresh - cached) ** 2).sum(axis=(1, 2))
    glue, _ = _glue_and_item_offsets(p)
    assert set(glue) <= set(chosen.tolist())
    picked = sorted(set(chosen.tolist()) - set(glue))
    cand = np.where(lay.cached[:n])[0]
    expect = cand[np.argsort(-dev[cand], kind="stable")][:len(picked)]
    assert picked == sorted(expect.tolist())
    assert len(picked) >= int(np.ceil(0.25 * len(cand)))


def test_history_extension_equals_reencoding(world):
    eng, reqs, prompts = world
    b = PromptBuilder(eng.builder.tok, eng.builder.items, history_len=1000)  # growth without sliding
    hist = reqs[0].history[-30:]
    short, longer = b.build(hist[:-2], [1, 2]), b.build(hist, [1, 2])
    assert longer.blocks[1].tokens[:len(short.blocks[1].tokens)] == short.blocks[1].tokens
    eng.update_user(9001, short)
    computed = eng.update_user(9001, longer)
    assert computed == len(longer.blocks[1].tokens) - len(short.blocks[1].tokens)
    assert eng.update_user(9002, longer) == 0  # the same prefix content: shared, nothing computed
    ext = eng.users.slots(9001)
    ext_k, ext_v = np.asarray(eng.pool.k[:, ext]), np.asarray(eng.pool.v[:, ext])
    eng.reset_caches()  # encode it again from nothing
    assert eng.update_user(9002, longer) == len(longer.blocks[0].tokens) + len(longer.blocks[1].tokens)
    fresh = eng.users.slots(9002)
    assert rel_err(ext_k, eng.pool.k[:, fresh]) <= 1e-5
    assert rel_err(ext_v, eng.pool.v[:, fresh]) <= 1e-5
    assert eng.update_user(9002, longer) == 0  # hit


def test_block_cache_of_another_model_or_text_is_not_used(world):
    eng, _, _ = world
    toks = next(iter(eng.item_blocks.values()))
    entry = eng.store.lookup("item", toks)
    assert entry is not None and entry.length == len(toks)
    assert eng.store.lookup("item", toks[:-1]) is None
    saved = eng.store.fingerprint
    eng.store.fingerprint = "another-model"
    try:
        assert eng.store.lookup("item", toks) is None
    finally:
        eng.store.fingerprint = saved


def test_cached_glue_recomputes_only_the_last_token_in_stitch(world):
    eng, reqs, prompts = world
    eng.update_user(reqs[0].user_id, prompts[0])
    _, chosen, lay = run(eng, prompts[0], reqs[0].user_id, Policy(cached_glue=True))
    assert chosen.tolist() == [lay.n_suffix - 1]
    assert lay.cached[:lay.n_suffix - 1].all()


def test_cached_glue_recompute_everything_equals_full(world):
    eng, reqs, prompts = world
    eng.update_user(reqs[1].user_id, prompts[1])
    got, _, _ = run(eng, prompts[1], reqs[1].user_id, Policy(sink=10 ** 6, cached_glue=True))
    assert rel_err(got, full_logits(eng, prompts[1])[0]) <= 1e-5


def test_prefix_cache_lru_respects_its_budget(world):
    from rcllm_jax.cache.pool import PageAllocator
    from rcllm_jax.cache.stores import PrefixCache
    eng, _, _ = world
    pc = PrefixCache(eng.pool, PageAllocator(eng.prefix.alloc.first_slot, 64), "fp", budget_pages=4)
    L, K, H = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
    a, b = np.arange(64), np.arange(1000, 1064)
    kv = jnp.ones((L, 64, K, H))
    pc.insert(a, kv, kv, 0)
    assert pc.lookup(np.append(a, 5))[1] == 64
    pc.insert(b, kv, kv, 0)  # 4 more pages: a's pages are evicted (LRU)
    assert len(pc.pages) == 4 and pc.stats["evictions"] == 4
    assert pc.lookup(np.append(a, 5))[1] == 0 and pc.lookup(np.append(b, 5))[1] == 64


def test_prefix_cache_pages_hold_their_rows_and_new_offsets_compile_nothing():
    """Hand-computed: tokens 0..79 with rows row0 + j of kv holding token start + j; the full
    pages not cached yet are copied from exactly those rows. A second insert at other offsets
    and counts (same kv shape, as many new pages) compiles nothing: the server's prefix
    baselines see a new hit length on nearly every request."""
    from rcllm_jax.cache.pool import PAGE, KVPool, PageAllocator
    from rcllm_jax.cache.stores import PrefixCache
    L, K, H = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
    kv = jnp.asarray(np.random.default_rng(0).normal(size=(L, 100, K, H)), jnp.float32)
    pool = KVPool(CFG, 1 + 16 * PAGE)
    pc = PrefixCache(pool, PageAllocator(1, 16), "fp")
    toks = np.arange(80) + 7
    pc.insert(toks, kv, kv, start=16, n=50, row0=3)  # pages at 16, 32, 48 (64 + 16 > 16 + 50: not full)
    pages, hit = pc.lookup(np.append(toks[:64], 0))
    assert hit == 0  # page 0 (tokens 0..15) was never given: no chain from the start
    hashes = pc.page_hashes(toks)
    assert set(pc.pages) == set(hashes[1:4])
    for i, src in ((1, 3), (2, 19), (3, 35)):
        slot = pc.alloc.first_slot + pc.pages[hashes[i]] * PAGE
        assert np.array_equal(np.asarray(pool.k[:, slot:slot + PAGE]), np.asarray(kv[:, src:src + PAGE]))
        assert np.array_equal(np.asarray(pool.v[:, slot:slot + PAGE]), np.asarray(kv[:, src:src + PAGE]))
    with CompileCounter() as compiles:
        pc.insert(toks + 1000, kv, kv, start=0, n=41, row0=9)  # pages at 0 and 16, from rows 9 and 25
    assert compiles.count == 0
    h2 = pc.page_hashes(toks + 1000)
    assert pc.lookup(np.append(toks[:40] + 1000, 0))[1] == 32
    slot = pc.alloc.first_slot + pc.pages[h2[1]] * PAGE
    assert np.array_equal(np.asarray(pool.k[:, slot:slot + PAGE]), np.asarray(kv[:, 25:25 + PAGE]))


def test_mode_errors(world):
    eng, _, prompts = world
    with pytest.raises(ValueError, match="unknown mode 'warp'"):
        eng.rank(prompts[0], "warp", 1)
    with pytest.raises(ValueError, match="needs the user id"):
        eng.rank(prompts[0], "sink")


def _assert_family_exact(world, cfg, params, others=(), policies=(Policy(sink=10 ** 6),
                                                                    Policy(ratio=1.0, check_layer=1))):
    """The block modes of a model family recomputing everything (stitching cached item blocks
    re-rotated to their positions) equal its full prefill on two real prompts; each configuration
    change in `others` moves the full prefill's logits by more than 1e-3 (so the feature they
    switch off really shapes these prompts)."""
    eng0, reqs, prompts = world
    eng = Engine(params, cfg, eng0.builder, item_ids=sorted({i for r in reqs for i in r.candidates}),
                 user_pages=128, prefix_pages=8)
    eng.build_store()
    for req, p in zip(reqs[:2], prompts[:2]):
        toks = jnp.asarray(p.tokens)[None]
        pos = jnp.arange(toks.shape[1])[None]
        ref = np.asarray(forward(params, toks, pos, cfg=cfg)[0][0])
        for other in others:
            assert rel_err(np.asarray(forward(params, toks, pos, cfg=dataclasses.replace(cfg, **other))[0][0]),
                           ref) > 1e-3, other
        eng.update_user(req.user_id, p)
        for policy in policies:
            got, _, _ = run(eng, p, req.user_id, policy)
            assert rel_err(got, ref) <= 1e-5, policy
        assert rel_err(eng.rank(p, "full").scores, eng.rank(p, "prefix").scores) <= 1e-5


def _random_norms(params, names, seed: int):
    """`params` with the named per-layer norm weights drawn around 1 (so they matter)."""
    keys = jax.random.split(jax.random.key(seed), len(names))
    return dict(params, layers=dict(params["layers"], **{
        n: 1 + 0.3 * jax.random.normal(k, params["layers"][n].shape) for n, k in zip(names, keys)}))


def test_sliding_window_block_modes_equal_full_prefill(world):
    """A Mistral-shaped model whose window (24) is far shorter than the prompt: the block modes
    recomputing everything equal its full prefill (they apply the window like `forward`)."""
    cfg = dataclasses.replace(CFG, arch="mistral", sliding_window=24)
    assert all(len(p) > 4 * cfg.sliding_window for p in world[2][:2])
    _assert_family_exact(world, cfg, init_params(cfg, jax.random.key(2), scale=0.3),
                         others=[dict(sliding_window=None)])


def test_qwen3_block_modes_equal_full_prefill(world):
    """A Qwen3-shaped model (q/k RMS norms per head before RoPE, heads wider than hidden / heads;
    its decoder matches transformers in test_decoder_parity)."""
    cfg = dataclasses.replace(CFG, arch="qwen3", qk_norm=True, head_dim=32)
    _assert_family_exact(world, cfg, _random_norms(init_params(cfg, jax.random.key(3), scale=0.1),
                                                   ("q_norm", "k_norm"), 4))


def test_gemma3_block_modes_equal_full_prefill(world):
    """A Gemma 3-shaped model (embedding scale, GeGLU, norms before and after attention and the MLP,
    q/k norms, query_pre_attn_scalar, sliding layers with window 24 and RoPE base 10^4 between
    global ones at 10^6; its decoder matches transformers in test_decoder_parity), deviation checks
    on a sliding and on a global layer; the Pallas attention path is refused with the missing
    feature named."""
    from rcllm_jax.model.config import UnsupportedModelError
    cfg = dataclasses.replace(CFG, arch="gemma3", qk_norm=True, embed_scale=True, hidden_act="gelu_tanh",
                              sandwich_norm=True, query_scale=24.0, sliding_window=24, rope_theta=1e6,
                              sliding_layers=(True, True, False, True), local_rope_theta=1e4, tie_embeddings=True)
    params = _random_norms(init_params(cfg, jax.random.key(5), scale=0.1),
                           ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"), 6)
    assert all(len(p) > 4 * cfg.sliding_window for p in world[2][:2])
    _assert_family_exact(world, cfg, params,
                         others=[dict(sliding_layers=None, local_rope_theta=None, sliding_window=None),  # window
                                 dict(local_rope_theta=1e6)],  # the sliding layers' own RoPE base
                         policies=(Policy(sink=10 ** 6), Policy(ratio=1.0, check_layer=1),
                                   Policy(ratio=1.0, check_layer=2)))
    with pytest.raises(UnsupportedModelError, match="per-layer sliding / global attention"):
        Engine(params, cfg, world[0].builder, item_ids=[1], attention_impl="pallas")


def test_coarse_buckets_by_hand():
    from rcllm_jax.buckets import coarse_bucket, coarse_buckets
    assert [coarse_bucket(n) for n in (1, 16, 17, 32, 33, 600)] == [16, 16, 32, 32, 64, 1024]
    assert coarse_bucket(3, 1) == 4 and coarse_bucket(1, 1) == 1
    assert coarse_buckets(50, 631) == [64, 128, 256, 512, 1024]
    assert coarse_buckets(3, 3) == [16] and coarse_buckets(5, 4) == []
    from rcllm_jax.buckets import buckets_between
    assert buckets_between(17, 41) == [20, 24, 28, 32, 40, 48] and buckets_between(2, 9) == [16]


def test_new_history_length_inside_a_bucket_compiles_nothing(world):
    """User-store prefixes are computed in chunks over a power-of-two bucket of what is cached:
    once a bucket's programs exist, a history of another length in the same bucket computes its
    prefix without compiling (counted by JAX's compile events)."""
    eng, reqs, _ = world
    b = PromptBuilder(eng.builder.tok, eng.builder.items, history_len=1000)
    hist = list(reqs[0].history[-40:])
    from rcllm_jax.buckets import bucket
    lengths = {}
    for n in range(3, len(hist)):
        pre = b.build(hist[:n], [1]).blocks
        lengths.setdefault(bucket(len(pre[0].tokens) + len(pre[1].tokens), 16), []).append(n)
    ns = next(v for v in lengths.values() if len(v) >= 2)[:2]  # two lengths in one bucket
    eng.update_user(7001, b.build(hist[:ns[0]], [1]))  # warms the bucket's programs
    with CompileCounter() as compiles:
        assert eng.update_user(7002, b.build(hist[:ns[1]], [1])) > 0
    assert compiles.count == 0


def test_cache_hit_tokens_leave_out_a_prefix_just_computed(world):
    eng, reqs, prompts = world
    p, user = prompts[0], 8801
    eng.reset_caches()  # (prefixes are shared by content: an earlier test's request may hold this one)
    miss = eng.rank(p, "stitch", user)  # the user's prefix is computed by this request
    hit = eng.rank(p, "stitch", user)
    n_prefix = len(p.blocks[0].tokens) + len(p.blocks[1].tokens)
    assert hit.cache_hit_tokens - miss.cache_hit_tokens == n_prefix
    assert miss.cache_hit_tokens == miss.cached_block_tokens - miss.recomputed_block_tokens
    assert miss.computed_tokens - hit.computed_tokens == n_prefix


def test_check_layer_without_ratio_is_refused():
    with pytest.raises(ValueError, match="check layer needs a deviation ratio"):
        Policy(check_layer=1)


@pytest.mark.parametrize("spec,mesh_shape", [((None, "items"), (8, 1)), ((None, "items", "model"), (2, 4)),
                                             (("items",), (8, 1)), ((), (8, 1)), ((None, "model"), (2, 4))])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8])
def test_host_copies_of_sharded_arrays_are_their_bytes(spec, mesh_shape, dtype, monkeypatch):
    """`to_host` and the snapshot digest of a sharded array, read a few rows at a time from its
    shards (replicas once), equal the host array it was made from and the sha256 of its bytes."""
    import hashlib

    from jax.sharding import NamedSharding, PartitionSpec

    from rcllm_jax.cache import block_store
    from rcllm_jax.cache.snapshot import _digest
    monkeypatch.setattr(block_store, "SLAB_BYTES", 3 * 24 * 4 * 6)  # ~3 leading rows a slab: pieces straddle
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(mesh_shape), ("items", "model"))
    host = (np.random.default_rng(0).standard_normal((16, 24, 4, 6)) * 50).astype(dtype)
    a = jax.device_put(host, NamedSharding(mesh, PartitionSpec(*spec)))
    assert np.array_equal(block_store.to_host(a).view(np.uint8), host.view(np.uint8))
    assert _digest(a) == hashlib.sha256(host.tobytes()).hexdigest()
    scalar = jax.device_put(host[1, 2, 3, 4], NamedSharding(mesh, PartitionSpec()))
    assert _digest(scalar) == hashlib.sha256(host[1, 2, 3, 4].tobytes()).hexdigest()


def test_digest_and_host_copy_leave_no_host_copy_on_the_array():
    """A 256 MB sharded array digested and copied to the host (as a snapshot save and a relayout
    do) holds no host copy of itself afterwards: the process's resident memory is back within
    32 MB (`np.asarray` of a jax.Array caches one on it: +256 MB until the array is dropped)."""
    import gc

    from jax.sharding import NamedSharding, PartitionSpec

    from rcllm_jax.cache.block_store import to_host
    from rcllm_jax.cache.snapshot import _digest

    import ctypes

    def rss_mb():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory the allocator kept goes back first
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("items",))
    make = jax.jit(lambda x: jnp.full((16, 4096, 1024), x, jnp.float32),
                   out_shardings=NamedSharding(mesh, PartitionSpec(None, "items")))
    warm = make(2.0)
    _digest(warm), to_host(warm)  # compile the slab programs of this shape first, on another array
    del warm
    a = jax.block_until_ready(make(1.0))
    before = rss_mb()
    _digest(a)
    h = to_host(a)
    assert h.shape == a.shape and h[-1, -1, -1] == 1
    del h
    grew = rss_mb() - before
    assert grew < 32, f"{grew:.0f} MB more resident after a digest and a host copy"
