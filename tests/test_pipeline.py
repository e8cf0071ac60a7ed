"""The grain request stream: seeded, deterministic, resumable from iterator state."""

import numpy as np
import pytest

from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.pipeline import eval_requests


@pytest.fixture(scope="module")
def split():
    return LeaveOneOut(load_dataset("ml-100k"))


def test_stream_is_seeded_and_complete(split):
    a = list(eval_requests(split, num_users=30, seed=1))
    assert a == list(eval_requests(split, num_users=30, seed=1))
    assert [r.user_id for r in a] != [r.user_id for r in eval_requests(split, num_users=30, seed=2)]
    everyone = list(eval_requests(split, seed=1))
    assert sorted(r.user_id for r in everyone) == sorted(split.users)
    for r in a:
        assert r.target == split.target(r.user_id) and r.history == split.history(r.user_id)
        assert r.candidates[r.target_index] == r.target and len(r.candidates) == 20


def test_iterator_state_resumes_exactly(split):
    ds = eval_requests(split, num_users=12, seed=3, stage="valid")
    it = iter(ds)
    head = [next(it) for _ in range(5)]
    state = it.get_state()
    rest = list(it)
    resumed = iter(ds)
    resumed.set_state(state)
    assert list(resumed) == rest
    assert head + rest == list(ds)
    assert all(r.target == split.target(r.user_id, "valid") for r in rest)


def test_stream_grows_histories_and_refreshes_candidates(split):
    from rcllm_jax.data.pipeline import stream_requests
    reqs = stream_requests(split, num_users=20, requests_per_user=4, seed=2)
    assert len(reqs) == 80
    by_user = {}
    for r in reqs:
        by_user.setdefault(r.user_id, []).append(r)
    growths = []
    for u, rs in by_user.items():
        assert len(rs) == 4
        seq = split.dataset.sequences[u]
        assert rs[-1].target == split.target(u) and rs[-1].history == split.history(u)
        for a, b in zip(rs, rs[1:]):
            assert b.history[:len(a.history)] == a.history  # histories only grow
            growths.append(len(b.history) - len(a.history))
            assert a.candidates != b.candidates
        for r in rs:
            assert r.target == seq[len(r.history)] and r.target in r.candidates
    assert set(growths) <= {0, 1, 2} and 0.3 < np.mean([g > 0 for g in growths]) < 0.7
    assert reqs == stream_requests(split, num_users=20, requests_per_user=4, seed=2)


def test_request_log_is_checked_line_by_line(split, tmp_path):
    import json

    from rcllm_jax.data.pipeline import read_request_log
    items = split.dataset
    good = [{"user_id": "a", "history": [1, "2"], "candidates": [3, 4], "target": 4},  # "2": item 2
            {"user_id": 7, "history": [], "candidates": [5]}]
    p = tmp_path / "log.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in good) + "\n")
    reqs = read_request_log(p, items)
    assert [(r.user_id, r.history, r.candidates, r.target, r.target_index) for r in reqs] == [
        ("a", (1, 2), (3, 4), 4, 1), (7, (), (5,), None, None)]
    cases = {'{"user_id": 1, "history": [1]}': "missing ['candidates']",
             "not json": "not JSON",
             '[1, 2]': "a request is a JSON object",
             '{"user_id": 1, "history": [1], "candidates": [2, 2]}': "duplicate candidates: [2]",
             '{"user_id": 1, "history": [99999], "candidates": [2]}': "unknown item 99999 in history",
             '{"user_id": 1, "history": ["x-1"], "candidates": [2]}': "unknown item 'x-1' in history",
             '{"user_id": 1, "history": [1], "candidates": [2.0]}': "candidates must be a list of item ids",
             '{"user_id": 1, "history": [1], "candidates": [2], "score": 1}': "unknown fields ['score']",
             '{"user_id": true, "history": [1], "candidates": [2]}': "user_id must be",
             '{"user_id": 1, "history": [1], "candidates": [2], "target": 99999}': "target must be a known item"}
    for line, msg in cases.items():
        p.write_text(json.dumps(good[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"log.jsonl:2: .*{__import__('re').escape(msg)}"):
            read_request_log(p, items)
    p.write_text(json.dumps({**good[0], "arrival_s": 1.0}) + "\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match="on every line or on none"):
        read_request_log(p, items)


def test_heldout_positions_use_only_data_before_each_target(split):
    """--test_positions: one request per user and position; the p-th item from the end is the
    target, everything before it the history, and the candidates come from a retriever fitted on
    every user's sequence cut before p, so it never saw any test target at or after p."""
    from rcllm_jax.data.pipeline import heldout_requests
    from rcllm_jax.retrieval import ItemKNN, fit_before, item_texts
    seqs = split.dataset.sequences
    texts = item_texts(split.dataset)
    retr = {p: fit_before(split, p) for p in (1, 2, 3)}
    reqs, pos = heldout_requests(split, (2, 1, 3), num_users=25, num_candidates=20, retrievers=retr, seed=5,
                                 order="retriever")
    assert len(reqs) == 75 and pos == [3] * 25 + [2] * 25 + [1] * 25  # largest first: histories grow
    users = [r.user_id for r in eval_requests(split, num_users=25, seed=5)]
    assert [r.user_id for r in reqs[:25]] == users == [r.user_id for r in reqs[50:]]
    for r, p in zip(reqs, pos):
        assert r.history == tuple(seqs[r.user_id][:-p]) and r.target == seqs[r.user_id][-p]
        assert r.candidates == retr[p].retrieve(r.history, 20)[0]
    for p in (1, 3):  # the same data fitted independently
        ref = ItemKNN.fit([s[:-p] for u, s in seqs.items() if u in set(split.users)], sorted(split.dataset.items),
                          texts=texts)
        assert ref.digest == retr[p].digest
    train = ItemKNN.fit([split.train_sequence(u) for u in split.users], sorted(split.dataset.items), texts=texts)
    assert fit_before(split, 2).digest == train.digest  # position 2 = the leave-one-out training split
    # sampled negatives at a position: the target among them
    sampled, _ = heldout_requests(split, (2,), num_users=5, num_candidates=10, seed=1)
    assert all(r.target in r.candidates and len(r.candidates) == 10 for r in sampled)
    with pytest.raises(ValueError, match=">= 1"):
        heldout_requests(split, (0,), num_users=2)


def test_parse_positions_by_hand():
    """The one parser of held-back positions (bench.py --test_positions, train.py --positions,
    bench_retrieval.py): a range or a list, distinct and ascending; bad specs are named."""
    from rcllm_jax.data.pipeline import parse_positions
    assert parse_positions("1-3") == (1, 2, 3)
    assert parse_positions("5,3,5") == (3, 5)
    assert parse_positions("4") == (4,)
    for bad, msg in (("a-b", "comma list of integers"), ("1-2-3", "comma list"), ("0-2", "1 = the last item"),
                     ("3-1", "1 = the last item"), ("", "comma list")):
        with pytest.raises(ValueError, match=msg):
            parse_positions(bad)
