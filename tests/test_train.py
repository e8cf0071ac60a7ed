"""Fine-tuning: block-aware attention is the engine's stitching, loss falls, exact resume,
adapters and merged exports load where they should and are refused where they should not.

Tiny random Llama over the real SmolLM2 tokenizer and real ML-100k prompts; references: the
engine's block cache path (`Engine.rank` with a `Policy`), full prefill, transformers for the export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, require
from rcllm_jax.cache.keys import model_fingerprint
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.engine.selective_recompute import Policy
from rcllm_jax.engine.plan import stitched_masks
from rcllm_jax.model import ModelConfig, forward, init_params, load_model
from rcllm_jax.model.lora import AdapterMismatchError, apply_adapter
from rcllm_jax.train.data import prompt_arrays
from rcllm_jax.train.step import Spec, loss_fn, make_eval_step, trainable_init
from rcllm_jax.train.trainer import CheckpointMismatchError, FineTuneSettings, Trainer

CFG = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096,
                  tie_embeddings=True)
# Gemma 3-shaped: sliding layers (window 24, RoPE base 1e4) around a global one (1e6), GeGLU,
# sandwich norms, q/k norms, query_pre_attn_scalar
GEMMA = dataclasses.replace(CFG, arch="gemma3", qk_norm=True, embed_scale=True, hidden_act="gelu_tanh",
                            sandwich_norm=True, query_scale=24.0, sliding_window=24, rope_theta=1e6,
                            sliding_layers=(True, False, True, True), local_rope_theta=1e4)
SMALL = FineTuneSettings(steps=6, batch_size=2, micro_batch=1, lr=3e-3, warmup=2, lora_rank=4, train_layers=2,
                    history_len=4, num_candidates=6, max_len=256, block_attention_prob=0.5,
                    checkpoint_every=2, val_every=0, val_users=0)


@pytest.fixture(scope="module")
def world(smollm2):
    split = LeaveOneOut(load_dataset("ml-100k"))
    params = init_params(CFG, jax.random.key(0), scale=0.1)
    return smollm2.tokenizer, split, params


def _batch(rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


@pytest.mark.parametrize("cached_glue, cfg", [(False, CFG), (True, CFG), (False, GEMMA)],
                         ids=["llama", "llama-cached-glue", "gemma3"])
def test_block_attention_is_the_engines_stitching(world, cached_glue, cfg):
    """One training pass with the block-aware mask gives the candidate scores of the engine's
    stitched prefill (block stores, re-rotation, selective recompute) with item blocks encoded
    after the instruction alone, the context the label trainer's block path models; plain examples
    give full prefill. Gemma 3: per layer, the window and the RoPE base of that layer."""
    tok, split, params = world
    if cfg is not CFG:
        params = init_params(cfg, jax.random.key(0), scale=0.1)
    builder = PromptBuilder(tok, split.dataset.items, history_len=6)
    reqs = list(eval_requests(split, num_users=3, num_candidates=8, seed=11))
    eng = Engine(params, cfg, builder, item_ids=sorted({i for r in reqs for i in r.candidates}),
                 canonical="instruction", user_pages=256, prefix_pages=64)
    eng.build_store()
    spec = Spec(cfg, 2, None, 128)  # frozen lower layers on the path too
    ev = make_eval_step(spec)
    tr = trainable_init(params, spec, jax.random.key(1))
    for r in reqs:
        p = builder.build(r.history, r.candidates)
        stitched = eng.rank(p, Policy(cached_glue=cached_glue), r.user_id).scores
        full = eng.rank(p, "full").scores
        rows = [prompt_arrays(p, r.target_index, 512, block=b, cached_glue=cached_glue) for b in (True, False)]
        got = np.asarray(jax.nn.log_softmax(ev(tr, params, _batch(rows)), axis=-1))
        assert rel_err(got[0], stitched) <= 1e-5
        assert rel_err(got[1], full) <= 1e-5
        assert np.abs(stitched - full).max() > 1e-2  # stitching really differs here

        # the engine's layout and the training arrays come from one plan
        _, lay, _ = eng.prefill_inputs(p, Policy(cached_glue=cached_glue), r.user_id)
        a, n, s = rows[0], lay.n_prefix, lay.n_suffix
        assert np.array_equal(lay.canon_pos[:s] - lay.canon_pos[:s] * 0, a["canon_pos"][n:n + s])
        assert np.array_equal(lay.cached[:s], a["seg"][n:n + s] > 0)
        assert np.array_equal(lay.forced[:s], a["forced"][n:n + s])


def test_block_mask_by_hand(world):
    """An item token sees the instruction and its own block's earlier tokens; the answer position
    sees every earlier token; the history sees the instruction and itself."""
    tok, split, _ = world
    builder = PromptBuilder(tok, split.dataset.items, history_len=3)
    hist = split.history(split.users[0])
    p = builder.build(hist, [1, 2, 3])
    a = prompt_arrays(p, 0, 256, block=True, cached_glue=False)
    real = np.arange(256)[None]
    cpos = np.where(a["forced"], real[0], a["canon_pos"])[None]
    block, glob = stitched_masks(jnp.asarray(real), jnp.asarray(cpos), jnp.asarray(a["seg"][None]),
                                 jnp.asarray(a["forced"][None]), jnp.asarray(a["valid"][None]))
    mask = np.asarray(block | glob)[0]
    spans = p.spans()
    n_instr = spans[0][1]
    h0, h1 = spans[1]
    item = next(j for j, b in enumerate(p.blocks) if b.kind == "item")
    i0, i1 = spans[item]
    t = i0 + 2
    assert set(np.flatnonzero(mask[t])) == set(range(n_instr)) | set(range(i0, t + 1))
    assert set(np.flatnonzero(mask[h1 - 1])) == set(range(h1))
    assert set(np.flatnonzero(mask[len(p) - 1])) == set(range(len(p)))
    g0, _ = spans[item + 1]  # the next label glue: fresh, sees everything before it
    assert set(np.flatnonzero(mask[g0])) == set(range(g0 + 1))


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_loss_falls(world, lora_rank):
    """A few steps on a handful of examples: the loss on those examples falls (LoRA and full)."""
    tok, split, params = world
    params = {**params, "embed": params["embed"] * 4}  # logits with room to move (tied, frozen head)
    cfg = dataclasses.replace(SMALL, steps=20, lr=1e-2, lora_rank=lora_rank, checkpoint_every=0)
    pairs = [(split.users[0], 5), (split.users[1], 6), (split.users[2], 4), (split.users[3], 7)]
    tr = Trainer(params, CFG, tok, split, cfg, pairs=pairs, fingerprint="tiny")
    it = iter(tr.dataset)
    b1, b2 = next(it), next(it)
    fixed = {k: jnp.concatenate([jnp.asarray(b1[k]), jnp.asarray(b2[k])]) for k in b1}
    before = float(loss_fn(tr.state["trainable"], params, fixed, tr.spec)[0])
    tr.run(progress=False)
    after = float(loss_fn(tr.state["trainable"], params, fixed, tr.spec)[0])
    assert after < 0.6 * before, (before, after)


def test_resume_is_bit_identical(world, tmp_path):
    tok, split, params = world
    pairs = [(u, 4) for u in split.users[:16]]
    a = Trainer(params, CFG, tok, split, SMALL, pairs=pairs, checkpoint_dir=tmp_path / "a", fingerprint="tiny")
    a.run(progress=False)
    b = Trainer(params, CFG, tok, split, SMALL, pairs=pairs, checkpoint_dir=tmp_path / "b", fingerprint="tiny")
    b.run(progress=False, stop_after=3)  # interrupted after step 3; last checkpoint: step 2
    assert b.step == 3
    del b
    c = Trainer(params, CFG, tok, split, SMALL, pairs=pairs, checkpoint_dir=tmp_path / "b", fingerprint="tiny")
    assert c.step == 2
    c.run(progress=False)
    assert c.step == a.step == SMALL.steps
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(c.state)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # the stream went on from where it stopped: the next batch is the same too
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(next(a.iterator)),
                                                     jax.tree.leaves(next(c.iterator))))
    with pytest.raises(CheckpointMismatchError, match="lr"):
        Trainer(params, CFG, tok, split, dataclasses.replace(SMALL, lr=1e-4), pairs=pairs,
                checkpoint_dir=tmp_path / "a", fingerprint="tiny")
    with pytest.raises(CheckpointMismatchError, match="base model"):
        Trainer(params, CFG, tok, split, SMALL, pairs=pairs, checkpoint_dir=tmp_path / "a", fingerprint="other")


def test_export_adapter_and_fingerprints(world, tmp_path):
    tok, split, params = world
    cfg = dataclasses.replace(SMALL, steps=3, checkpoint_every=0)
    tr = Trainer(params, CFG, tok, split, cfg, pairs=[(u, 4) for u in split.users[:8]])
    tr.run(progress=False)
    paths = tr.export(tmp_path / "out")
    merged = tr.merged()
    loaded = load_model(paths["merged"])
    assert loaded.cfg == CFG
    assert loaded.tokenizer.encode("Toy Story (1995)") == tok.encode("Toy Story (1995)")
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(loaded.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    base_fp = model_fingerprint(params, CFG)
    assert tr.fingerprint == base_fp
    adapted = apply_adapter(params, CFG, paths["adapter"], base_fp)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(adapted)):
        assert rel_err(x, y) <= 1e-6
    # the tuned model's caches are its own: no block of the base model matches
    tuned_fp = model_fingerprint(loaded.params, loaded.cfg)
    assert tuned_fp != base_fp
    builder = PromptBuilder(tok, split.dataset.items, history_len=2)
    e_base = Engine(params, CFG, builder, item_ids=[1, 2], user_pages=8, prefix_pages=8)
    e_tuned = Engine(loaded.params, CFG, builder, item_ids=[1, 2], user_pages=8, prefix_pages=8)
    assert e_tuned.fingerprint == tuned_fp
    e_base.build_store()
    assert e_base.store.lookup("item", builder.item_block(1).tokens) is not None
    assert all(e_base.store.key("item", b.tokens) != e_tuned.store.key("item", b.tokens) for b in map(builder.item_block, (1, 2)))
    # an adapter is refused on other base weights
    other = init_params(CFG, jax.random.key(5), scale=0.1)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        apply_adapter(other, CFG, paths["adapter"], model_fingerprint(other, CFG))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model(paths["merged"], adapter=tmp_path)


def test_export_loads_in_transformers(tmp_path):
    """The merged-model directory is a valid HF checkpoint: transformers reads it and computes the
    same logits (GQA, untied head, llama3 RoPE scaling)."""
    torch = require("torch")
    transformers = require("transformers")
    from rcllm_jax.model.config import RopeScaling
    from rcllm_jax.model.export import save_hf_dir
    cfg = dataclasses.replace(CFG, vocab_size=300, tie_embeddings=False, num_kv_heads=1,
                              rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position=64))
    params = init_params(cfg, jax.random.key(3), scale=0.2)
    save_hf_dir(tmp_path / "m", params, cfg)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    toks = np.random.default_rng(0).integers(0, 300, (1, 40))
    with torch.no_grad():
        want = ref(torch.tensor(toks)).logits.numpy()
    got, _ = forward(params, jnp.asarray(toks), jnp.arange(40)[None], cfg=cfg, all_logits=True)
    assert rel_err(got, want) <= 1e-4


def test_popularity_teacher_and_its_loss(world):
    """The soft target follows training-split popularity; the loss mixes it with the label's CE."""
    from rcllm_jax.train.data import popularity_teacher
    tok, split, params = world
    cands = sorted(split.popularity, key=split.popularity.get)[-3:] + [max(split.dataset.items) + 1]
    t = popularity_teacher(cands, split.popularity, 2.0)
    assert abs(t.sum() - 1) < 1e-6 and np.all(np.diff(t[:3]) >= 0) and t[3] == t.min()
    counts = np.array([split.popularity.get(c, 0) for c in cands], float)
    want = np.sqrt(1 + counts) / np.sqrt(1 + counts).sum()
    assert np.allclose(t, want, rtol=1e-5)
    # loss = (1 - w) * label CE + w * soft CE over the candidate labels, checked by hand
    builder = PromptBuilder(tok, split.dataset.items, history_len=3)
    u = split.users[0]
    p = builder.build(split.history(u)[:3], cands[:3])
    row = prompt_arrays(p, 1, 256, block=False, cached_glue=False, teacher=t[:3] / t[:3].sum())
    spec = Spec(CFG, 2, None, 64, teacher_weight=0.3)
    tr = trainable_init(params, spec, jax.random.key(0))
    batch = _batch([row])
    got = float(loss_fn(tr, params, batch, spec)[0])
    logits = np.asarray(make_eval_step(dataclasses.replace(spec, teacher_weight=0.0))(tr, params, batch))[0]
    full_logits, _ = forward(params, jnp.asarray(p.tokens)[None], jnp.arange(len(p))[None], cfg=CFG)
    lse = float(jax.nn.logsumexp(full_logits[0]))
    label_ce = lse - float(full_logits[0, row["label"]])
    soft = -float(np.sum(row["teacher"] * np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))))
    assert abs(got - (0.7 * label_ce + 0.3 * soft)) <= 1e-4 * abs(got)
