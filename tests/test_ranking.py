"""Candidate ranking vs transformers on the real model: first-token scores for letter labels and
teacher-forced sequence scores for multi-token labels."""

import numpy as np
import pytest

from conftest import require
from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests
from rcllm_jax.data.prompt import PromptBuilder
from rcllm_jax.engine.ranking import rank_full

torch = require("torch")
tf = require("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(smollm2, smollm2_path):
    split = LeaveOneOut(load_dataset("ml-100k"))
    hf = tf.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32).eval()
    return split, PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=3), hf


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.as_tensor([ids])).logits[0].double(), -1).numpy()


def test_letter_labels_rank_by_first_token(smollm2, setup):
    split, builder, hf = setup
    req = next(iter(eval_requests(split, num_candidates=12, num_users=1, seed=5)))
    p = builder.build(req.history, req.candidates)
    res = rank_full(smollm2.params, smollm2.cfg, p)
    lp = hf_logprobs(hf, p.tokens.tolist())[-1][[lt[0] for lt in p.label_tokens]]
    ref = lp - np.logaddexp.reduce(lp)
    np.testing.assert_allclose(res.scores, ref, atol=2e-4)
    assert res.order.tolist() == np.argsort(-ref, kind="stable").tolist()


def test_multi_token_labels_match_per_label_teacher_forcing(smollm2, setup):
    """60 candidates -> labels 1..60; reference: transformers teacher-forces each label's tokens
    + ')' after the prompt (its own KV cache of the prompt, cropped back after each label),
    summing the token log-probs."""
    split, builder, hf = setup
    req = next(iter(eval_requests(split, num_candidates=60, num_users=1, seed=6)))
    p = builder.build(req.history, req.candidates)
    assert not p.single_token_labels
    res = rank_full(smollm2.params, smollm2.cfg, p)
    base = p.tokens.tolist()
    with torch.no_grad():
        out = hf(torch.as_tensor([base]), use_cache=True)
        past, last = out.past_key_values, torch.log_softmax(out.logits[0, -1].double(), -1)
        ref = []
        for lt in p.label_tokens:
            seq = list(lt) + [p.close_token]
            lp = torch.log_softmax(hf(torch.as_tensor([seq]), past_key_values=past, use_cache=True).logits[0].double(), -1)
            past.crop(-len(seq))  # back to the prompt alone
            ref.append(float(last[seq[0]]) + sum(float(lp[i, t]) for i, t in enumerate(seq[1:])))
    ref = np.array(ref) - np.logaddexp.reduce(ref)
    np.testing.assert_allclose(res.scores, ref, atol=5e-4)
    assert res.computed_tokens == len(p) + sum(len(lt) for lt in p.label_tokens)


def test_too_long_for_the_model_is_refused(smollm2, setup):
    split, builder, _ = setup
    p = builder.build([1], [2, 3])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        rank_full(smollm2.params, smollm2.cfg.replace(max_position=8), p)
