"""The memory plan of 8B-class models (`eval/scaling.py`): parameter counts against the arrays
`init_params` really allocates, bytes per device against a hand-computed case, the KV-head split
under GQA, the smallest mesh against a brute-force search, and the launcher end to end."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rcllm_jax.eval.scaling import kv_share, memory_per_device, smallest_mesh
from rcllm_jax.model import ModelConfig
from rcllm_jax.model.config import param_counts, shape_preset
from rcllm_jax.model.decoder import init_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [{}, {"qkv_bias": True}, {"arch": "qwen3", "qk_norm": True},
                                   {"tie_embeddings": True}])
def test_param_counts_are_what_init_params_allocates(extra):
    cfg = ModelConfig(**{"arch": "llama", "vocab_size": 40, "hidden_size": 24, "intermediate_size": 36,
                         "num_layers": 3, "num_heads": 6, "num_kv_heads": 2, "head_dim": 4, **extra})
    allocated = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(init_params(cfg, jax.random.key(0))))
    assert sum(param_counts(cfg).values()) == allocated


def test_presets_have_their_published_sizes():
    assert round(sum(param_counts(shape_preset("llama3-8b")).values()) / 1e9, 2) == 8.03  # Llama-3-8B: 8.03B
    assert round(sum(param_counts(shape_preset("qwen3-8b")).values()) / 1e9, 1) == 8.2  # Qwen3-8B: 8.2B
    short = shape_preset("llama3-8b", layers=2)
    assert short.num_layers == 2 and (short.hidden_size, short.num_kv_heads, short.head_dim) == (4096, 8, 128)
    with pytest.raises(ValueError, match="presets"):
        shape_preset("gpt-9")


def test_kv_heads_split_whole():
    cfg = shape_preset("llama3-8b", layers=1)  # 8 KV heads
    assert kv_share(cfg, 4) == 1 / 4 and kv_share(cfg, 8) == 1 / 8
    odd = ModelConfig(arch="llama", vocab_size=8, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=6,
                      num_kv_heads=3, head_dim=2)
    assert kv_share(odd, 3) == 1 / 3
    for model in (2, 6):  # what the engine refuses too (mesh.check_model_axis)
        with pytest.raises(ValueError, match="does not divide the 3 KV heads"):
            kv_share(odd, model)
    with pytest.raises(ValueError, match="query heads"):
        memory_per_device(odd, 1, 4, catalog_tokens=1, users=1, user_tokens=1)


def test_bytes_per_device_by_hand():
    """L 2, D 8, N 4, K 2, H 2, F 16, V 10, untied, bf16 weights, int8 KV, items:3,model:2."""
    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=2)
    m = memory_per_device(cfg, 3, 2, catalog_tokens=600, users=5, user_tokens=40, kv_dtype="int8", replicate=0.5)
    heads, kv, mlp, vocab, norms = 2 * 2 * 8 * 8, 2 * 2 * 8 * 4, 2 * 3 * 8 * 16, 2 * 10 * 8, 2 * 2 * 8 + 8
    assert m["weights"] == 2 * ((heads + kv + mlp + vocab) / 2 + norms)
    bpt = 2 * 2 * 2 * 2 * 1 + 2 * 2 * 2 * 4  # K and V x layers x KV heads x head dim int8, + f32 scales
    assert m["kv_bytes_per_token"] == bpt
    assert m["item_cache"] == pytest.approx(600 * 1.5 * bpt / 2 / 3)
    assert m["user_store"] == pytest.approx(5 * 40 * bpt / 2)
    assert m["total"] == pytest.approx(m["weights"] + m["item_cache"] + m["user_store"])


def test_smallest_mesh_is_the_fewest_devices_that_fit():
    cfg = shape_preset("llama3-8b")
    kw = dict(catalog_tokens=2_400_000, users=120, user_tokens=730, kv_dtype="bfloat16")
    for gb in (16.0, 80.0):
        n, m = smallest_mesh(cfg, gb, **kw)
        assert memory_per_device(cfg, n, m, **kw)["total"] <= 0.9 * gb * 1e9
        for mm in (1, 2, 4, 8):  # the divisors of its 8 KV heads
            for nn in range(1, (n * m) // mm + 1):
                if nn * mm < n * m or (nn * mm == n * m and mm < m):
                    assert memory_per_device(cfg, nn, mm, **kw)["total"] > 0.9 * gb * 1e9, (nn, mm)
    assert smallest_mesh(cfg, 0.001, max_devices=4, **kw) is None


def test_memory_plan_launcher(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "memory_plan.py"), "--presets=llama3-8b",
                        "--kv_dtypes=int8", "--meshes=items:2,model:4", "--catalog_scale=1", "--users=3",
                        f"--output_json={out}"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    (row,) = d["meshes"]
    assert row["mesh"] == "items:2,model:4" and row["devices"] == 8 and d["config"]["users"] == 3
    assert d["config"]["catalog_tokens"] > 1682 * 5  # every ML-100k item block, measured by the tokenizer
    assert {x["device"] for x in d["smallest_mesh"]} == {"H100 80GB", "H200", "TPU v5e", "TPU v5p"}
