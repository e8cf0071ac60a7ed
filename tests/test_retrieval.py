"""The retrieval stage: item-kNN on a hand-made co-occurrence table (scores and top-K worked out
by hand), the cold-start fallback, persistence and refusals, and retrieved requests in the
evaluation pipeline (a target that is not retrieved is a miss)."""

import math

import numpy as np
import pytest

from rcllm_jax.eval.metrics import MISS, ranking_metrics, target_rank
from rcllm_jax.retrieval import ItemKNN, RetrieverError, load_or_fit

# users' training sequences over items 1..5 (item 6 is in the catalog but never seen)
SEQS = [[1, 2, 3], [1, 2], [2, 3], [4], [3, 5]]
ITEMS = [1, 2, 3, 4, 5, 6]
# n_i: 1:2, 2:3, 3:3, 4:1, 5:1, 6:0; co-occurrence C(1,2)=2, C(1,3)=1, C(2,3)=2, C(3,5)=1
SIM = {(1, 2): 2 / math.sqrt(2 * 3), (1, 3): 1 / math.sqrt(2 * 3), (2, 3): 2 / math.sqrt(3 * 3),
       (3, 5): 1 / math.sqrt(3 * 1)}


def sim(a, b):
    return SIM.get((min(a, b), max(a, b)), 0.0)


def test_scores_and_top_k_by_hand():
    r = ItemKNN.fit(SEQS, ITEMS, neighbours=5, decay=0.5)
    # history [3, 1]: item 1 is the newest (weight 1), item 3 one older (weight 0.5)
    want = {j: sim(1, j) + 0.5 * sim(3, j) for j in ITEMS}
    got = r.scores([3, 1])
    assert np.allclose(got, [want[j] if j not in (1, 3) else want[j] for j in ITEMS])
    # top-3 without the history: 2 (1.150), 5 (0.289), then unscored items by popularity: 4 (1) before 6 (0)
    ids, scores = r.retrieve([3, 1], 3)
    assert ids == (2, 5, 4)
    assert np.allclose(scores, [want[2], want[5], 0.0])
    # the newest item weighs most: [1, 3] puts 5 (3's neighbour) closer to 2
    assert np.allclose(r.scores([1, 3])[ITEMS.index(5)], sim(3, 5))


def test_coaccess_requests_are_the_top_k_of_the_latest_prefixes():
    r = ItemKNN.fit(SEQS, ITEMS, neighbours=5, decay=0.5)
    # [1, 2, 3] with 2 prefixes per sequence: histories [1, 2] and [1, 2, 3]; [4] has one prefix
    log = r.coaccess_requests([[1, 2, 3], [4]], k=2, per_sequence=2)
    # [1, 2]: 3 scores sim(2,3) + 0.5 sim(1,3) > 0, then 4 by popularity (5 and 6 score 0, 4 is more popular)
    # [1, 2, 3]: 5 (sim(3,5)) then 4; [4]: nothing similar: the two most popular, 2 and 3 (3 users each)
    assert log == [(3, 4), (5, 4), (2, 3)]
    assert r.coaccess_requests([[1, 2, 3, 4, 5]], k=2, per_sequence=10) == [
        r.retrieve([1, 2, 3, 4, 5][:c], 2)[0] for c in range(1, 6) if 6 - c >= 2]


def test_neighbour_table_is_truncated_and_recent_window_applies():
    r = ItemKNN.fit(SEQS, ITEMS, neighbours=1, decay=0.5)
    # item 3 keeps only its best neighbour, 2 (0.667 > 5: 0.577 > 1: 0.408)
    assert r.retrieve([3], 2)[0] == (2, 1)  # then popularity: 1 (2 users)
    r_recent = ItemKNN.fit(SEQS, ITEMS, neighbours=5, recent=1)
    assert r_recent.retrieve([5, 1], 2)[0] == (2, 3)  # only item 1 counts: 2 (0.816), 3 (0.408)


def test_cold_start_is_popularity_and_errors():
    r = ItemKNN.fit(SEQS, ITEMS)
    assert r.retrieve([], 4)[0] == (2, 3, 1, 4)  # by training users: 2 and 3 (3 each, lower id first), 1, 4
    assert r.retrieve([999], 2)[0] == (2, 3)  # unknown history items are ignored
    with pytest.raises(ValueError, match="k must be >= 1"):
        r.retrieve([1], 0)
    with pytest.raises(ValueError, match="cannot retrieve 6"):
        r.retrieve([1], 6)


def test_follow_table_and_candidate_features_by_hand():
    """Successors within 3 items: 1 -> 2 twice ([1,2,3], [1,2]), 1 -> 3 once, 2 -> 3 twice, 3 -> 5
    once; F[i, j] = count / (successors of i + smoothing 5)."""
    r = ItemKNN.fit(SEQS, ITEMS, neighbours=5, decay=0.5)
    f = {1: {2: 2 / 8, 3: 1 / 8}, 2: {3: 2 / 7}, 3: {5: 1 / 6}}
    want = {j: f[1].get(j, 0.0) + 0.5 * f[2].get(j, 0.0) for j in ITEMS}  # history [2, 1]: 1 newest
    assert np.allclose(r.follow_scores([2, 1]), [want[j] for j in ITEMS])
    # follow is directional: nothing follows 5, and 3 is followed by 5 only
    assert not r.follow_scores([5]).any() and np.allclose(r.follow_scores([3]), [0, 0, 0, 0, 1 / 6, 0])
    feats = r.candidate_features([2, 1], [3, 5, 6, 999])
    knn = {j: sim(1, j) + 0.5 * sim(2, j) for j in ITEMS}
    top_knn, top_f = max(knn[3], knn[5]), want[3]
    assert np.allclose(feats[:, 0], [knn[3] / top_knn, knn[5] / top_knn, 0, 0])
    assert np.allclose(feats[:, 1], np.log(np.array([knn[3], knn[5], 0, 0]) + 1e-3))
    assert np.allclose(feats[:, 2], [1.0, 0, 0, 0], atol=1e-7) and top_f > 0
    assert np.allclose(r.candidate_features([], [2, 3]), [[0, np.log(1e-3), 0]] * 2)  # cold start: no signal


def test_save_load_and_refusals(tmp_path):
    r = ItemKNN.fit(SEQS, ITEMS)
    path = r.save(tmp_path / "r.npz")
    back = ItemKNN.load(path, expect_digest=r.digest)
    (ids_a, s_a), (ids_b, s_b) = back.retrieve([3, 1], 4), r.retrieve([3, 1], 4)
    assert ids_a == ids_b and np.allclose(s_a, s_b)
    assert back.decay == r.decay and back.recent == r.recent
    assert np.array_equal(back.candidate_features([3, 1], [2, 5]), r.candidate_features([3, 1], [2, 5]))
    with pytest.raises(RetrieverError, match="other training data"):
        ItemKNN.load(path, expect_digest="0" * 32)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RetrieverError, match="damaged"):
        ItemKNN.load(bad)
    # load_or_fit: reuses a matching file, refits (and overwrites) one of other data
    again, how = load_or_fit(path, SEQS, ITEMS)
    assert how.startswith("loaded") and again.digest == r.digest
    other, how = load_or_fit(path, SEQS[:-1], ITEMS)
    assert "other training data" in how and other.digest != r.digest
    assert ItemKNN.load(path).digest == other.digest


def test_retrieved_requests_and_misses():
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests
    from rcllm_jax.retrieval import fit_before
    split = LeaveOneOut(load_dataset("ml-100k"))
    r = fit_before(split, 2)
    reqs = list(eval_requests(split, num_users=60, num_candidates=20, retriever=r, seed=4))
    for q in reqs:
        assert len(q.candidates) == 20 and not set(q.candidates) & set(q.history)
        assert set(q.candidates) == set(r.retrieve(q.history, 20)[0])  # shuffled prompt order
        assert (q.target_index is None) == (q.target not in q.candidates)
    hits = [q for q in reqs if q.target_index is not None]
    assert 0 < len(hits) < len(reqs)
    ordered = list(eval_requests(split, num_users=5, num_candidates=20, retriever=r, seed=4, order="retriever"))
    assert all(q.candidates == r.retrieve(q.history, 20)[0] for q in ordered)
    # a miss counts as a miss at every cutoff
    assert target_rank([0.3, 0.1], None) == MISS
    m = ranking_metrics([0, MISS])
    assert m["hr@1"] == 0.5 and m["ndcg@10"] == 0.5 and m["mrr"] == 0.5


# --- the content path (cold items) ------------------------------------------------------------
# a hand-made catalog: items 1-6 have interactions, item 7 none; 7 shares its title words with 6
CAT_TEXTS = ["Alpha Comedy", "Beta Drama", "Gamma Drama", "Delta Action", "Epsilon Action",
             "Starship Voyage (1998; Sci-Fi)", "Starship Voyage II (1998; Sci-Fi)"]
CAT_ITEMS = [1, 2, 3, 4, 5, 6, 7]
CAT_SEQS = [[1, 2, 3], [1, 2], [2, 3], [4, 5], [4, 5, 6], [1, 6]]


def test_content_path_proposes_an_item_nobody_interacted_with():
    knn = ItemKNN.fit(CAT_SEQS, CAT_ITEMS)
    blended = ItemKNN.fit(CAT_SEQS, CAT_ITEMS, texts=CAT_TEXTS)
    assert knn.popularity[CAT_ITEMS.index(7)] == 0
    # history [1, 6]: no cold item in it, so kNN's list unchanged
    assert blended.retrieve([1, 6], 3)[0] == knn.retrieve([1, 6], 3)[0]
    assert blended.cold_slots([1, 6], 3) == 0
    # history [2, 7]: one of the 2 latest items is cold (7 itself, a new item someone just watched):
    # ceil(0.5 * 4 * 1/2) = 1 slot; 7 is in the history, so the cold pool is empty: kNN's list stays
    assert blended.retrieve([2, 7], 4)[0] == knn.retrieve([2, 7], 4)[0]
    # a catalog with a second cold item 8 ("Starship Voyage III"): history [6, 7] (7 cold) asks for
    # ceil(0.5 * 4 * 1/2) = 1 cold slot; 8 is the only cold item outside the history
    texts = CAT_TEXTS + ["Starship Voyage III (1999; Sci-Fi)"]
    blended = ItemKNN.fit(CAT_SEQS, CAT_ITEMS + [8], texts=texts)
    knn = ItemKNN.fit(CAT_SEQS, CAT_ITEMS + [8])
    got, want = blended.retrieve([6, 7], 4)[0], knn.retrieve([6, 7], 4)[0]
    assert 8 not in want and got == want[:3] + (8,)
    # the content score by hand: TF-IDF cosine puts 8 (sharing "starship voyage ... sci fi") above
    # every item without those words
    c = blended.content_scores([6, 7])
    assert c[CAT_ITEMS.index(6)] > c[7] > max(c[:5])
    # every history item cold: half of k goes to cold items; only 8 exists, kNN's next item fills the other
    got, want = blended.retrieve([7], 4)[0], knn.retrieve([7], 4)[0]
    assert blended.cold_slots([7], 4) == 2 and got == want[:2] + (8, want[2])
    # the same tables with no cold slot: item-kNN's own list; the original keeps its share
    assert blended.with_cold_share(0.0).retrieve([7], 4)[0] == want and blended.retrieve([7], 4)[0] == got
    assert blended.retrieve([], 4)[0] == knn.retrieve([], 4)[0]  # a new user: popularity, as before


def test_content_path_is_saved_and_its_texts_are_part_of_the_digest(tmp_path):
    r = ItemKNN.fit(CAT_SEQS, CAT_ITEMS, texts=CAT_TEXTS)
    back = ItemKNN.load(r.save(tmp_path / "r.npz"), expect_digest=r.digest)
    assert np.allclose(back.content.toarray(), r.content.toarray())
    assert back.retrieve([6, 7], 5)[0] == r.retrieve([6, 7], 5)[0] and back.cold_share == r.cold_share
    retitled = CAT_TEXTS[:-1] + ["Something Else"]
    got, how = load_or_fit(tmp_path / "r.npz", CAT_SEQS, CAT_ITEMS, texts=retitled)
    assert "other training data" in how and got.digest != r.digest  # refitted, not the stale content
    with pytest.raises(ValueError, match="6 item texts for 7 items"):
        ItemKNN.fit(CAT_SEQS, CAT_ITEMS, texts=CAT_TEXTS[:-1])


def test_named_candidate_features_content_and_cold_by_hand():
    """A head names the features it weighs: the columns come in its order; `cold` is 1 for an item
    nobody interacted with (7 here, and an unknown id), `content_relative` the content score over the
    best candidate's (clipped at 0); an unknown name or a content head on a retriever without the
    texts is refused."""
    from rcllm_jax.recommender import check_side_features
    from rcllm_jax.retrieval import CANDIDATE_FEATURES, FEATURES
    r = ItemKNN.fit(CAT_SEQS, CAT_ITEMS, texts=CAT_TEXTS)
    cands = [2, 6, 7, 999]
    default = r.candidate_features([1, 6], cands)
    full = r.candidate_features([1, 6], cands, FEATURES)
    assert full.shape == (4, 5) and np.array_equal(full[:, :3], default)
    assert np.array_equal(full[:, 4], [0, 0, 1, 1])  # 7: no training interaction; 999: unknown
    c = np.maximum(r.content_scores([1, 6])[[CAT_ITEMS.index(2), CAT_ITEMS.index(6), CAT_ITEMS.index(7)]], 0)
    assert np.allclose(full[:, 3], np.r_[c / c.max(), 0.0], atol=1e-6) and full[:, 3].max() == pytest.approx(1.0)
    swapped = r.candidate_features([1, 6], cands, ("cold", "knn_log"))
    assert np.array_equal(swapped, full[:, [4, 1]])
    assert r.candidate_features([], [7], ("content_relative",)).tolist() == [[0.0]]  # no history: no profile
    with pytest.raises(ValueError, match="candidate features must be distinct names"):
        r.candidate_features([1], [2], ("knn_log", "popularity"))
    with pytest.raises(ValueError, match="distinct"):
        r.candidate_features([1], [2], ("cold", "cold"))

    class Head:
        side_features = CANDIDATE_FEATURES + ("content_relative",)
    check_side_features(Head, r)
    with pytest.raises(ValueError, match="fit the retriever with the item texts"):
        check_side_features(Head, ItemKNN.fit(CAT_SEQS, CAT_ITEMS))
    # the served ranking weighs the columns the head names, in its order
    from scipy.special import log_softmax

    from rcllm_jax.engine.ranking_head import SlotHead
    from rcllm_jax.recommender import final_scores
    head = SlotHead(np.zeros(3), 0.0, "fp", side_weights=np.array([2.0, -1.0]), side_features=("cold", "knn_log"))
    engine_scores = np.log(np.full(4, 0.25))
    want = log_softmax(engine_scores + 2.0 * full[:, 4] - 1.0 * full[:, 1])
    assert np.allclose(final_scores(head, r, [1, 6], cands, engine_scores), want, atol=1e-6)
    Head.side_features = ("knn_log", "genre")
    with pytest.raises(ValueError, match="cannot compute.*retrain the head"):
        check_side_features(Head, r)
