"""Fidelity of a cached mode to full prefill, per request: KL divergence of the candidate
distribution, top-1 agreement, Kendall tau of the ranking."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def kl_divergence(ref_logp: Sequence[float], logp: Sequence[float]) -> float:
    """KL(ref || mode) in nats; both are log-probabilities over the same candidates."""
    a, b = np.asarray(ref_logp, np.float64), np.asarray(logp, np.float64)
    return float(np.sum(np.exp(a) * (a - b)))


def top1_agree(ref_scores, scores) -> bool:
    return int(np.argmax(ref_scores)) == int(np.argmax(scores))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall tau-b between two score vectors (ties handled), O(K^2) - K is small."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), k=1)
    dx, dy = dx[iu], dy[iu]
    num = float(np.sum(dx * dy))
    den = float(np.sqrt(np.sum(dx != 0) * np.sum(dy != 0)))
    return num / den if den else 1.0


def fidelity(ref_scores_list, scores_list) -> dict[str, float]:
    """Means over requests: kl_mean, top1_agreement, kendall_tau."""
    kl = [kl_divergence(a, b) for a, b in zip(ref_scores_list, scores_list)]
    return {"kl_mean": float(np.mean(kl)),
            "top1_agreement": float(np.mean([top1_agree(a, b) for a, b in zip(ref_scores_list, scores_list)])),
            "kendall_tau": float(np.mean([kendall_tau(a, b) for a, b in zip(ref_scores_list, scores_list)]))}
