"""Retrieve -> rerank: the two-stage pipeline a user of this engine runs.

A request names a user and, optionally, its candidates. Without candidates the retriever
(`rcllm_jax.retrieval.ItemKNN`) proposes the user's top `num_candidates` from the whole catalog,
best first (a user with no history gets the most popular items); the engine then ranks them in
one prefill (`Engine.rank`, any mode). The server (`serve/service.py`) and the library use this
one path.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recommendation:
    ranking: tuple[int, ...]  # item ids, best first (all candidates)
    scores: np.ndarray  # [len(ranking)] the engine's scores, in ranking order
    candidates: tuple[int, ...]  # what was ranked, in prompt order
    retrieved: bool  # candidates came from the retriever
    result: object  # the engine's EngineResult (timings, cache counts)


class Recommender:
    def __init__(self, engine, retriever=None, mode: str = "rcllm"):
        self.engine, self.retriever, self.mode = engine, retriever, mode

    def candidates(self, history, k: int) -> tuple[int, ...]:
        """The retriever's top-k for this history, best first (never an item of the history)."""
        if self.retriever is None:
            raise ValueError("no retriever is loaded: send the candidates explicitly")
        return self.retriever.retrieve(list(history), k)[0]

    def recommend(self, user_id, history, candidates=None, *, num_candidates: int = 20,
                  shard: int | None = None) -> Recommendation:
        """Rank `candidates` (or the retrieved ones) for the user with this history."""
        retrieved = candidates is None
        cands = self.candidates(history, num_candidates) if retrieved else tuple(int(c) for c in candidates)
        prompt = self.engine.builder.build(list(history), cands)
        res = self.engine.rank(prompt, self.mode, user_id=user_id, shard=shard)
        scores = np.asarray(res.scores)
        order = np.argsort(-scores, kind="stable")
        return Recommendation(ranking=tuple(cands[i] for i in order), scores=scores[order], candidates=cands,
                              retrieved=retrieved, result=res)
