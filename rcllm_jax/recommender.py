"""Retrieve -> rerank: the two-stage pipeline a user of this engine runs.

A request names a user and, optionally, its candidates. Without candidates the retriever
(`rcllm_jax.retrieval.ItemKNN`) proposes the user's top `num_candidates` from the whole catalog,
best first (a user with no history gets the most popular items); the engine then ranks them in
one prefill (`Engine.rank`, any mode), and a head that weighs collaborative features adds the
retriever's features of the candidates (`SlotHead.combine`). The server (`serve/service.py`)
and the library use this one path.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rcllm_jax.settings import CatalogSettings, EngineSettings, MeshSettings, ModelSettings


@dataclasses.dataclass(frozen=True)
class Recommendation:
    ranking: tuple[int, ...]  # item ids, best first (all candidates)
    scores: np.ndarray  # [len(ranking)] the final scores (engine + collaborative features), in ranking order
    candidates: tuple[int, ...]  # what was ranked, in prompt order
    retrieved: bool  # candidates came from the retriever
    result: object  # the engine's EngineResult (timings, cache counts)


class Recommender:
    def __init__(self, engine, retriever=None, mode: str = "rcllm"):
        self.engine, self.retriever, self.mode = engine, retriever, mode
        self.head = getattr(engine, "head", None)  # label prompts: None
        if self.head is not None and self.head.side_weights is not None:
            check_side_features(self.head, retriever)

    def candidates(self, history, k: int) -> tuple[int, ...]:
        """The retriever's top-k for this history, best first (never an item of the history)."""
        if self.retriever is None:
            raise ValueError("no retriever is loaded: send the candidates explicitly")
        return self.retriever.retrieve(list(history), k)[0]

    def recommend(self, user_id, history, candidates=None, *, num_candidates: int = 20,
                  shard: int | None = None) -> Recommendation:
        """Rank `candidates` (or the retrieved ones) for the user with this history."""
        cands, prompt = self._prompt(history, candidates, num_candidates)
        res = self.engine.rank(prompt, self.mode, user_id=user_id, shard=shard)
        return self._recommendation(history, cands, candidates is None, res)

    def recommend_step(self, requests, *, num_candidates: int = 20) -> list[Recommendation]:
        """Several recommendations in one serving step (`Engine.rank_step`: every items-shard's
        requests batched, all shards in one program). requests: (user_id, history, candidates or
        None, shard or None) each; the answers `recommend` gives one by one."""
        built = [self._prompt(history, cands, num_candidates) for _, history, cands, _ in requests]
        results = self.engine.rank_step([(prompt, user, shard) for (user, _, _, shard), (_, prompt)
                                         in zip(requests, built)], self.mode)
        return [self._recommendation(history, cands, given is None, res)
                for (_, history, given, _), (cands, _), res in zip(requests, built, results)]

    def _prompt(self, history, candidates, num_candidates: int):
        cands = (self.candidates(history, num_candidates) if candidates is None
                 else tuple(int(c) for c in candidates))
        return cands, self.engine.builder.build(list(history), cands)

    def _recommendation(self, history, cands, retrieved: bool, res) -> Recommendation:
        scores = final_scores(self.head, self.retriever, history, cands, res.scores)
        order = np.argsort(-scores, kind="stable")
        return Recommendation(ranking=tuple(cands[i] for i in order), scores=scores[order], candidates=cands,
                              retrieved=retrieved, result=res)


def check_side_features(head, retriever):
    """A head that weighs the retriever's candidate features needs a retriever that computes them:
    each a known feature (`retrieval.FEATURES`), the content one only with a content path."""
    from rcllm_jax.retrieval import check_features
    if retriever is None:
        raise ValueError(f"the ranking head weighs the retriever's features ({', '.join(head.side_features)}): "
                         "load a retriever")
    try:
        names = check_features(head.side_features)
    except ValueError as e:
        raise ValueError(f"the ranking head weighs features this retriever cannot compute ({e}): retrain the head") \
            from None
    if "content_relative" in names and getattr(retriever, "content", None) is None:
        raise ValueError("the ranking head weighs the content score: fit the retriever with the item texts")


def final_scores(head, retriever, history, candidates, scores) -> np.ndarray:
    """[K] the ranking's scores: the engine's, plus the head's collaborative term when it has one."""
    if head is None or head.side_weights is None:
        return np.asarray(scores)
    return head.combine(scores, retriever.candidate_features(list(history), candidates, head.side_features))


@dataclasses.dataclass
class Served:
    """What `open_served` sets up: the recommender and where its caches live."""
    recommender: Recommender
    dataset: object  # rcllm_jax.data.movielens.Dataset
    item_ids: list[int]
    snapshot_dir: str
    users_dir: str
    rebuild_on_damage: bool  # resolved: what a caller does with its other damaged state too
    notes: list[str]  # what happened (restored / built / saved / fitted), one line each

    @property
    def engine(self):
        return self.recommender.engine


def open_served(model: ModelSettings | None = None, catalog: CatalogSettings | None = None,
                engine: EngineSettings | None = None, layout: MeshSettings | None = None, *, mesh=None) -> Served:
    """The served recommender as `launch/serve.py` and `launch/recommend.py` run it, from their
    settings (`rcllm_jax.settings`; each defaults to the launchers' defaults): the model (default
    SmolLM2-135M-Instruct) with its ranking head, the catalog's item caches restored from the
    snapshot for this model (built and saved there when absent or incomplete), and the item-kNN
    retriever over the catalog's histories (loaded from the snapshot directory, refitted when the
    data changed). `mesh`: the `jax.sharding.Mesh` the item caches are sharded over (default: one
    device), laid out as `layout` says. A snapshot with no intact step is rebuilt when
    `engine.rebuild_on_damage` (default: only at the default location, where nothing else could be
    lost), else raises `SnapshotError`. Raises `slot_head.HeadError` when the head is for other
    weights."""
    from pathlib import Path

    from rcllm_jax.cache import snapshot
    from rcllm_jax.data.catalog import load_catalog, prompt_builder
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.ranking_head import ranking_head as load_head
    from rcllm_jax.downloads import cache_dir
    from rcllm_jax.model import load_model
    from rcllm_jax.retrieval import item_texts, load_or_fit

    m, c = model or ModelSettings(), catalog or CatalogSettings()
    e, lay = engine or EngineSettings(), layout or MeshSettings()
    ds = load_catalog(c)
    item_ids = sorted(ds.items)[:c.max_items or None]
    lm = load_model(m.model, dtype=m.dtype, adapter=m.adapter, random_weights=m.random_weights)
    builder = prompt_builder(lm.tokenizer, ds, c, max_prompt_tokens=lm.cfg.max_position, head=m.head)
    from rcllm_jax.cache.pool import PAGE
    from rcllm_jax.model.config import kv_bytes_per_token
    user_pages, prefix_pages = e.user_cache_pages, e.prefix_cache_pages
    if not user_pages:  # the user store's budget in MB (per device: it is replicated)
        user_pages = max(16, int(e.user_cache_mb * 2**20 / (PAGE * kv_bytes_per_token(lm.cfg, lm.cfg.dtype))))
    if e.mode in ("prefix", "prefix_warm"):  # the prefix cache gets the user store's budget: it holds the same
        prefix_pages = max(prefix_pages, user_pages)  # prefixes (the user store stays: its snapshot holds histories)
    engine = Engine(lm.params, lm.cfg, builder, item_ids=item_ids, user_pages=user_pages, prefix_pages=prefix_pages,
                    max_candidates=e.max_candidates, mesh=mesh, placement=lay.placement, replicate=lay.replicate,
                    kv_dtype=lay.kv_dtype, head=load_head(m.head, m.ranking_head))
    snapshot_dir, rebuild_on_damage = e.snapshot_dir, e.rebuild_on_damage
    snap = str(snapshot_dir or cache_dir() / "snapshots" / f"{engine.fingerprint[:16]}-{ds.name}")
    retriever_path = Path(snap) / "retriever.npz"
    seqs = [ds.sequences[u] for u in sorted(ds.sequences)]
    retriever, how = load_or_fit(retriever_path, seqs, item_ids, texts=item_texts(ds, item_ids),
                                 save=False)  # saved below, once the snapshot directory is known to be ours
    # placement and replication: computed only if blocks must be placed (not on a restore onto the saved layout)
    engine.set_coaccess(lambda: retriever.coaccess_requests(seqs))
    if rebuild_on_damage is None:
        rebuild_on_damage = snapshot_dir is None
    notes, saved_blocks = [], None
    if snapshot.steps(snap):
        try:
            saved_blocks = len(engine.restore(snap)["blocks"])
            notes.append(f"restored item caches from {snap}")
        except snapshot.SnapshotMismatchError:
            raise
        except snapshot.SnapshotError as e:
            if not rebuild_on_damage:
                raise
            notes.append(f"rebuilding the item caches: {e}")
    engine.build_store()  # encodes only what the snapshot lacked (everything on the first start)
    st = engine.stats()
    if saved_blocks is None or st["item_blocks"] + st["glue_blocks"] > saved_blocks:
        engine.save(snap)
        notes.append(f"saved item caches ({st['item_blocks']} item blocks) to {snap}")
    if not how.startswith("loaded"):
        retriever.save(retriever_path)
        how += " and saved"
    notes.append(f"retriever (item-kNN over the catalog's histories): {how}")
    rec = Recommender(engine, retriever, e.mode)
    if e.calibration_requests and e.mode == "rcllm":
        notes.append(calibrated(rec, ds, item_ids, snap, e.calibration_requests,
                                min(e.calibration_candidates, e.max_candidates)))
    return Served(rec, ds, item_ids, snap, snap.rstrip("/") + "-users", rebuild_on_damage, notes)


@dataclasses.dataclass(frozen=True)
class Reload:
    """A newer snapshot step and the catalog as it is now, staged beside what is served
    (`stage_reload`); `RecommenderService.reload` swaps it in between requests."""
    staged: object  # engine.StagedCatalog
    dataset: object
    item_ids: list[int]
    retriever: object
    note: str


def stage_reload(served: Served, model: ModelSettings | None, catalog: CatalogSettings | None) -> Reload:
    """What a server takes on POST /admin/reload: the catalog read again (an item keeps its engine
    index, `catalog.keep_indices`), the newest intact step of the served snapshot directory (which
    must hold every item's block: launch/build_cache.py --update writes it), the retriever for the
    catalog's histories (the one saved with the step, else fitted now). Nothing served changes;
    raises CatalogError / SnapshotError (naming the problem) when the catalog or the step is refused."""
    from pathlib import Path

    from rcllm_jax.data.catalog import keep_indices, load_catalog, prompt_builder
    from rcllm_jax.retrieval import item_texts, load_or_fit
    m, c = model or ModelSettings(), catalog or CatalogSettings()
    engine = served.engine
    ds = keep_indices(load_catalog(c), engine.builder.items)
    item_ids = sorted(ds.items)[:c.max_items or None]
    builder = prompt_builder(engine.builder.tok, ds, c, max_prompt_tokens=engine.cfg.max_position, head=m.head)
    staged = engine.stage_catalog(builder, item_ids, served.snapshot_dir)
    seqs = [ds.sequences[u] for u in sorted(ds.sequences)]
    retriever, how = load_or_fit(Path(served.snapshot_dir) / "retriever.npz", seqs, item_ids,
                                 texts=item_texts(ds, item_ids), save=False)
    return Reload(staged, ds, item_ids, retriever,
                  f"step {staged.step} of {served.snapshot_dir}: {len(item_ids)} items; retriever {how}")


def calibration_requests(ds, retriever, item_ids, n: int, k: int, builder=None) -> list:
    """n requests shaped like retrieve -> rerank traffic for calibration: every few users of the
    catalog (their ids as the catalog names them), their history, the retriever's top-k (halved
    until the prompt fits `builder`'s length limit)."""
    served, users = set(item_ids), sorted(u for u, s in ds.sequences.items() if len(s) >= 2)
    out = []
    for u in users[::max(1, len(users) // max(n, 1))]:
        seq = list(ds.sequences[u])
        try:
            cands = [i for i in retriever.retrieve(seq, k)[0] if i in served]
        except ValueError:  # nothing left to retrieve
            continue
        while builder is not None and len(cands) >= 2:  # as many as fit the prompt's length limit
            try:
                builder.build(seq, cands)
                break
            except ValueError:
                cands = cands[:len(cands) // 2]
        if len(cands) >= 2:
            out.append((ds.user_key(u), seq, cands))
        if len(out) == n:
            break
    return out


def calibrated(rec: Recommender, ds, item_ids, snapshot_dir, n: int, k: int) -> str:
    """Set rcllm's policy from the calibration saved in `snapshot_dir` for this engine (weights,
    head, prompt, ...), else calibrate it now on n requests and save it there. Returns a line
    saying which policy and how faithful."""
    from rcllm_jax.engine import calibration as cal
    got, how = cal.load_or_calibrate(rec, snapshot_dir, k, lambda: calibration_requests(
        ds, rec.retriever, item_ids, n, k, rec.engine.builder))
    if got is None:
        return f"rcllm policy: the built-in default ({how})"
    rec.engine.set_policy("rcllm", got.policy, got)
    return got.describe(how)
