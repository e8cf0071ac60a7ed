"""The workload the multi-host test runs in 2 processes and in 1 (shared so both see the same)."""

import jax

from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import stream_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.engine import Engine
from rcllm_jax.downloads import default_model_path
from rcllm_jax.model import ModelConfig, init_params, load_model

CFG = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)
MODES = ("stitch", "sink", "deviation", "rcllm", "full")


def case():
    tok = load_model(default_model_path(), with_tokenizer=True).tokenizer
    split = LeaveOneOut(load_dataset("ml-100k"))
    builder = PromptBuilder(tok, split.dataset.items, history_len=5)
    reqs = stream_requests(split, num_users=3, requests_per_user=2, num_candidates=8, negatives="retrieval", seed=5)
    items = sorted({i for r in reqs for i in r.candidates} | set(range(1, 33)))
    prompts = [builder.build(r.history, r.candidates) for r in reqs]
    return builder, init_params(CFG, jax.random.key(0), scale=0.1), items, reqs, prompts


def engine_for(params, builder, items, mesh):
    return Engine(params, CFG, builder, item_ids=items, mesh=mesh, user_pages=64, prefix_pages=16, max_candidates=8)
