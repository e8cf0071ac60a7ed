"""The ranking benchmark: TTFT, accuracy and fidelity per prefill mode on a MovieLens request stream.

`run_benchmark(RunSettings(...), mesh)` is what launch/bench.py runs (its flags are the fields of
`settings.BenchSettings`, `ModelSettings`, `CatalogSettings`, `MeshSettings`). With
requests_per_user=1 each user makes one request (the leave-one-out test target); with more,
histories grow between a user's requests (0-2 items, probability 0.5) and every request has fresh
candidates, so prefix caching gets exactly the hits it would really get. Prints a table and writes
JSON {"config": {...}, "results": [{"mode": ..., ...}, ...]} and PNG plots. TTFT = prompt tokens in
-> candidate scores out. Compiles are excluded: a warm-up pass over the same stream compiles every
shape first (stores reset afterwards); `compiles_during_timing` in the JSON must read 0. Block
modes update the user's history cache when the history changes, before the request (as an event
would); that time is `history_update_s_p50`, not TTFT.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from rcllm_jax.eval.metrics import percentile
from rcllm_jax.serve.service import compiles, count_compiles  # the process's one compile counter
from rcllm_jax.settings import BenchSettings, CatalogSettings, MeshSettings, ModelSettings


class BenchError(ValueError):
    """Settings the benchmark cannot run (an unknown mode, a head validated on the test positions,
    flags that contradict each other, ...): the message names the setting."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything one benchmark run reads: its workload, the model, the catalog, the mesh layout,
    and the command line it came from (recorded in the JSON)."""
    bench: BenchSettings = BenchSettings()
    model: ModelSettings = ModelSettings()
    catalog: CatalogSettings = CatalogSettings()
    layout: MeshSettings = MeshSettings()
    argv: tuple[str, ...] = ()


def _policies(run: RunSettings):
    from rcllm_jax.engine.selective_recompute import BLOCK_MODES, Policy
    b = run.bench
    over = {k: v for k, v in (("sink", b.sink), ("ratio", b.ratio), ("check_layer", b.check_layer)) if v is not None}
    out = {}
    for name, pol in BLOCK_MODES.items():
        mine = {k: v for k, v in over.items()
                if (k == "sink" and name in ("sink", "rcllm")) or (k != "sink" and name in ("deviation", "rcllm"))}
        out[name] = dataclasses.replace(pol, cached_glue=run.bench.cached_glue or pol.cached_glue, **mine)
    for r in run.bench.sweep:
        out[f"blend@{float(r):g}"] = Policy(sink=out["sink"].sink, ratio=float(r),
                                            check_layer=run.bench.check_layer or 1, cached_glue=run.bench.cached_glue)
    return out


def _calibrate(run: RunSettings, engine, w, retriever):
    """rcllm's calibrated policy for this run's model, head and prompt (`engine/calibration.py`):
    from --snapshot_dir (or the default setup's shipped one) when saved there, else measured on
    requests of users the run does not measure (and saved there); None when not asked for, the
    policy is set by flags or no request could be made."""
    b = run.bench
    if not b.calibration_requests or b.cached_glue or any(v is not None for v in (b.sink, b.ratio, b.check_layer)):
        return None
    from rcllm_jax.engine import calibration as cal
    from rcllm_jax.recommender import Recommender

    def requests():
        """Users the run does not measure, each with the candidates of a measured request (the
        served items, the traffic's shapes) less its own history."""
        measured = {q.user_id for q in w.requests}
        others = [u for u in sorted(w.ds.sequences) if u not in measured and len(w.ds.sequences[u]) >= 2]
        out = []
        for j, u in enumerate(others[::max(1, len(others) // b.calibration_requests)][:b.calibration_requests]):
            seq = list(w.ds.sequences[u])
            seen = set(seq)
            cands = [c for c in w.requests[j % len(w.requests)].candidates if c not in seen]
            if len(cands) >= 2:
                try:
                    engine.builder.build(seq, cands)
                except ValueError:  # beyond the prompt's length limit
                    continue
                out.append((f"calibration-{u}", seq, cands))
        return out
    got, how = cal.load_or_calibrate(Recommender(engine, retriever, "rcllm"), b.snapshot_dir, b.num_candidates,
                                     requests)
    logging.info("%s", f"rcllm policy: the built-in default ({how})" if got is None else got.describe(how))
    return got


def _placement_locality(engine, requests):
    """Locality of this stream's candidates under each placement of the same stored blocks, without
    and (named "<placement>+replicate<r>") with the run's hot-item replication budget (affinity
    routing: each request on the shard holding most of its candidate tokens)."""
    from rcllm_jax.parallel.placement import PLACEMENTS
    logged = engine.store.coaccess is not None
    budgets = [0.0] + ([engine.store.replicate] if engine.store.replicate and logged else [])
    cands = [q.candidates for q in requests]
    if not engine.stats()["item_blocks"]:  # no item block stored (--modes=full): no placement to measure
        return {}
    return {name + (f"+replicate{r:g}" if r else ""): engine.locality(cands, name, r)
            for r in budgets for name in PLACEMENTS if logged or name != "coaccess"}


def _plots(out_dir: Path, modes, results, rows, lengths) -> list[str]:
    """PNGs: TTFT CDF per mode, fidelity vs recompute budget, TTFT vs prompt length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(f"{out_dir.name}/{name}")  # relative to the JSON's folder

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in modes:
        t = np.sort([r.ttft_s for r, _ in results[m]])
        ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post", label=m)
    ax.set(xscale="log", xlabel="TTFT (s, log)", ylabel="fraction of requests", title="TTFT CDF per mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "ttft_cdf.png")

    pts = [r for r in rows if r.get("recompute_fraction") is not None and r.get("top1_agreement") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [r["recompute_fraction"] for r in pts]
        ax.scatter(x, [r["top1_agreement"] for r in pts], color="C0", label="top-1 agreement")
        for r in pts:
            ax.annotate(r["mode"], (r["recompute_fraction"], r["top1_agreement"]), fontsize=7)
        ax.set(xlabel="share of cached block tokens recomputed", ylabel="top-1 agreement with full prefill",
               ylim=(-0.05, 1.05), title="Fidelity vs recompute budget")
        ax2 = ax.twinx()
        ax2.scatter(x, [max(r["kl_mean"], 1e-6) for r in pts], color="C3", marker="x", label="KL")
        ax2.set(yscale="log", ylabel="KL(full || mode)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        save(fig, "fidelity_vs_recompute.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in modes:
        ax.scatter(lengths, [r.ttft_s for r, _ in results[m]], s=8, label=m)
    ax.set(yscale="log", xlabel="prompt tokens", ylabel="TTFT (s, log)", title="TTFT vs prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "ttft_vs_prompt_length.png")
    return written


def _open_loop(run: RunSettings, service_s, seed: int, arrivals=None) -> dict:
    """Response times of one engine serving the stream in order when requests arrive as a Poisson
    process of --arrival_rate, or at a replayed log's arrival times (queueing simulated from
    measured service times)."""
    import numpy as np
    if arrivals is None and run.bench.arrival_rate <= 0:
        return {}
    arrive = (np.asarray(arrivals, np.float64) if arrivals is not None else
              np.cumsum(np.random.default_rng([seed, 11]).exponential(1.0 / run.bench.arrival_rate, len(service_s))))
    end, resp = 0.0, []
    for a, s in zip(arrive, service_s):
        end = max(a, end) + s
        resp.append(end - a)
    rate = run.bench.arrival_rate if arrivals is None else len(arrive) / max(arrive[-1] - arrive[0], 1e-9)
    return {"arrival_rate": rate, "response_p50_s": percentile(resp, 50), "response_p99_s": percentile(resp, 99),
            "utilization": float(sum(service_s) / max(end, 1e-9))}


def _retriever_scores(retriever, q):
    """Scores that rank a request's candidates in the retriever's own order (best first)."""
    order = retriever.retrieve(q.history, len(q.candidates))[0]
    pos = {c: i for i, c in enumerate(order)}
    return [-pos.get(c, len(order)) for c in q.candidates]


def _collaborative_scores(collab: dict, retriever, q):
    """The stage-0 scorer a head was trained over (its card): position and collaborative features."""
    import numpy as np
    from rcllm_jax.retrieval import CANDIDATE_FEATURES
    from rcllm_jax.train.head_fit import Collaborative
    scorer = Collaborative(float(collab["position_weight"]), np.asarray(collab["side_weights"], np.float32))
    names = collab.get("features", CANDIDATE_FEATURES)
    return scorer.logits(retriever.candidate_features(q.history, q.candidates, names)[None])[0].tolist()


def _test_positions(spec: str) -> tuple[int, ...]:
    """--test_positions: '1-3' or '1,2' -> (1, 2, 3)."""
    from rcllm_jax.data.pipeline import parse_positions
    try:
        return parse_positions(spec)
    except ValueError as e:
        raise BenchError(f"--test_positions: {e}") from None


def run_stream(run: RunSettings, engine, mode, requests, prompts, policies, peer=None):
    """One pass of the stream in `mode`; returns per-request (result, history_update_s). Block
    modes are routed to a shard by the server's scheduler (`--scheduler`), one request at a time."""
    from rcllm_jax.serve.scheduler import Scheduler
    sched = Scheduler(engine.num_shards, run.bench.scheduler)
    out = []
    for q, p in zip(requests, prompts):
        upd = None
        if mode.startswith("hf_"):
            res = peer.rank(p, mode, q.user_id)
        elif mode == "prefix_warm":  # the user's prefix pages computed at event time, off the request path
            t0 = time.perf_counter()
            engine.warm_prefix(p)
            upd = time.perf_counter() - t0
            res = engine.rank(p, mode, q.user_id)
        elif mode in policies:
            t0 = time.perf_counter()
            engine.update_user(q.user_id, p)
            upd = time.perf_counter() - t0
            shard = sched.route(engine.shard_bytes(q.candidates))
            res = engine.rank(p, policies[mode], q.user_id, shard=shard)
        else:
            res = engine.rank(p, mode, q.user_id)
        out.append((res, upd))
    return out


@dataclasses.dataclass
class Workload:
    """The request stream and what proposed each request's candidates."""

    ds: object
    split: object
    requests: list
    req_pos: list  # each request's held-back test position (--test_positions), else None
    retr_of: list  # the retriever that proposed each request's candidates (None: sampled)
    retriever: object = None
    retrievers: dict | None = None  # one per test position
    positions: tuple | None = None
    retriever_info: dict | None = None
    skipped_users: list = dataclasses.field(default_factory=list)  # not run (--rank_retrieved_only): misses
    clustered: bool = False  # several requests per user: intervals resample users
    cold: object = None  # --slice: the cold items and users every fit leaves out (data/slices.ColdSplit)

    @property
    def skipped(self) -> int:
        return len(self.skipped_users)


def _retrievers(split, positions, cold=None):
    """(the retriever, one per test position or None, its description) with --candidates=retrieved
    (with `cold`: fitted without the cold items and users)."""
    from rcllm_jax.retrieval import fit_before
    t1 = time.perf_counter()
    if positions:  # one retriever per held-back position, each fitted strictly before it
        retrievers = {p: fit_before(split, p, cold=cold) for p in positions}
        retriever = retrievers[positions[0]]
    else:
        retrievers, retriever = None, fit_before(split, 2)
    return retriever, retrievers, {"kind": "item-knn (cosine co-occurrence, training split only)",
                                   "neighbours": int(retriever.neighbours.shape[1]), "recent": retriever.recent,
                                   "decay": retriever.decay, "fit_s": time.perf_counter() - t1}


def _workload(run: RunSettings) -> Workload:
    """The requests of the flags: generated from MovieLens (test targets, held-back positions, a
    stream with growing histories) or replayed from a log; their candidates sampled or retrieved."""
    import numpy as np
    from rcllm_jax.data.catalog import CatalogError, load_catalog
    from rcllm_jax.data.movielens import LeaveOneOut
    from rcllm_jax.data.pipeline import eval_requests, heldout_requests, stream_requests
    try:
        ds = load_catalog(run.catalog)
    except CatalogError as e:
        raise BenchError(str(e)) from None
    split = LeaveOneOut(ds)
    positions = _test_positions(run.bench.test_positions) if run.bench.test_positions else None
    if positions and (run.bench.requests or run.bench.requests_per_user > 1):
        raise BenchError("--test_positions makes its own requests: drop --requests / --requests_per_user")
    b = run.bench
    cold = None
    if b.slice:
        if not positions or b.candidates != "retrieved":
            raise BenchError("--slice needs --test_positions and --candidates=retrieved")
        from rcllm_jax.data.slices import choose_cold
        try:
            cold = choose_cold(ds)
        except ValueError as e:  # a dataset without interaction times
            raise BenchError(f"--slice: {e}") from None
    retriever = retrievers = info = None
    if run.bench.candidates == "retrieved":
        retriever, retrievers, info = _retrievers(split, positions, cold)
    pick = dict(num_candidates=b.num_candidates, negatives=b.negatives, seed=b.seed, retriever=retriever,
                order=b.candidate_order)
    req_pos = None
    if run.bench.requests:
        from rcllm_jax.data.pipeline import read_request_log
        try:
            requests = read_request_log(run.bench.requests, ds)
        except (OSError, ValueError) as e:
            raise BenchError(f"--requests: {e}") from None
        if retriever is not None:
            raise BenchError("--requests brings its own candidates: drop --candidates=retrieved")
    elif run.bench.requests_per_user > 1:
        requests = stream_requests(split, num_users=b.num_users, requests_per_user=b.requests_per_user, **pick)
    elif cold is not None:
        from rcllm_jax.data.pipeline import sliced_requests
        requests, req_pos = sliced_requests(split, cold, positions, b.slice, num_candidates=b.num_candidates,
                                            seed=b.seed, num_users=b.num_users, retrievers=retrievers,
                                            order=b.candidate_order)
        if not requests:
            raise BenchError(f"--slice={b.slice}: no request of the first {b.num_users} users is in that slice")
    elif positions:
        requests, req_pos = heldout_requests(split, positions, num_candidates=b.num_candidates, negatives=b.negatives,
                                             seed=b.seed, num_users=b.num_users, retrievers=retrievers,
                                             order=b.candidate_order)
    else:
        requests = list(eval_requests(split, stage=run.bench.stage, num_users=run.bench.num_users, **pick))
    req_pos = req_pos or [None] * len(requests)
    w = Workload(ds, split, requests, req_pos, [retrievers[p] for p in req_pos] if retrievers
                 else [retriever] * len(requests), retriever, retrievers, positions, info,
                 clustered=len({q.user_id for q in requests}) < len(requests), cold=cold)
    if retriever is not None:
        t1 = time.perf_counter()
        for q, r in zip(requests, w.retr_of):
            r.retrieve(q.history, run.bench.num_candidates)
        hit = np.array([q.target_index is not None for q in requests])
        info.update({f"recall@{run.bench.num_candidates}": float(hit.mean()),
                     "retrieve_ms_mean": 1e3 * (time.perf_counter() - t1) / len(requests)})
        if positions:
            info["kind"] = "item-knn (cosine co-occurrence), one per test position, fitted before it"
            if cold is not None:
                info["kind"] += "; without the cold items and users ({})".format(
                    ", ".join(f"{k} {v}" for k, v in cold.describe().items()))
            at = np.asarray(req_pos)
            info[f"recall@{run.bench.num_candidates}_by_position"] = {p: float(hit[at == p].mean())
                                                                      for p in positions if (at == p).any()}
    if run.bench.rank_retrieved_only:
        if retriever is None:
            raise BenchError("--rank_retrieved_only needs --candidates=retrieved")
        keep = [q.target_index is not None for q in requests]
        w.skipped_users = [q.user_id for q, k in zip(requests, keep) if not k]
        w.requests, w.req_pos, w.retr_of = ([x for x, k in zip(xs, keep) if k]
                                            for xs in (requests, w.req_pos, w.retr_of))
        if not w.requests:
            raise BenchError("no request has its target among the retrieved candidates")
    return w


def _head(run: RunSettings):
    """The ranking head of --head / --ranking_head (None for label prompts); a UsageError naming
    the problem."""
    from rcllm_jax.engine.ranking_head import ranking_head
    try:
        return ranking_head(run.model.head, run.model.ranking_head)
    except ValueError as e:  # a missing or damaged head file (HeadError), --ranking_head with --head=label
        raise BenchError(str(e)) from None


def _engine(run: RunSettings, model, builder, w: Workload, modes, mesh, layout, head, train_retriever, cut: int):
    """The engine over the stream's candidates, with the co-access log of the training split."""
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.ranking_head import HeadError
    ds, split = w.ds, w.split
    try:
        return Engine(model.params, model.cfg, builder, item_ids=sorted({i for r in w.requests for i in r.candidates}),
                      **({} if run.bench.canonical is None else {"canonical": run.bench.canonical}),
                      user_pages=run.bench.user_cache_pages,  # per device
                      prefix_pages=run.bench.prefix_cache_pages if {"prefix", "prefix_warm"} & set(modes) else 1,
                      attention_impl=run.bench.attention_impl, mesh=mesh, placement=layout.placement,
                      replicate=layout.replicate, kv_dtype=layout.kv_dtype,
                      head=head,  # the co-access log below: placement and replicas
                      coaccess=train_retriever.coaccess_requests(
                          [ds.sequences[u][:-cut] for u in split.users if len(ds.sequences[u]) > cut],
                          k=run.bench.num_candidates))
    except HeadError as e:
        raise BenchError(f"{e}: train a head for these weights (launch/train.py --model=...) and pass "
                             "--ranking_head, or score with the base model alone: --head=label") from None


def _build_store(run: RunSettings, engine) -> dict:
    """Restore (--snapshot_dir) and build the item store; its counts and build time."""
    t0 = time.perf_counter()
    if run.bench.snapshot_dir:
        engine.restore(run.bench.snapshot_dir)
        logging.info("restored the item store from %s", run.bench.snapshot_dir)
    engine.build_store()
    n_tok = sum(len(t) for t in engine.item_blocks.values())
    build = {"item_blocks": len(engine.item_blocks), "item_tokens": n_tok, "build_s": time.perf_counter() - t0}
    logging.info("item store: %d blocks, %d tokens in %.1fs", len(engine.item_blocks), n_tok, build["build_s"])
    return build


def _peer(run: RunSettings, model, head, prompts, modes, impl_of):
    """The transformers peer (--peers), its rows added to modes; (peer or None, a note)."""
    if "transformers" not in run.bench.peers:
        return None, "not requested (--peers=)"
    from rcllm_jax.eval.peers import PEER_MODES, load_peer
    if run.model.head == "label" and not all(p.single_token_labels for p in prompts):
        note, peer = "skipped: the transformers rows score single-token labels only (<= 52 candidates)", None
    else:
        peer, why = load_peer(model.source, head if run.model.head == "slot" else None)
        note = f"loaded in {peer.load_s:.1f}s" if peer is not None else f"skipped: {why}"
        if peer is not None:
            modes += list(PEER_MODES)
            impl_of.update({m: "torch" for m in PEER_MODES})
    print(f"transformers peer: {note}")
    return peer, note


def _run_modes(run: RunSettings, engine, modes, requests, prompts, policies, peer, impl_of) -> dict:
    """Every mode's pass over the stream (after an untimed warm-up pass, --warmup), stores reset
    between modes: {mode: [(result, history update s)], mode/compiles: compiles while timed}."""
    results = {}
    default_impl = engine.impl
    for mode in modes:
        engine.impl = impl_of[mode]
        if run.bench.warmup:
            run_stream(run, engine, mode, requests, prompts, policies, peer)  # warm-up: compiles every shape
            engine.reset_caches()
            if peer is not None:
                peer.reset()
        before = compiles()
        results[mode] = run_stream(run, engine, mode, requests, prompts, policies, peer)
        results[mode + "/compiles"] = compiles() - before
        logging.info("mode %s: %d requests done", mode, len(requests))
        engine.reset_caches()
        if peer is not None:
            peer.reset()
    engine.impl = default_impl
    return results


class _Metrics:
    """Accuracy of a score list over the stream: every request (a target not among the candidates
    is a miss), with retrieved candidates also within the retrieved (suffix _retrieved); 95%
    bootstrap intervals (suffix _ci), over users when a user makes several requests; with
    --test_positions NDCG@10 within the retrieved per position too."""

    def __init__(self, w: Workload, seed: int):
        import numpy as np
        from rcllm_jax.eval.metrics import target_rank
        self.w, self.seed = w, seed
        self.retrieved = np.array([q.target_index is not None for q in w.requests])
        self.scored = np.array([q.target is not None for q in w.requests])  # a replayed log: lines with a target
        self.users = np.asarray([str(q.user_id) for q in w.requests])
        self.pos = np.asarray([-1 if p is None else p for p in w.req_pos])
        self.retriever_ranks = None if w.retriever is None else [
            target_rank(_retriever_scores(r, q), q.target_index) for q, r in zip(w.requests, w.retr_of)]

    def ci(self, values, groups):
        from rcllm_jax.eval.metrics import bootstrap_ci
        return bootstrap_ci(values, seed=self.seed, groups=groups if self.w.clustered else None)

    def _with_ci(self, ranks, groups, suffix=""):
        from rcllm_jax.eval.metrics import per_request_metrics
        per = per_request_metrics(ranks)
        return ({f"{k}{suffix}": float(v.mean()) for k, v in per.items()}
                | {f"{k}{suffix}_ci": self.ci(per[k], groups) for k in ("hr@10", "ndcg@10")})

    def of(self, ranks) -> dict:
        import numpy as np
        from rcllm_jax.eval.metrics import MISS, per_request_metrics
        if not self.scored.any():
            return {}
        w, got = self.w, self.retrieved
        out = self._with_ci(np.r_[np.asarray(ranks, np.float64)[self.scored], np.full(w.skipped, MISS)],
                            np.r_[self.users[self.scored], np.asarray([str(u) for u in w.skipped_users])])
        if w.retriever is not None and got.any():
            out |= self._with_ci(np.asarray(ranks)[got], self.users[got], "_retrieved")
            if w.positions:
                per = per_request_metrics(np.asarray(ranks)[got])["ndcg@10"]
                out["ndcg@10_retrieved_by_position"] = {p: float(per[self.pos[got] == p].mean())
                                                        for p in w.positions if (self.pos[got] == p).any()}
        return out

    def vs_retriever(self, ranks) -> dict:
        """Paired 95% bootstrap interval of the mean NDCG@10 difference to the retriever's own
        order over the requests whose target was retrieved (> 0: better than the retriever)."""
        return self.paired(ranks, self.retriever_ranks, "retriever")

    def paired(self, ranks, ref_ranks, name: str) -> dict:
        """The mean NDCG@10 difference to another scorer's ranks of the same requests (`name`) over
        the requests whose target was retrieved, with its paired 95% bootstrap interval."""
        import numpy as np
        from rcllm_jax.eval.metrics import per_request_metrics
        got = self.retrieved
        if self.w.retriever is None or ref_ranks is None or not got.any():
            return {}
        d = (per_request_metrics(np.asarray(ranks)[got])["ndcg@10"]
             - per_request_metrics(np.asarray(ref_ranks)[got])["ndcg@10"])
        return {f"ndcg@10_retrieved_minus_{name}": float(d.mean()),
                f"ndcg@10_retrieved_minus_{name}_ci": self.ci(d, self.users[got])}


def _mode_rows(run: RunSettings, engine, model, modes, results, w: Workload, prompts, policies, impl_of,
               metrics: _Metrics,
               engine_scores, machine, ablation_ranks=None) -> list[dict]:
    """One row per mode: TTFT, tokens, the floor and its parts, accuracy (and the paired difference
    to the head's collaborative-only ablation, `ablation_ranks`), fidelity vs full, locality."""
    import jax
    import numpy as np
    from rcllm_jax.eval.fidelity import fidelity
    from rcllm_jax.eval.floor import prompt_weight_bytes, request_floor_s, selective_flops
    from rcllm_jax.eval.metrics import target_rank
    peak, bw = machine
    itemsize = jax.numpy.dtype(model.cfg.dtype).itemsize
    kvb = engine.kv_bytes_per_token
    lengths = [len(p) for p in prompts]
    ref = [r.scores for r, _ in results["full"]] if "full" in results else None
    rows, full_metrics = [], None
    for mode in modes:
        res = [r for r, _ in results[mode]]
        ranks = [target_rank(r.scores, q.target_index) for r, q in zip(res, w.requests)]
        acc = metrics.of(ranks) | metrics.vs_retriever(ranks) | metrics.paired(ranks, ablation_ranks,
                                                                                "collaborative_only")
        if mode == "full":
            full_metrics = acc
        recomputed = sum(r.recomputed_block_tokens for r in res)
        cached_total = sum(r.cached_block_tokens for r in res)
        floors = [request_floor_s(model.cfg, r.computed_tokens, r.prompt_tokens,
                                  r.cache_hit_tokens * kvb + prompt_weight_bytes(model.cfg, p, itemsize), peak, bw)
                  for r, p in zip(res, prompts)]
        row = {"mode": mode, "impl": impl_of[mode] if mode in policies or mode.startswith("hf_") else "xla",
               "ttft_p50_s": percentile([r.ttft_s for r in res], 50),
               "ttft_p99_s": percentile([r.ttft_s for r in res], 99),
               "prompt_tokens_p50": percentile(lengths, 50), "prompt_tokens_max": int(max(lengths)),
               "computed_tokens_p50": percentile([r.computed_tokens for r in res], 50),
               "cache_hit_tokens": float(np.mean([r.cache_hit_tokens for r in res])),
               "recompute_fraction": float(recomputed / max(1, cached_total)) if mode in policies else None,
               "history_update_s_p50": percentile([u for _, u in results[mode] if u is not None], 50),
               "compiles_during_timing": results[mode + "/compiles"],
               "floor_s_p50": percentile(floors, 50),
               "first_slot_share": float(np.mean([r.order[0] == 0 for r in res])),
               **_open_loop(run, [r.ttft_s + (u or 0.0) for r, u in results[mode]], run.bench.seed,
                            [q.arrival_s for q in w.requests] if w.requests[0].arrival_s is not None else None),
               **acc}
        row["ttft_over_floor"] = row["ttft_p50_s"] / row["floor_s_p50"]
        # the floor's parts: FLOPs that must be computed, bytes that must be read (cached KV +
        # weights), and the achieved fraction of the measured peak / bandwidth at the median
        flops = [selective_flops(model.cfg, r.computed_tokens, r.prompt_tokens) for r in res]
        kv_read = [r.cache_hit_tokens * kvb for r in res]
        row.update(flops_p50=percentile(flops, 50), kv_bytes_read_p50=percentile(kv_read, 50),
                   achieved_flops_fraction=percentile([f / r.ttft_s / peak for f, r in zip(flops, res)], 50),
                   achieved_kv_bandwidth_fraction=percentile([b / r.ttft_s / bw for b, r in zip(kv_read, res)], 50))
        if ref is not None:
            row.update(fidelity(ref, [r.scores for r in res]))
            if engine_scores is not None:  # the engine's own scores, before the collaborative term
                row.update({f"engine_{k}": v for k, v in fidelity(engine_scores["full"], engine_scores[mode]).items()})
            row.update({f"{k}_minus_full": acc[k] - full_metrics[k] for k in ("hr@1", "hr@5", "hr@10")}
                       if full_metrics else {})
        if mode in policies:
            row["policy"] = dataclasses.asdict(policies[mode])
            local_b, remote_b = sum(r.local_item_bytes for r in res), sum(r.remote_item_bytes for r in res)
            row.update(remote_blocks_per_request=float(np.mean([r.remote_item_blocks for r in res])),
                       remote_bytes_per_request=float(np.mean([r.remote_item_bytes for r in res])),
                       local_fraction=float(local_b / max(1, local_b + remote_b)),
                       shard_requests=np.bincount([r.shard for r in res], minlength=engine.num_shards).tolist())
        rows.append(row)
    return rows


def _content_scores(retriever, q):
    """The content row: each candidate's content score (`ItemKNN.content_scores`: text similarity
    to the user's history)."""
    s = retriever.content_scores(q.history)
    return [float(s[retriever.index[c]]) if c in retriever.index else 0.0 for c in q.candidates]


def _ablation_scores(ablation, retriever, q):
    """The head's collaborative-only ablation (`SlotHead.collaborative_only`): its scores, which no
    slot state moves (zeros stand in for them)."""
    import numpy as np
    from rcllm_jax.recommender import final_scores
    own = ablation.scores(np.zeros((len(q.candidates), len(ablation.theta) - 1), np.float32))
    return final_scores(ablation, retriever, q.history, q.candidates, own).tolist()


def _baseline_rows(run: RunSettings, w: Workload, metrics: _Metrics, head, side_source) -> tuple[list[dict], dict]:
    """Rows without a model: popularity (before each test position), random, the retriever's own
    order, the content path's scores, the collaborative scorer the head was trained over (its card)
    and the head's collaborative-only ablation (the head without its slot-state weights: what the
    LLM adds over it). Returns (rows, {row: ranks})."""
    import collections

    import numpy as np
    from rcllm_jax.eval.metrics import popularity_scores, random_scores, target_rank
    rng = np.random.default_rng(run.bench.seed)

    from rcllm_jax.data.slices import fitting_sequences
    popularity = {p: (w.split.popularity if p is None else  # interactions strictly before each test position
                      collections.Counter(i for s in fitting_sequences(w.ds, w.cold, p, w.split.users) for i in s))
                  for p in set(w.req_pos)}
    baselines = {"popularity": [popularity_scores(q.candidates, popularity[p]) for q, p in zip(w.requests, w.req_pos)],
                 "random": [random_scores(len(q.candidates), rng) for q in w.requests]}
    if w.retriever is not None:  # the retriever's own order of the same candidates
        baselines = {"retriever": [_retriever_scores(r, q) for q, r in zip(w.requests, w.retr_of)]} | baselines
        if w.retriever.content is not None:
            baselines["content"] = [_content_scores(r, q) for q, r in zip(w.requests, w.retr_of)]
    collab = (head.card.get("collaborative") if side_source is not None else None)
    if collab:
        baselines = {"collaborative": [_collaborative_scores(collab, r or side_source, q)
                                       for q, r in zip(w.requests, w.retr_of)]} | baselines
    if side_source is not None:
        ablation = head.collaborative_only()
        baselines = {"collaborative_only": [_ablation_scores(ablation, r or side_source, q)
                                            for q, r in zip(w.requests, w.retr_of)]} | baselines
    rows, all_ranks = [], {}
    for name, scores in baselines.items():
        ranks = all_ranks[name] = [target_rank(s, q.target_index, rng) for s, q in zip(scores, w.requests)]
        rows.append({"mode": name, "ttft_p50_s": None, "ttft_p99_s": None,
                     "prompt_tokens_p50": None, "prompt_tokens_max": None, **metrics.of(ranks),
                     **(metrics.vs_retriever(ranks) if name.startswith("collaborative") else {})})
    return rows, all_ranks


def _print_table(run: RunSettings, w: Workload, model, rows, metrics: _Metrics, config: dict):
    def fmt(v, f):
        return format("-", ">" + f.split(".")[0].rstrip("df")) if v is None else format(v, f)

    n = len(w.requests)
    b = run.bench
    print(f"{w.ds.name}, {n} requests ({b.num_users} users x {b.requests_per_user}), {b.num_candidates} candidates, "
          f"history {run.catalog.history_len}, {Path(model.source).name} ({run.model.dtype}), {os.cpu_count()} cores")
    print(f"{'mode':<13} {'ttft p50':>9} {'ttft p99':>9} {'tok p50':>8} {'computed':>8} {'top1agr':>7} "
          f"{'KL':>7} {'tau':>6} {'recomp':>6} {'/floor':>6} {'HR@1':>6} {'HR@5':>6} {'HR@10':>6} {'NDCG@10':>7} {'MRR':>6}")
    for r in rows:
        print(f"{r['mode']:<13} {fmt(r['ttft_p50_s'], '9.3f')} {fmt(r['ttft_p99_s'], '9.3f')} "
              f"{fmt(r['prompt_tokens_p50'], '8.0f')} {fmt(r.get('computed_tokens_p50'), '8.0f')} "
              f"{fmt(r.get('top1_agreement'), '7.3f')} {fmt(r.get('kl_mean'), '7.4f')} "
              f"{fmt(r.get('kendall_tau'), '6.3f')} {fmt(r.get('recompute_fraction'), '6.3f')} "
              f"{fmt(r.get('ttft_over_floor'), '6.1f')} "
              f"{r['hr@1']:6.3f} {r['hr@5']:6.3f} {r['hr@10']:6.3f} {r['ndcg@10']:7.3f} {r['mrr']:6.3f}")
    info = w.retriever_info
    if info is not None:
        print(f"retriever: recall@{run.bench.num_candidates} {info[f'recall@{run.bench.num_candidates}']:.3f} "
              f"({int(metrics.retrieved.sum())} of {n + w.skipped} targets retrieved), "
              f"{info['retrieve_ms_mean']:.2f} ms per request; metrics above count a target not "
              "retrieved as a miss")
        print(f"{'within retrieved':<17} {'HR@1':>6} {'HR@5':>6} {'HR@10':>6} {'NDCG@10':>7}  NDCG@10 95% CI   "
              "minus retriever (paired 95% CI)")
        for r in rows:
            if "hr@1_retrieved" in r:
                lo, hi = r["ndcg@10_retrieved_ci"]
                d = r.get("ndcg@10_retrieved_minus_retriever")
                vs = "" if d is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(
                    d, *r["ndcg@10_retrieved_minus_retriever_ci"])
                print(f"{r['mode']:<17} {r['hr@1_retrieved']:6.3f} {r['hr@5_retrieved']:6.3f} "
                      f"{r['hr@10_retrieved']:6.3f} {r['ndcg@10_retrieved']:7.3f}  [{lo:.3f}, {hi:.3f}]   {vs}")
        for r in rows:
            if "ndcg@10_retrieved_minus_collaborative_only" in r:
                print("{:<17} NDCG@10 within the retrieved minus the head's collaborative-only ablation (what the "
                      "LLM adds): {:+.3f} [{:+.3f}, {:+.3f}]".format(
                          r["mode"], r["ndcg@10_retrieved_minus_collaborative_only"],
                          *r["ndcg@10_retrieved_minus_collaborative_only_ci"]))
    for name, loc in config["placement_locality"].items():
        print(f"placement {name:<22} on {config['mesh']}: local fraction {loc['local_fraction']:.3f}, "
              f"remote blocks/request {loc['remote_blocks_per_request']:.2f}, "
              f"remote MB/request {loc['remote_bytes_per_request'] / 1e6:.2f}")


def _config(run: RunSettings, w: Workload, model, engine, layout, modes, head, val_pos, build, machine, peer_note,
            lengths) -> dict:
    """The run's configuration, as the JSON records it."""
    import jax
    from rcllm_jax.downloads import portable_path
    argv = [a if "=" not in a or "/" not in a else a.split("=", 1)[0] + "=" + portable_path(a.split("=", 1)[1])
            for a in run.argv]
    b = run.bench
    return {"argv": argv, "dataset": w.ds.name, "num_users": b.num_users, "num_requests": len(w.requests) + w.skipped,
            "requests_run": len(w.requests), "rank_retrieved_only": b.rank_retrieved_only,
            "requests_per_user": b.requests_per_user, "num_candidates": b.num_candidates,
            "history_len": run.catalog.history_len,
            "negatives": b.negatives if w.retriever is None else "retrieved", "candidates": b.candidates,
            "candidate_order": b.candidate_order if w.retriever is not None else None, "retriever": w.retriever_info,
            "stage": run.bench.stage if not w.positions else None, "test_positions": list(w.positions or []),
            "slice": run.bench.slice, "cold": None if w.cold is None else w.cold.describe(),
            "head_validation_position": val_pos if head is not None else None,
            "intervals": "bootstrap over users" if w.clustered else "bootstrap over requests",
            "seed": run.bench.seed, "model": portable_path(model.source),
            "model_fingerprint": engine.fingerprint, "attention_impl": engine.impl,
            "dtype": run.model.dtype, "canonical": engine.canonical, "cpu_cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "devices": len(jax.devices()), "matmul_peak_flops": machine[0], "memory_bandwidth_bytes_s": machine[1],
            "modes": modes, "cached_glue": run.bench.cached_glue, "item_store": build,
            "head_digest": None if head is None else head.digest(),
            "mesh": layout.mesh, "placement": layout.placement,
            "replicate": layout.replicate, "kv_dtype": layout.kv_dtype, "scheduler": run.bench.scheduler,
            "arrival_rate": run.bench.arrival_rate,
            "processes": jax.process_count(), "placement_locality": _placement_locality(engine, w.requests),
            "peers": {"transformers": peer_note},
            "prompt_tokens": {"p10": percentile(lengths, 10), "p50": percentile(lengths, 50),
                              "p90": percentile(lengths, 90),
                              "max": int(max(lengths)), "min": int(min(lengths))}}


def run_benchmark(run: RunSettings, mesh) -> dict:
    """Rank the workload of `run` in each mode on `mesh`: print the table, write the JSON (returned:
    {"config": ..., "results": [rows]}) and the plots. Raises `BenchError` for a workload or
    model the settings cannot make."""
    from rcllm_jax.engine.engine import MODES
    unknown = [m for m in run.bench.modes if m not in MODES]
    if unknown:
        raise BenchError(f"unknown mode {unknown[0]!r}; available: {', '.join(MODES)}")
    modes = list(run.bench.modes) + [f"blend@{float(r):g}" for r in run.bench.sweep]
    layout = run.layout
    from rcllm_jax.data.catalog import prompt_builder
    from rcllm_jax.eval.floor import matmul_peak_flops, memory_bandwidth
    from rcllm_jax.model import load_model
    from rcllm_jax.retrieval import fit_before

    count_compiles()  # the process's one compile listener (idempotent)
    t0 = time.perf_counter()
    head = _head(run)  # checked before the workload and the model load: a refused run fails at once
    val_pos = 2 if head is None else int(head.card.get("validation_position", 2))
    if head is not None and run.bench.test_positions and max(_test_positions(run.bench.test_positions)) >= val_pos:
        raise BenchError(f"the ranking head was validated at held-back position {val_pos} and trained above it: "
                         f"--test_positions must be below {val_pos}, got {run.bench.test_positions!r}")
    w = _workload(run)
    # the training split's retriever (before the earliest test position): the coaccess placement's
    # graph and, without --test_positions, a head's collaborative features
    cut = max(w.positions) if w.positions else 2
    train_retriever = (w.retrievers[cut] if w.retrievers else w.retriever) or fit_before(w.split, 2)
    model = load_model(run.model.model, dtype=run.model.dtype, adapter=run.model.adapter,
                       random_weights=run.model.random_weights)
    builder = prompt_builder(model.tokenizer, w.ds, run.catalog, head=run.model.head,
                             max_prompt_tokens=model.cfg.max_position)
    prompts = [builder.build(r.history, r.candidates) for r in w.requests]
    lengths = [len(p) for p in prompts]
    logging.info("%d requests ready in %.1fs", len(w.requests), time.perf_counter() - t0)

    engine = _engine(run, model, builder, w, modes, mesh, layout, head, train_retriever, cut)
    policies = _policies(run)
    build = _build_store(run, engine) if any(m in policies for m in modes) else {}
    calibration = _calibrate(run, engine, w, train_retriever) if "rcllm" in modes else None
    if calibration is not None:
        policies["rcllm"] = calibration.policy
    impl_of = {m: engine.impl for m in modes}
    if run.bench.compare_impl:
        from rcllm_jax.kernels import resolve
        other = "xla" if engine.impl != "xla" else resolve("pallas")
        for m in [m for m in modes if m in policies]:
            name = f"{m}@{'xla' if other == 'xla' else 'pallas'}"
            policies[name], impl_of[name] = policies[m], other
            modes.append(name)
    peer, peer_note = _peer(run, model, head, prompts, modes, impl_of)
    results = _run_modes(run, engine, modes, w.requests, prompts, policies, peer, impl_of)
    side_source, engine_scores = None, None
    if head is not None and head.side_weights is not None:  # the head adds the retriever's features
        engine_scores = {m: [r.scores for r, _ in results[m]] for m in modes}  # fidelity of the model's part too
        from rcllm_jax.recommender import check_side_features, final_scores
        side_source = train_retriever
        check_side_features(head, side_source)
        for mode in modes:  # each request's features from the retriever that proposed its candidates
            results[mode] = [(dataclasses.replace(r, scores=final_scores(head, rq or side_source, q.history,
                                                                         q.candidates, r.scores)), u)
                             for (r, u), q, rq in zip(results[mode], w.requests, w.retr_of)]

    machine = (matmul_peak_flops(), memory_bandwidth())
    metrics = _Metrics(w, run.bench.seed)
    base_rows, base_ranks = _baseline_rows(run, w, metrics, head, side_source)
    rows = _mode_rows(run, engine, model, modes, results, w, prompts, policies, impl_of, metrics, engine_scores,
                      machine, base_ranks.get("collaborative_only")) + base_rows
    config = _config(run, w, model, engine, layout, modes, head, val_pos, build, machine, peer_note, lengths)
    config["calibration"] = None if calibration is None else calibration.summary()
    _print_table(run, w, model, rows, metrics, config)
    Path(run.bench.output_json).parent.mkdir(parents=True, exist_ok=True)
    plots_dir = Path(run.bench.plots_dir or str(Path(run.bench.output_json).with_suffix("")) + "_plots")
    config["plots"] = _plots(plots_dir, modes, results, rows, lengths)
    Path(run.bench.output_json).write_text(json.dumps({"config": config, "results": rows}, indent=2, default=str))
    print(f"wrote {run.bench.output_json} and {len(config['plots'])} plots in {plots_dir}")
    return {"config": config, "results": rows}
