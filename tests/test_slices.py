"""The cold-start slices (`data/slices.py`) on a hand-made dataset with interaction times: which
items are new, which users are held out, what each fitted model may see, and each request's slice,
all worked out by hand."""

import pytest

from rcllm_jax.data.movielens import Dataset, Item
from rcllm_jax.data.slices import ColdSplit, choose_cold, fitting_sequences, in_slice, slice_requests


def _dataset():
    items = {i: Item(i, f"item {i}", None, ()) for i in range(1, 11)}
    # first interactions: item i at time i (items 9 and 10 last: with fraction 0.2 of 10, the new items)
    seqs = {1: (1, 2, 3, 9, 4), 2: (2, 3, 4, 5, 10), 3: (5, 6, 7, 8, 1), 4: (1, 2, 6, 3, 7)}
    times = {1: (1, 2, 3, 9, 12), 2: (2.5, 3.5, 4, 5, 10), 3: (5.5, 6, 7, 8, 13), 4: (1.5, 2.6, 6.5, 11, 14)}
    return Dataset("hand", items, seqs, times=times)


def test_new_items_are_the_latest_by_first_interaction_and_new_users_are_seeded():
    ds = _dataset()
    assert ds.first_seen()[9] == 9 and ds.first_seen()[1] == 1 and ds.first_seen()[3] == 3
    cold = choose_cold(ds, new_item_fraction=0.2, new_user_fraction=0.25, seed=0)
    assert cold.new_items == {9, 10} and len(cold.new_users) == 1
    assert choose_cold(ds, new_item_fraction=0.2, new_user_fraction=0.25, seed=0) == cold  # deterministic
    with pytest.raises(ValueError, match="no interaction times"):
        choose_cold(Dataset("no times", ds.items, ds.sequences))
    with pytest.raises(ValueError, match="very_few <= few"):
        choose_cold(ds, few=2, very_few=3)


def test_fitting_sequences_leave_out_new_items_and_new_users():
    ds = _dataset()
    cold = ColdSplit(frozenset({9, 10}), frozenset({3}), few=1, very_few=0)
    assert fitting_sequences(ds, cold, 1) == [(1, 2, 3), (2, 3, 4, 5), (1, 2, 6, 3)]
    assert fitting_sequences(ds, cold, 2) == [(1, 2, 3), (2, 3, 4), (1, 2, 6)]


def test_each_request_gets_its_slice_by_hand():
    ds = _dataset()
    cold = ColdSplit(frozenset({9, 10}), frozenset({3}), few=1, very_few=0, new_user_history=2)
    got = {(r.user, r.position): r for r in slice_requests(ds, cold, [1, 2])}
    # position 2: fitted on (1,2,3), (2,3,4), (1,2,6): counts 1:2 2:3 3:2 4:1 6:1
    assert got[1, 2].target == 9 and got[1, 2].slice == "new_items" and got[1, 2].history == (1, 2, 3)
    assert got[2, 2].target == 5 and got[2, 2].slice == "few_items" and got[2, 2].target_interactions == 0
    assert got[2, 2].very_few  # 0 <= very_few 0
    assert got[4, 2].target == 3 and got[4, 2].slice == "warm" and got[4, 2].target_interactions == 2
    # position 1: fitted on (1,2,3), (2,3,4,5), (1,2,6,3): counts 4:1 7:0
    assert got[1, 1].target == 4 and got[1, 1].slice == "few_items" and not got[1, 1].very_few
    assert got[2, 1].slice == "new_items" and got[4, 1].target == 7 and got[4, 1].slice == "few_items"
    # the new user 3 predicts its 2nd and 3rd items from its first 1 and 2 (models of position 1)
    new = [r for r in slice_requests(ds, cold, [1, 2]) if r.slice == "new_users"]
    assert [(r.history, r.target, r.position) for r in new] == [((5,), 6, 1), ((5, 6), 7, 1)]
    assert all(r.user != 3 for r in got.values() if r.slice != "new_users")
    assert in_slice(got[2, 2], "very_few_items") and in_slice(got[2, 2], "all") and not in_slice(got[2, 2], "warm")
    with pytest.raises(ValueError, match="slice must be one of"):
        in_slice(got[2, 2], "cold")


def test_without_cold_is_the_world_before_the_cold_items_and_users():
    from rcllm_jax.data.slices import without_cold
    ds = _dataset()
    cold = ColdSplit(frozenset({9, 10}), frozenset({3}))
    got = without_cold(ds, cold)
    assert got.sequences == {1: (1, 2, 3, 4), 2: (2, 3, 4, 5), 4: (1, 2, 6, 3, 7)}
    assert got.times[1] == (1, 2, 3, 12) and got.items == ds.items  # the new items stay in the catalog, unseen


def test_dropped_features_look_like_an_unlinked_candidate():
    """train/head_fit.drop_features: rate 0 keeps every example; rate 1 with share 1 makes every
    candidate's features those of a candidate no history links to; seeded; the input is not changed."""
    import numpy as np

    from rcllm_jax.retrieval import UNLINKED_FEATURES, ItemKNN
    from rcllm_jax.train.head_fit import Example, drop_features
    r = ItemKNN.fit([[1, 2, 3], [1, 2], [2, 3]], [1, 2, 3, 4, 5])
    side = r.candidate_features([1], [2, 3, 4, 5])
    assert np.allclose(side[2], UNLINKED_FEATURES)  # item 4: nothing links to it
    ex = [Example(u, (1,), (2, 3, 4, 5), 0, side) for u in range(40)]
    assert all(np.array_equal(a.side, b.side) for a, b in zip(drop_features(ex, 0.0), ex))
    assert all(np.allclose(e.side, UNLINKED_FEATURES) for e in drop_features(ex, 1.0, share=1.0))
    half = drop_features(ex, 1.0, seed=3)
    dropped = np.array([[np.allclose(row, UNLINKED_FEATURES) for row in e.side[:2]] for e in half])
    assert 0 < dropped.mean() < 1
    assert all(np.array_equal(a.side, b.side) for a, b in zip(half, drop_features(ex, 1.0, seed=3)))
    assert np.array_equal(ex[0].side, side)
    with pytest.raises(ValueError, match="drop rate"):
        drop_features(ex, 1.5)
    # with the content features: the kNN and follow features are dropped, cold set, the content score kept
    texts = ["Alpha Story (1990)", "Beta Story (1991)", "Gamma Tale (1992)", "Delta Story (1993)", "Omega (1994)"]
    r = ItemKNN.fit([[1, 2, 3], [1, 2], [2, 3]], [1, 2, 3, 4, 5], texts=texts)
    names = ("knn_relative", "knn_log", "follow_relative", "content_relative", "cold")
    side = r.candidate_features([1], [2, 3, 4, 5], names)
    assert np.array_equal(side[:, 4], [0, 0, 1, 1]) and side[2, 3] > 0  # 4 "Delta Story": cold, shares "story"
    ex = [Example(0, (1,), (2, 3, 4, 5), 0, side)]
    (all_dropped,) = drop_features(ex, 1.0, share=1.0, features=names)
    assert np.allclose(all_dropped.side[:, :3], UNLINKED_FEATURES) and np.array_equal(all_dropped.side[:, 4], [1] * 4)
    assert np.array_equal(all_dropped.side[:, 3], side[:, 3])
    with pytest.raises(ValueError, match="carry 5 features, 3 named"):
        drop_features(ex, 1.0)
