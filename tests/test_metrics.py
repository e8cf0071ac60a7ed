"""Metric functions on hand-computed cases."""

import math

import numpy as np
import pytest

from rcllm_jax.eval.metrics import popularity_scores, ranking_metrics, target_rank


def test_target_rank_counts_strictly_better():
    assert target_rank([0.1, 0.9, 0.5], 1) == 0
    assert target_rank([0.1, 0.9, 0.5], 2) == 1
    assert target_rank([0.1, 0.9, 0.5], 0) == 2


def test_ties_pessimistic_without_rng_and_uniform_with_it():
    scores = [1.0, 1.0, 1.0, 0.0]
    assert target_rank(scores, 0) == 2
    rng = np.random.default_rng(0)
    draws = [target_rank(scores, 0, rng) for _ in range(3000)]
    assert set(draws) == {0, 1, 2}
    assert abs(np.mean(draws) - 1.0) < 0.06


def test_ranking_metrics_by_hand():
    m = ranking_metrics([0, 3, 7, 12])
    assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["hr@10"] == 0.75
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 8 + 1 / 13) / 4)


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        ranking_metrics([])


def test_popularity_scores():
    assert popularity_scores([3, 9, 4], {3: 10, 4: 2}).tolist() == [10, 0, 2]


def test_kl_by_hand():
    from rcllm_jax.eval.fidelity import kl_divergence
    p, q = np.log([0.5, 0.5]), np.log([0.9, 0.1])
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert kl_divergence(p, p) == 0.0


def test_kendall_tau_by_hand():
    from rcllm_jax.eval.fidelity import kendall_tau
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one discordant pair of 6: (6 - 2*1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in y: concordant 2, discordant 0, pairs 3, untied-y pairs 2
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / np.sqrt(3 * 2))


def test_fidelity_means():
    from rcllm_jax.eval.fidelity import fidelity
    ref = [np.log([0.7, 0.2, 0.1]), np.log([0.1, 0.2, 0.7])]
    got = [np.log([0.6, 0.3, 0.1]), np.log([0.5, 0.3, 0.2])]
    f = fidelity(ref, got)
    assert f["top1_agreement"] == 0.5
    assert f["kendall_tau"] == pytest.approx((1.0 + -1.0) / 2)


def test_bootstrap_interval_by_hand():
    from rcllm_jax.eval.metrics import bootstrap_ci, per_request_metrics
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5)  # no spread, no interval
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50, n=2000, seed=1)
    # binomial mean 0.5, sd sqrt(0.25 / 100) = 0.05: the 95% interval is about 0.5 +- 0.098
    assert 0.39 < lo < 0.42 and 0.58 < hi < 0.61
    # a user's requests resampled together: two identical requests per user carry one user's
    # evidence, so the cluster interval is the per-user one, ~sqrt(2) wider than the naive one
    users = np.random.default_rng(4).random(60)
    twice, who = np.repeat(users, 2), np.repeat(np.arange(60), 2)
    assert bootstrap_ci(twice, seed=3, groups=who) == bootstrap_ci(users, seed=3)
    naive, grouped = bootstrap_ci(twice, n=4000, seed=5), bootstrap_ci(twice, n=4000, seed=5, groups=who)
    assert 1.2 < (grouped[1] - grouped[0]) / (naive[1] - naive[0]) < 1.7
    per = per_request_metrics([0, 3, float("inf")])
    assert per["hr@1"].tolist() == [1, 0, 0] and per["hr@5"].tolist() == [1, 1, 0]
    assert abs(per["ndcg@5"][1] - 1 / np.log2(5)) < 1e-12 and per["mrr"][2] == 0


def test_scaling_model_by_hand():
    """requests/s = 1 / max(host, (compute + bytes / link) / N) on real devices, 1 / (host + compute
    + bytes / link) on simulated devices sharing one CPU: worked out by hand."""
    from rcllm_jax.eval.scaling import requests_per_s
    # 10 ms host, 90 ms device, 1 MB remote over 100 MB/s = 10 ms: device time 100 ms per request
    assert requests_per_s(1, 0.01, 0.09, 1e6, 1e8) == pytest.approx(10.0)
    assert requests_per_s(4, 0.01, 0.09, 1e6, 1e8) == pytest.approx(40.0)
    assert requests_per_s(20, 0.01, 0.09, 1e6, 1e8) == pytest.approx(100.0)  # host-bound: 1 / 10 ms
    assert requests_per_s(4, 0.01, 0.09, 1e6, 1e8, shared_cores=True) == pytest.approx(1 / 0.11)
    with pytest.raises(ValueError):
        requests_per_s(0, 0.01, 0.09, 0, 1e8)
