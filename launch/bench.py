"""Ranking benchmark: TTFT, accuracy and fidelity per prefill mode on a MovieLens request stream.

python launch/bench.py --modes=full,prefix,stitch,sink,deviation,rcllm --num_users=20 \
    --requests_per_user=3 --num_candidates=20 --history_len=20 --output_json=bench_out/bench.json
With --requests_per_user=1 each user makes one request (the leave-one-out test target); with more,
histories grow between a user's requests (0-2 items, probability 0.5) and every request has fresh
candidates, so prefix caching gets exactly the hits it would really get.
Prints a table and writes JSON {"config": {...}, "results": [{"mode": ..., ...}, ...]}.
TTFT = prompt tokens in -> candidate scores out. Compiles are excluded: a warm-up pass over the
same stream compiles every shape first (stores reset afterwards); `compiles_during_timing` in the
JSON must read 0. Block modes update the user's history cache when the history changes, before
the request (as an event would); that time is `history_update_s_p50`, not TTFT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.data.movielens import NEGATIVES  # noqa: E402  (no JAX import: --mesh may still set devices)
from rcllm_jax.eval.metrics import percentile  # noqa: E402
from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement, multi-host flags)
from rcllm_jax.settings import CatalogSettings, ModelSettings, define_flags, preset_section, read  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
_MODES = flags.DEFINE_list("modes", ["full"], "Prefill modes: full, prefix, prefix_warm (prefix caching with the "
                           "user's instruction + history pages computed at event time), stitch, sink, deviation, rcllm.")
_USERS = flags.DEFINE_integer("num_users", 100, "Users in the stream.")
_REQS = flags.DEFINE_string("requests", None, "Replay a request log instead of MovieLens test requests: JSON lines "
                            "{user_id, history, candidates[, target][, arrival_s]} (README); accuracy over the "
                            "lines with a target, open-loop response times from arrival_s.")
_RPU = flags.DEFINE_integer("requests_per_user", 1, "Requests per user (histories grow between them).")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates per request (held-out item + negatives, or the "
                              "retriever's top-K).")
_CAND_SRC = flags.DEFINE_enum("candidates", "sampled", ["sampled", "retrieved"],
                              "sampled: the target + --negatives; retrieved: an item-kNN retriever's top-K from "
                              "the whole catalog (the target may be missing: a miss), evaluated the LlamaRec way.")
_ONLY_HITS = flags.DEFINE_bool("rank_retrieved_only", False, "With --candidates=retrieved: run the modes only on the "
                                "requests whose target was retrieved. The others are misses whatever the model "
                                "does, so the all-user metrics are unchanged; TTFT and fidelity then describe "
                                "those requests only (for accuracy runs over many users).")
_ORDER = flags.DEFINE_enum("candidate_order", "shuffled", ["shuffled", "retriever"],
                           "Prompt order of retrieved candidates: seeded shuffle or the retriever's order.")
_NEG = flags.DEFINE_enum("negatives", "uniform", list(NEGATIVES), "Negative sampling (retrieval: genre-matched, like a retrieval stage).")
_STAGE = flags.DEFINE_enum("stage", "test", ["test", "valid"], "Leave-one-out target (1 request/user).")
_TEST_POS = flags.DEFINE_string("test_positions", None, "Evaluate the targets held back at these positions from "
                                "the end of each sequence ('1-3' or '1,2'; 1 = the last item) instead of --stage: "
                                "one request per user and position, candidates from a retriever fitted strictly "
                                "before that position (retrieval.fit_before), intervals resampling users. A "
                                "head must have been validated above them (its card's validation_position).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of user order, negatives and tie-breaking.")
_CANON = flags.DEFINE_enum("canonical", None, ["candidate", "instruction"],
                           "Context item blocks are encoded after: the instruction + the glue before a first "
                           "candidate, or the instruction alone (default: the engine's, candidate).")
_SINK = flags.DEFINE_integer("sink", None, "Override: first tokens of each block recomputed (sink, rcllm).")
_RATIO = flags.DEFINE_float("ratio", None, "Override: deviation recompute ratio (deviation, rcllm).")
_CHECK = flags.DEFINE_integer("check_layer", None, "Override: deviation check layer.")
_GLUE = flags.DEFINE_bool("cached_glue", False, "Block modes serve label/question glue from the block store.")
_SWEEP = flags.DEFINE_list("sweep", [], "Extra rows blend@r: sink (--sink, default 2) + deviation at ratio r "
                           "(check layer --check_layer, default 1), glue as --cached_glue says.")
_PREFIX_PAGES = flags.DEFINE_integer("prefix_cache_pages", 4096, "Prefix-cache budget in 16-token pages.")
_USER_PAGES = flags.DEFINE_integer("user_cache_pages", 2048, "User-store budget in 16-token pages.")
_IMPL = flags.DEFINE_enum("attention_impl", "auto", ["auto", "pallas", "xla"],
                          "Kernels of the block modes: Pallas where they compile (auto), always (pallas; "
                          "interpreted on CPU), or the XLA reference.")
_COMPARE = flags.DEFINE_bool("compare_impl", False, "Also run every block mode through the other kernel "
                             "implementation (rows 'mode@pallas' / 'mode@xla'): kernel vs XLA path in one run.")
_WARM = flags.DEFINE_bool("warmup", True, "Run each mode's stream once before timing it (compiles every shape). "
                          "--nowarmup halves an accuracy run; TTFT then includes compiles "
                          "(compiles_during_timing says how many).")
_SNAP = flags.DEFINE_string("snapshot_dir", None, "Restore the item store from this snapshot "
                            "(launch/build_cache.py) instead of building it; blocks it lacks are built.")
_PEERS = flags.DEFINE_list("peers", ["transformers"], "External peers in the same run: transformers (rows "
                           "hf_full, hf_prefix: same weights and prompts on CPU torch); --peers= for none.")
_SCHED = flags.DEFINE_enum("scheduler", "affinity", ["affinity", "round_robin"], "Which items-shard serves a "
                           "block-mode request on a mesh: the one holding most of its item bytes, or request i -> i mod N.")
_RATE = flags.DEFINE_float("arrival_rate", 0.0, "Open-loop arrivals (requests/s, Poisson, seeded): rows add "
                           "response_p50/p99_s = queueing + history update + TTFT of one engine serving the stream "
                           "in arrival order (simulated from the measured service times). 0: back to back.")
_PLOTS = flags.DEFINE_string("plots_dir", None, "Where the PNG plots go (default: <output_json without .json>_plots).")
_OUT = flags.DEFINE_string("output_json", "bench_out/bench.json", "Where to write the JSON.")

flags.FLAGS.set_default("config", str(_ROOT / "configs" / "ml100k_rank.toml"))  # --config (settings)
define_flags(ModelSettings)  # --model, --adapter, --dtype, --head, --ranking_head
define_flags(CatalogSettings, exclude=("max_items",))  # --dataset, --data_dir, --history_len
_MODEL, _ADAPTER, _DTYPE, _HEAD, _HEAD_PATH, _DATASET, _DATA_DIR, _HIST = (
    flags.FLAGS[n] for n in ("model", "adapter", "dtype", "head", "ranking_head", "dataset", "data_dir", "history_len"))
preset_section("workload", ("num_users", "num_candidates", "negatives", "stage", "seed", "requests_per_user",
                            "candidates"))

_COMPILES = [0]


def _count_compiles(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def _policies():
    from rcllm_jax.engine.selective_recompute import BLOCK_MODES, Policy
    over = {k: v for k, v in (("sink", _SINK.value), ("ratio", _RATIO.value), ("check_layer", _CHECK.value))
            if v is not None}
    out = {}
    for name, pol in BLOCK_MODES.items():
        mine = {k: v for k, v in over.items()
                if (k == "sink" and name in ("sink", "rcllm")) or (k != "sink" and name in ("deviation", "rcllm"))}
        out[name] = dataclasses.replace(pol, cached_glue=_GLUE.value or pol.cached_glue, **mine)
    for r in _SWEEP.value:
        out[f"blend@{float(r):g}"] = Policy(sink=out["sink"].sink, ratio=float(r),
                                            check_layer=_CHECK.value or 1, cached_glue=_GLUE.value)
    return out


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


def _open_loop(service_s, seed: int, arrivals=None) -> dict:
    """Response times of one engine serving the stream in order when requests arrive as a Poisson
    process of --arrival_rate, or at a replayed log's arrival times (queueing simulated from
    measured service times)."""
    import numpy as np
    if arrivals is None and _RATE.value <= 0:
        return {}
    arrive = (np.asarray(arrivals, np.float64) if arrivals is not None else
              np.cumsum(np.random.default_rng([seed, 11]).exponential(1.0 / _RATE.value, len(service_s))))
    end, resp = 0.0, []
    for a, s in zip(arrive, service_s):
        end = max(a, end) + s
        resp.append(end - a)
    rate = _RATE.value if arrivals is None else len(arrive) / max(arrive[-1] - arrive[0], 1e-9)
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
    from rcllm_jax.train.head_fit import Collaborative
    scorer = Collaborative(float(collab["position_weight"]), np.asarray(collab["side_weights"], np.float32))
    return scorer.logits(retriever.candidate_features(q.history, q.candidates)[None])[0].tolist()


def _test_positions(spec: str) -> tuple[int, ...]:
    """'1-3' or '1,2' -> (1, 2, 3)."""
    try:
        lo_hi = [int(x) for x in spec.split("-")] if "-" in spec else None
        out = tuple(range(lo_hi[0], lo_hi[1] + 1)) if lo_hi else tuple(int(x) for x in spec.split(","))
    except (ValueError, IndexError):
        raise app.UsageError(f"--test_positions: expected 'a-b' or a comma list of integers, got {spec!r}") from None
    if not out or min(out) < 1:
        raise app.UsageError(f"--test_positions count from the end of a sequence (1 = the last item), got {spec!r}")
    return tuple(sorted(set(out)))


def run_stream(engine, mode, requests, prompts, policies, peer=None):
    """One pass of the stream in `mode`; returns per-request (result, history_update_s). Block
    modes are routed to a shard by the server's scheduler (`--scheduler`), one request at a time."""
    from rcllm_jax.serve.scheduler import Scheduler
    sched = Scheduler(engine.num_shards, _SCHED.value)
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

    @property
    def skipped(self) -> int:
        return len(self.skipped_users)


def _retrievers(split, positions):
    """(the retriever, one per test position or None, its description) with --candidates=retrieved."""
    from rcllm_jax.retrieval import fit_before
    t1 = time.perf_counter()
    if positions:  # one retriever per held-back position, each fitted strictly before it
        retrievers = {p: fit_before(split, p) for p in positions}
        retriever = retrievers[positions[0]]
    else:
        retrievers, retriever = None, fit_before(split, 2)
    return retriever, retrievers, {"kind": "item-knn (cosine co-occurrence, training split only)",
                                   "neighbours": int(retriever.neighbours.shape[1]), "recent": retriever.recent,
                                   "decay": retriever.decay, "fit_s": time.perf_counter() - t1}


def _workload() -> Workload:
    """The requests of the flags: generated from MovieLens (test targets, held-back positions, a
    stream with growing histories) or replayed from a log; their candidates sampled or retrieved."""
    import numpy as np
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
    from rcllm_jax.data.pipeline import eval_requests, heldout_requests, stream_requests
    ds = load_dataset(_DATASET.value, _DATA_DIR.value)
    split = LeaveOneOut(ds)
    positions = _test_positions(_TEST_POS.value) if _TEST_POS.value else None
    if positions and (_REQS.value or _RPU.value > 1):
        raise app.UsageError("--test_positions makes its own requests: drop --requests / --requests_per_user")
    retriever = retrievers = info = None
    if _CAND_SRC.value == "retrieved":
        retriever, retrievers, info = _retrievers(split, positions)
    pick = dict(num_candidates=_CANDS.value, negatives=_NEG.value, seed=_SEED.value, retriever=retriever,
                order=_ORDER.value)
    req_pos = None
    if _REQS.value:
        from rcllm_jax.data.pipeline import read_request_log
        try:
            requests = read_request_log(_REQS.value, ds.items)
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--requests: {e}") from None
        if retriever is not None:
            raise app.UsageError("--requests brings its own candidates: drop --candidates=retrieved")
    elif _RPU.value > 1:
        requests = stream_requests(split, num_users=_USERS.value, requests_per_user=_RPU.value, **pick)
    elif positions:
        requests, req_pos = heldout_requests(split, positions, num_candidates=_CANDS.value, negatives=_NEG.value,
                                             seed=_SEED.value, num_users=_USERS.value, retrievers=retrievers,
                                             order=_ORDER.value)
    else:
        requests = list(eval_requests(split, stage=_STAGE.value, num_users=_USERS.value, **pick))
    req_pos = req_pos or [None] * len(requests)
    w = Workload(ds, split, requests, req_pos, [retrievers[p] for p in req_pos] if retrievers
                 else [retriever] * len(requests), retriever, retrievers, positions, info,
                 clustered=len({q.user_id for q in requests}) < len(requests))
    if retriever is not None:
        t1 = time.perf_counter()
        for q, r in zip(requests, w.retr_of):
            r.retrieve(q.history, _CANDS.value)
        hit = np.array([q.target_index is not None for q in requests])
        info.update({f"recall@{_CANDS.value}": float(hit.mean()),
                     "retrieve_ms_mean": 1e3 * (time.perf_counter() - t1) / len(requests)})
        if positions:
            info["kind"] = "item-knn (cosine co-occurrence), one per test position, fitted before it"
            info[f"recall@{_CANDS.value}_by_position"] = {p: float(hit[np.asarray(req_pos) == p].mean())
                                                         for p in positions}
    if _ONLY_HITS.value:
        if retriever is None:
            raise app.UsageError("--rank_retrieved_only needs --candidates=retrieved")
        keep = [q.target_index is not None for q in requests]
        w.skipped_users = [q.user_id for q, k in zip(requests, keep) if not k]
        w.requests, w.req_pos, w.retr_of = ([x for x, k in zip(xs, keep) if k] for xs in (requests, w.req_pos, w.retr_of))
        if not w.requests:
            raise app.UsageError("no request has its target among the retrieved candidates")
    return w


def _head():
    """The ranking head of --head / --ranking_head (None for label prompts); a UsageError naming
    the problem."""
    from rcllm_jax.engine.ranking_head import ranking_head
    try:
        return ranking_head(_HEAD.value, _HEAD_PATH.value)
    except ValueError as e:  # a missing or damaged head file (HeadError), --ranking_head with --head=label
        raise app.UsageError(str(e)) from None


def _engine(model, builder, w: Workload, modes, mesh, layout, head, train_retriever, cut: int):
    """The engine over the stream's candidates, with the co-access log of the training split."""
    from rcllm_jax.engine.engine import Engine
    from rcllm_jax.engine.ranking_head import HeadError
    ds, split = w.ds, w.split
    try:
        return Engine(model.params, model.cfg, builder, item_ids=sorted({i for r in w.requests for i in r.candidates}),
                      **({} if _CANON.value is None else {"canonical": _CANON.value}), user_pages=_USER_PAGES.value,
                      prefix_pages=_PREFIX_PAGES.value if {"prefix", "prefix_warm"} & set(modes) else 1,  # per device
                      attention_impl=_IMPL.value, mesh=mesh, placement=layout.placement,
                      replicate=layout.replicate, kv_dtype=layout.kv_dtype,
                      head=head,  # the co-access log below: placement and replicas
                      coaccess=train_retriever.coaccess_requests(
                          [ds.sequences[u][:-cut] for u in split.users if len(ds.sequences[u]) > cut],
                          k=_CANDS.value))
    except HeadError as e:
        raise app.UsageError(f"{e}: train a head for these weights (launch/train.py --model=...) and pass "
                             "--ranking_head, or score with the base model alone: --head=label") from None


def _build_store(engine) -> dict:
    """Restore (--snapshot_dir) and build the item store; its counts and build time."""
    t0 = time.perf_counter()
    if _SNAP.value:
        engine.restore(_SNAP.value)
        logging.info("restored the item store from %s", _SNAP.value)
    engine.build_store()
    n_tok = sum(len(t) for t in engine.item_blocks.values())
    build = {"item_blocks": len(engine.item_blocks), "item_tokens": n_tok, "build_s": time.perf_counter() - t0}
    logging.info("item store: %d blocks, %d tokens in %.1fs", len(engine.item_blocks), n_tok, build["build_s"])
    return build


def _peer(model, head, prompts, modes, impl_of):
    """The transformers peer (--peers), its rows added to modes; (peer or None, a note)."""
    if "transformers" not in _PEERS.value:
        return None, "not requested (--peers=)"
    from rcllm_jax.eval.peers import PEER_MODES, load_peer
    if _HEAD.value == "label" and not all(p.single_token_labels for p in prompts):
        note, peer = "skipped: the transformers rows score single-token labels only (<= 52 candidates)", None
    else:
        peer, why = load_peer(model.source, head if _HEAD.value == "slot" else None)
        note = f"loaded in {peer.load_s:.1f}s" if peer is not None else f"skipped: {why}"
        if peer is not None:
            modes += list(PEER_MODES)
            impl_of.update({m: "torch" for m in PEER_MODES})
    print(f"transformers peer: {note}")
    return peer, note


def _run_modes(engine, modes, requests, prompts, policies, peer, impl_of) -> dict:
    """Every mode's pass over the stream (after an untimed warm-up pass, --warmup), stores reset
    between modes: {mode: [(result, history update s)], mode/compiles: compiles while timed}."""
    results = {}
    default_impl = engine.impl
    for mode in modes:
        engine.impl = impl_of[mode]
        if _WARM.value:
            run_stream(engine, mode, requests, prompts, policies, peer)  # warm-up: compiles every shape
            engine.reset_caches()
            if peer is not None:
                peer.reset()
        before = _COMPILES[0]
        results[mode] = run_stream(engine, mode, requests, prompts, policies, peer)
        results[mode + "/compiles"] = _COMPILES[0] - before
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

    def __init__(self, w: Workload):
        import numpy as np
        from rcllm_jax.eval.metrics import target_rank
        self.w = w
        self.retrieved = np.array([q.target_index is not None for q in w.requests])
        self.scored = np.array([q.target is not None for q in w.requests])  # a replayed log: lines with a target
        self.users = np.asarray([str(q.user_id) for q in w.requests])
        self.pos = np.asarray([-1 if p is None else p for p in w.req_pos])
        self.retriever_ranks = None if w.retriever is None else [
            target_rank(_retriever_scores(r, q), q.target_index) for q, r in zip(w.requests, w.retr_of)]

    def ci(self, values, groups):
        from rcllm_jax.eval.metrics import bootstrap_ci
        return bootstrap_ci(values, seed=_SEED.value, groups=groups if self.w.clustered else None)

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
        import numpy as np
        from rcllm_jax.eval.metrics import per_request_metrics
        got = self.retrieved
        if self.w.retriever is None or not got.any():
            return {}
        d = (per_request_metrics(np.asarray(ranks)[got])["ndcg@10"]
             - per_request_metrics(np.asarray(self.retriever_ranks)[got])["ndcg@10"])
        return {"ndcg@10_retrieved_minus_retriever": float(d.mean()),
                "ndcg@10_retrieved_minus_retriever_ci": self.ci(d, self.users[got])}


def _mode_rows(engine, model, modes, results, w: Workload, prompts, policies, impl_of, metrics: _Metrics,
               engine_scores, machine) -> list[dict]:
    """One row per mode: TTFT, tokens, the floor and its parts, accuracy, fidelity vs full,
    locality."""
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
        acc = metrics.of(ranks) | metrics.vs_retriever(ranks)
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
               **_open_loop([r.ttft_s + (u or 0.0) for r, u in results[mode]], _SEED.value,
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


def _baseline_rows(w: Workload, metrics: _Metrics, head, side_source) -> list[dict]:
    """Rows without a model: popularity (before each test position), random, the retriever's own
    order, and the head's collaborative part alone (what the LLM adds over it)."""
    import collections

    import numpy as np
    from rcllm_jax.eval.metrics import popularity_scores, random_scores, target_rank
    rng = np.random.default_rng(_SEED.value)
    popularity = {p: (w.split.popularity if p is None else  # interactions strictly before each test position
                      collections.Counter(i for u in w.split.users for i in w.ds.sequences[u][:-p]))
                  for p in set(w.req_pos)}
    baselines = {"popularity": [popularity_scores(q.candidates, popularity[p]) for q, p in zip(w.requests, w.req_pos)],
                 "random": [random_scores(len(q.candidates), rng) for q in w.requests]}
    if w.retriever is not None:  # the retriever's own order of the same candidates
        baselines = {"retriever": [_retriever_scores(r, q) for q, r in zip(w.requests, w.retr_of)]} | baselines
    collab = (head.card.get("collaborative") if side_source is not None else None)
    if collab:
        baselines = {"collaborative": [_collaborative_scores(collab, r or side_source, q)
                                       for q, r in zip(w.requests, w.retr_of)]} | baselines
    rows = []
    for name, scores in baselines.items():
        ranks = [target_rank(s, q.target_index, rng) for s, q in zip(scores, w.requests)]
        rows.append({"mode": name, "ttft_p50_s": None, "ttft_p99_s": None,
                     "prompt_tokens_p50": None, "prompt_tokens_max": None, **metrics.of(ranks),
                     **(metrics.vs_retriever(ranks) if name == "collaborative" else {})})
    return rows


def _print_table(w: Workload, model, rows, metrics: _Metrics, config: dict):
    def fmt(v, f):
        return format("-", ">" + f.split(".")[0].rstrip("df")) if v is None else format(v, f)

    n = len(w.requests)
    print(f"{w.ds.name}, {n} requests ({_USERS.value} users x {_RPU.value}), {_CANDS.value} candidates, "
          f"history {_HIST.value}, {Path(model.source).name} ({_DTYPE.value}), {os.cpu_count()} cores")
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
        print(f"retriever: recall@{_CANDS.value} {info[f'recall@{_CANDS.value}']:.3f} "
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
    for name, loc in config["placement_locality"].items():
        print(f"placement {name:<22} on {config['mesh']}: local fraction {loc['local_fraction']:.3f}, "
              f"remote blocks/request {loc['remote_blocks_per_request']:.2f}, "
              f"remote MB/request {loc['remote_bytes_per_request'] / 1e6:.2f}")


def _config(w: Workload, model, engine, layout, modes, head, val_pos, build, machine, peer_note, lengths) -> dict:
    """The run's configuration, as the JSON records it."""
    import jax
    from rcllm_jax.downloads import portable_path
    argv = [a if "=" not in a or "/" not in a else a.split("=", 1)[0] + "=" + portable_path(a.split("=", 1)[1])
            for a in sys.argv[1:]]
    return {"argv": argv, "dataset": w.ds.name, "num_users": _USERS.value, "num_requests": len(w.requests) + w.skipped,
            "requests_run": len(w.requests), "rank_retrieved_only": _ONLY_HITS.value,
            "requests_per_user": _RPU.value, "num_candidates": _CANDS.value, "history_len": _HIST.value,
            "negatives": _NEG.value if w.retriever is None else "retrieved", "candidates": _CAND_SRC.value,
            "candidate_order": _ORDER.value if w.retriever is not None else None, "retriever": w.retriever_info,
            "stage": _STAGE.value if not w.positions else None, "test_positions": list(w.positions or []),
            "head_validation_position": val_pos if head is not None else None,
            "intervals": "bootstrap over users" if w.clustered else "bootstrap over requests",
            "seed": _SEED.value, "model": portable_path(model.source),
            "model_fingerprint": engine.fingerprint, "attention_impl": engine.impl,
            "dtype": _DTYPE.value, "canonical": engine.canonical, "cpu_cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "devices": len(jax.devices()), "matmul_peak_flops": machine[0], "memory_bandwidth_bytes_s": machine[1],
            "modes": modes, "cached_glue": _GLUE.value, "item_store": build,
            "head_digest": None if head is None else head.digest(),
            "mesh": layout.mesh, "placement": layout.placement,
            "replicate": layout.replicate, "kv_dtype": layout.kv_dtype, "scheduler": _SCHED.value,
            "arrival_rate": _RATE.value,
            "processes": jax.process_count(), "placement_locality": _placement_locality(engine, w.requests),
            "peers": {"transformers": peer_note},
            "prompt_tokens": {"p10": percentile(lengths, 10), "p50": percentile(lengths, 50), "p90": percentile(lengths, 90),
                              "max": int(max(lengths)), "min": int(min(lengths))}}


def main(argv):
    del argv
    read(ModelSettings)  # applies the --config preset (flags given on the command line win)
    from rcllm_jax.engine.engine import MODES
    unknown = [m for m in _MODES.value if m not in MODES]
    if unknown:
        raise app.UsageError(f"unknown mode {unknown[0]!r}; available: {', '.join(MODES)}")
    modes = list(_MODES.value) + [f"blend@{float(r):g}" for r in _SWEEP.value]
    mesh, layout = dist_cli.setup()
    import jax
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.eval.floor import matmul_peak_flops, memory_bandwidth
    from rcllm_jax.model import load_model
    from rcllm_jax.retrieval import fit_before

    jax.monitoring.register_event_duration_secs_listener(_count_compiles)
    t0 = time.perf_counter()
    head = _head()  # checked before the workload and the model load: a refused run fails at once
    val_pos = 2 if head is None else int(head.card.get("validation_position", 2))
    if head is not None and _TEST_POS.value and max(_test_positions(_TEST_POS.value)) >= val_pos:
        raise app.UsageError(f"the ranking head was validated at held-back position {val_pos} and trained above it: "
                             f"--test_positions must be below {val_pos}, got {_TEST_POS.value!r}")
    w = _workload()
    # the training split's retriever (before the earliest test position): the coaccess placement's
    # graph and, without --test_positions, a head's collaborative features
    cut = max(w.positions) if w.positions else 2
    train_retriever = (w.retrievers[cut] if w.retrievers else w.retriever) or fit_before(w.split, 2)
    model = load_model(_MODEL.value, dtype=_DTYPE.value, adapter=_ADAPTER.value)
    builder = PromptBuilder(model.tokenizer, w.ds.items, history_len=_HIST.value, head=_HEAD.value,
                            max_prompt_tokens=model.cfg.max_position)
    prompts = [builder.build(r.history, r.candidates) for r in w.requests]
    lengths = [len(p) for p in prompts]
    logging.info("%d requests ready in %.1fs", len(w.requests), time.perf_counter() - t0)

    engine = _engine(model, builder, w, modes, mesh, layout, head, train_retriever, cut)
    policies = _policies()
    impl_of = {m: engine.impl for m in modes}
    if _COMPARE.value:
        from rcllm_jax.kernels import resolve
        other = "xla" if engine.impl != "xla" else resolve("pallas")
        for m in [m for m in modes if m in policies]:
            name = f"{m}@{'xla' if other == 'xla' else 'pallas'}"
            policies[name], impl_of[name] = policies[m], other
            modes.append(name)
    build = _build_store(engine) if any(m in policies for m in modes) else {}
    peer, peer_note = _peer(model, head, prompts, modes, impl_of)
    results = _run_modes(engine, modes, w.requests, prompts, policies, peer, impl_of)
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
    metrics = _Metrics(w)
    rows = _mode_rows(engine, model, modes, results, w, prompts, policies, impl_of, metrics, engine_scores, machine)
    rows += _baseline_rows(w, metrics, head, side_source)
    config = _config(w, model, engine, layout, modes, head, val_pos, build, machine, peer_note, lengths)
    _print_table(w, model, rows, metrics, config)
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    plots_dir = Path(_PLOTS.value or str(Path(_OUT.value).with_suffix("")) + "_plots")
    config["plots"] = _plots(plots_dir, modes, results, rows, lengths)
    Path(_OUT.value).write_text(json.dumps({"config": config, "results": rows}, indent=2, default=str))
    print(f"wrote {_OUT.value} and {len(config['plots'])} plots in {plots_dir}")

if __name__ == "__main__":
    app.run(main)
