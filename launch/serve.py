"""Serve ranked recommendations over HTTP.

python launch/serve.py --mesh=items:4
With no other flag: fetches the default model (SmolLM2-135M-Instruct) and MovieLens-100k, restores
the item-cache snapshot for this model (or builds and saves it once), restores the saved user
store's KV, opens the state database (user histories and the event log, SQLite: seeded once
from the dataset's histories), and serves on 127.0.0.1:8000 (README: API and curl examples). On a
CPU-only machine with fewer devices than --mesh asks for, it simulates them and says so in its
log. Every acknowledged event is committed before its answer: a kill -9 loses none. SIGTERM or
Ctrl-C: stops accepting, answers every queued request, saves the user store's KV (a cache of the
database's histories; a restart restores it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from rcllm_jax.data.prompt import SERVED_HEAD, SERVED_HISTORY_LEN  # noqa: E402  (the shared default prompt)

from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement, multi-host flags)
from rcllm_jax.serve.scheduler import SCHEDULERS  # noqa: E402
from rcllm_jax.serve.service import SERVING_STEPS  # noqa: E402

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free port; the log says which).")
_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
_ADAPTER = flags.DEFINE_string("adapter", None, "LoRA adapter directory for --model.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_DATASET = flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "Catalog and user histories.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset files (default: fetch ml-100k).")
_SNAP = flags.DEFINE_string("snapshot_dir", None, "Item-cache snapshot (default: <cache>/snapshots/<model "
                            "fingerprint>-<dataset>); built and saved there when absent.")
_REBUILD = flags.DEFINE_bool("rebuild_on_damage", None, "When no step of the item-cache snapshot is intact, "
                             "rebuild it (default: yes at the default location, no for --snapshot_dir).")
_USERS_DIR = flags.DEFINE_string("users_dir", None, "User-store KV snapshot (default: <snapshot_dir>-users).")
_STATE_DB = flags.DEFINE_string("state_db", None, "State database (user histories, event log): a SQLite file "
                                "(default: <users_dir>-state.sqlite3), or postgresql://... shared by several "
                                "server replicas (pip install 'rcllm-jax[postgres]').")
_MAX_HIST = flags.DEFINE_integer("max_history", 1000, "Items a stored history keeps at most (the most recent; "
                                 "the event log keeps every event).")
_CLIENT_CONNS = flags.DEFINE_integer("max_client_connections", 256, "Open connections one client address may hold "
                                     "(beyond: 503 + Retry-After).")
_MODE = flags.DEFINE_string("mode", "rcllm", "Prefill mode: rcllm, stitch, sink, deviation, full, prefix.")
_SCHED = flags.DEFINE_enum("scheduler", "affinity", list(SCHEDULERS), "Shard assignment policy.")
_QUEUE = flags.DEFINE_integer("max_queue", 0, "Requests waiting at most (beyond: 503 + Retry-After); 0: sized "
                              "from the returning users' service time measured in the warm-up and --latency_target_s "
                              "(--adapt_queue_bound: then from the traffic's), and bounded by cost too: at most half "
                              "the target of estimated engine time waiting (the other half: the window in flight), a "
                              "new user's request (its history prefix to compute) costing what the warm-up measured.")
_TARGET = flags.DEFINE_float("latency_target_s", 5.0, "Queueing a request may add at most (sizes --max_queue=0).")
_ADAPT = flags.DEFINE_bool("adapt_queue_bound", False, "With --max_queue=0: keep resizing the bound from the service "
                           "time measured on the traffic (a moving average), not only from the warm-up's. Off by "
                           "default: after a phase of new users it shrank to 1 and cost returning users 503s "
                           "(BENCHMARKS.md, serving state).")
_GRACE = flags.DEFINE_float("shutdown_grace_s", 5.0, "On SIGTERM, open connections get this long after the "
                            "queue is answered and the user store saved; then they are closed.")
_CONNS = flags.DEFINE_integer("max_connections", 1024, "Open connections at most (beyond: 503).")
_WINDOW = flags.DEFINE_integer("window", 32, "Requests per scheduling window (at most half the bound when the "
                                "bound is sized from --latency_target_s).")
_HEAD = flags.DEFINE_enum("head", SERVED_HEAD, ["label", "slot"], "How candidates are scored: score slots read by a "
                          "trained head (--ranking_head; default: the head shipped for the default model), or the "
                          "answer's label logits (any model, no head).")
_HEAD_PATH = flags.DEFINE_string("ranking_head", None, "Slot-head directory (default with --head=slot: the shipped "
                                 "rcllm_jax/assets/slot_head, trained for the default model).")
_HIST = flags.DEFINE_integer("history_len", SERVED_HISTORY_LEN, "History items in a prompt (the most recent).")
_MAX_CANDS = flags.DEFINE_integer("max_candidates", 52, "Most candidates per request (52: single-token labels).")
_NUM_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates the retriever proposes for a request that "
                                  "sends none (its num_candidates field overrides).")
_USER_MB = flags.DEFINE_float("user_cache_mb", 2048, "User-store budget per device in MB (it is replicated on "
                              "every device): 2048 MB hold ~120 users' prefixes at history 20 for the default model "
                              "(~375 tokens, 17 MB each in f32).")
_USER_PAGES = flags.DEFINE_integer("user_cache_pages", 0, "User-store budget in 16-token pages (overrides "
                                   "--user_cache_mb).")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 0, "Serve only the first N catalog items (0 = all; smoke tests).")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 30.0, "A request not answered after this long gets 503 + "
                               "Retry-After and is dropped, not computed.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 64 * 1024, "Larger request bodies get 413.")
_STEP = flags.DEFINE_enum("serving_step", "auto", ["auto", *SERVING_STEPS], "batched: block-mode requests of a "
                          "scheduling window run as serving steps, each shard's requests one batch, every shard in "
                          "one program (Engine.rank_step); serial: one request at a time; auto: serial on CPU "
                          "devices (they share the host's cores: a step's padding is real work there; measured "
                          "4.63 vs 3.21 requests/s on items:2, BENCHMARKS.md), batched on GPU / TPU (unmeasured).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Requests per shard in one serving step at most (batched).")
_WARM = flags.DEFINE_bool("warmup", True, "Compile before serving: in the block modes every request shape the server "
                          "accepts (--history_len, --max_candidates, the served items; Engine.warm_up), on every "
                          "shard; in the baselines typical requests' shapes.")
_WARM_N = flags.DEFINE_integer("warmup_prompts", 6, "Prompts shaped like traffic (distinct history-length buckets) "
                               "timed in the warm-up (the service time that sizes --max_queue; the baselines' "
                               "warm-up).")


def _warmup_prompts(builder, ds, item_ids, n: int, retriever=None, num_candidates: int = 20):
    """Up to n prompts shaped like real traffic (real histories, the retriever's candidates for
    them, as a request without candidates gets) whose history prefixes fall in different shape
    buckets: the compiles real traffic would otherwise pay for."""
    from rcllm_jax.buckets import bucket
    served = set(item_ids)
    out, seen = [], set()
    for user, seq in ds.sequences.items():
        if len(out) >= n:
            break
        for k in (num_candidates, 10, 5, 1):
            k = min(k, _MAX_CANDS.value, len(item_ids))
            try:
                cands = [i for i in retriever.retrieve(seq, k)[0] if i in served] if retriever is not None else []
                p = builder.build(seq, cands if len(cands) == k else item_ids[:k])
            except ValueError:
                continue
            key = bucket(len(p.blocks[0].tokens) + len(p.blocks[1].tokens), 16)
            if key not in seen:
                seen.add(key)
                out.append(p)
            break
    return out or [builder.build([], item_ids[:1])]


def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss_during(fn):
    """(fn(), the peak resident memory sampled every 20 ms while it ran)."""
    peak, done = [_rss_bytes()], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_bytes())
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        return fn(), max(peak[0], _rss_bytes())
    finally:
        done.set()
        t.join()


def _open(mesh):
    """The served engine and its catalog (`open_served`), a UsageError naming what to do when the
    snapshot is refused or the head does not fit the model."""
    from rcllm_jax.cache.snapshot import SnapshotError
    from rcllm_jax.engine.ranking_head import HeadError
    from rcllm_jax.recommender import open_served
    try:
        return open_served(model=_MODEL.value, adapter=_ADAPTER.value, dtype=_DTYPE.value, dataset=_DATASET.value,
                           data_dir=_DATA_DIR.value, head=_HEAD.value, ranking_head=_HEAD_PATH.value,
                           history_len=_HIST.value, max_candidates=_MAX_CANDS.value, user_mb=_USER_MB.value,
                           user_pages=_USER_PAGES.value, max_items=_MAX_ITEMS.value,
                           mesh=mesh, placement=dist_cli.PLACEMENT.value, replicate=dist_cli.REPLICATE.value,
                           kv_dtype=dist_cli.KV_DTYPE.value, snapshot_dir=_SNAP.value,
                           mode=_MODE.value, rebuild_on_damage=_REBUILD.value)
    except SnapshotError as e:
        raise app.UsageError(f"{e} (--rebuild_on_damage rebuilds it)") from None
    except HeadError as e:
        raise app.UsageError(f"the ranking head {_HEAD_PATH.value or 'shipped with rcllm_jax'} was trained for other "
                             f"weights than --model ({e}): train one (launch/train.py --model=...) and pass "
                             "--ranking_head, or serve with --head=label") from None


def _warm_up(served, step: str) -> tuple[float, float | None]:
    """Compile before the first user waits (block modes: every accepted request shape on every
    shard); returns the measured engine time of a returning user's and a new user's request (p50)."""
    from rcllm_jax.engine.selective_recompute import BLOCK_MODES
    engine, ds, item_ids = served.engine, served.dataset, served.item_ids
    t1 = time.perf_counter()
    probes = _warmup_prompts(engine.builder, ds, item_ids, _WARM_N.value, served.recommender.retriever,
                             _NUM_CANDS.value)
    if _MODE.value in BLOCK_MODES:  # every shape a request can take, on every shard (and batch bucket)
        n_shapes = engine.warm_up(_MODE.value, _MAX_CANDS.value, _MAX_BATCH.value if step == "batched" else 0)
        what = f"every accepted request shape ({n_shapes} shard x shape programs)"
    else:  # the baselines: requests shaped like traffic (a shape outside their buckets still compiles)
        for s in range(engine.num_shards):
            for j, probe in enumerate(probes):
                engine.rank(probe, _MODE.value, user_id=f"warmup-{j}", shard=s)
        n_fetch = engine.warm_fetch()
        what = f"{len(probes)} prompt shapes (+ {n_fetch} remote-fetch shapes)"
    warm = [engine.rank(p, _MODE.value, user_id=f"warmup-{j}", shard=0).ttft_s for j, p in enumerate(probes)]
    engine.reset_caches()
    cold = []  # a new user's request: its history prefix computed too
    for j, p in enumerate(probes):
        t2 = time.perf_counter()
        engine.rank(p, _MODE.value, user_id=f"warmup-cold-{j}", shard=0)
        cold.append(time.perf_counter() - t2)
    service_s = max(float(sorted(warm)[len(warm) // 2]), 1e-3)
    cold_s = float(sorted(cold)[len(cold) // 2])
    engine.reset_caches()
    logging.info("warmed up %d shards x %s in %.1fs (service time p50 %.3fs returning users, %.3fs new users)",
                 engine.num_shards, what, time.perf_counter() - t1, service_s, cold_s)
    return service_s, cold_s


def _admission(service_s: float, cold_s: float | None):
    """(max_queue, window, cost_s, max_cost_s) of the scheduler. The count bound covers every
    request waiting for the engine: the queue plus the window the loop has taken from it, sized so
    that the last of them waits about --latency_target_s. The cost bound: half the target of
    estimated engine time waiting, a new user's request (its history prefix computed) costing what
    the warm-up measured for one."""
    outstanding = _QUEUE.value + _WINDOW.value if _QUEUE.value else max(8, int(_TARGET.value / service_s))
    window = _WINDOW.value if _QUEUE.value else max(1, min(_WINDOW.value, outstanding // 2))
    cost_s = (service_s, max(cold_s, service_s)) if cold_s is not None and not _QUEUE.value else None
    max_cost_s = _TARGET.value / 2 if cost_s else None
    logging.info("queue bound %d + window %d requests%s (%s)", outstanding - window, window,
                 f", {max_cost_s:g}s of estimated engine time each" if cost_s else "",
                 "--max_queue" if _QUEUE.value else f"--latency_target_s={_TARGET.value:g} / service time "
                 f"{service_s:.3f}s returning users" + (f", {cost_s[1]:.3f}s new" if cost_s else ""))
    return outstanding - window, window, cost_s, max_cost_s


def _state(served, users_dir: str):
    """The state database (seeded with the dataset's histories), the saved user prefixes that still
    stand for their users' histories restored into the engine."""
    from rcllm_jax.cache.snapshot import SnapshotError, SnapshotMismatchError
    from rcllm_jax.serve.state import StateStore
    engine, ds = served.engine, served.dataset
    state = StateStore(_STATE_DB.value or users_dir.rstrip("/") + "-state.sqlite3", max_history=_MAX_HIST.value)
    versions = state.versions()
    try:  # the saved KV of a prefix stays only while it stands for the user's history in the database
        legacy = engine.restore_users(users_dir, keep=lambda u, v: v is None or versions.get(u) == v)
    except SnapshotError as e:
        if isinstance(e, SnapshotMismatchError) or not served.rebuild_on_damage:
            raise app.UsageError(f"{e} (--rebuild_on_damage starts with an empty user store)") from None
        logging.warning("user store not restored, starting empty: %s", e)
        legacy = {}
    if legacy:  # a user snapshot from before the state database carried the histories
        logging.info("moved %d histories of %s into the state database", state.seed(f"{users_dir}", legacy),
                     users_dir)
    seeded = state.seed(f"dataset:{ds.name}", {str(u): s for u, s in ds.sequences.items()})
    logging.info("state database %s: %d users, %d events (%d seeded from %s now); %d cached user prefixes "
                 "restored from %s", state, state.num_users(), state.num_events(), seeded, ds.name,
                 engine.stats()["users_cached"], users_dir)
    return state


def _shut_down(service, engine, users_dir: str):
    """Refuse new work, answer what is queued, save the user store (before anything a slow client
    could delay; the connections get at most --shutdown_grace_s afterwards)."""
    logging.info("stopping: draining %d queued requests", len(service.scheduler))
    if service.stop():  # every queued request answered; later submissions get 503
        rss = _rss_bytes()
        step, peak = _peak_rss_during(lambda: engine.save_users(users_dir))  # the engine loop has ended
        print(f"saved {engine.stats()['users_cached']} user prefixes to {users_dir} (step {step}; RSS "
              f"{rss / 2**30:.2f} GiB serving, peak {peak / 2**30:.2f} GiB while saving)", flush=True)
    else:  # never export a store the engine thread may still be writing; the database holds every history
        print("engine still busy after the drain timeout: user prefixes not saved (histories are in the database)",
              flush=True)


def main(argv):
    del argv
    mesh = dist_cli.setup()
    import jax

    from rcllm_jax.engine.engine import MODES
    from rcllm_jax.serve.http import HttpServer, make_app
    from rcllm_jax.serve.scheduler import Scheduler
    from rcllm_jax.serve.service import RecommenderService, count_compiles

    if _MODE.value not in MODES:
        raise app.UsageError(f"unknown --mode {_MODE.value!r}; modes: {', '.join(MODES)}")
    if jax.process_count() > 1:
        raise app.UsageError("serve.py runs as one process (multi-host serving is not implemented; "
                             "launch/build_cache.py and bench.py take the multi-host flags)")
    t0 = time.perf_counter()
    count_compiles()  # /metrics counts every compile of this process, the warm-up's included
    step = _STEP.value if _STEP.value != "auto" else ("serial" if jax.default_backend() == "cpu" else "batched")
    served = _open(mesh)
    for note in served.notes:
        logging.info("%s", note)
    engine, ds = served.engine, served.dataset
    items = {i: ds.items[i] for i in served.item_ids}
    users_dir = _USERS_DIR.value or served.users_dir
    # a request's engine time when nothing is measured (no warm-up)
    service_s, cold_s = _warm_up(served, step) if _WARM.value else (0.25, None)
    max_queue, window, cost_s, max_cost_s = _admission(service_s, cold_s)
    state = _state(served, users_dir)
    service = RecommenderService(engine, items, state, mode=_MODE.value,
                                 scheduler=Scheduler(engine.num_shards, _SCHED.value, max_queue, window,
                                                     max_cost_s=max_cost_s), cost_s=cost_s,
                                 max_candidates=_MAX_CANDS.value, request_timeout_s=_TIMEOUT.value,
                                 retriever=served.recommender.retriever, num_candidates=_NUM_CANDS.value,
                                 serving_step=step, max_batch=_MAX_BATCH.value,
                                 latency_target_s=_TARGET.value if _ADAPT.value and not _QUEUE.value else None)
    service.start()
    server = HttpServer(make_app(service, _MAX_BODY.value), _HOST.value, _PORT.value,
                        max_connections=_CONNS.value, max_client_connections=_CLIENT_CONNS.value,
                        grace_s=_GRACE.value, retry_after_s=service.retry_after_s,
                        count=lambda status: service.metrics.responses.labels(str(status)).inc())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    host, port = server.address
    print(f"serving on http://{host}:{port} ({len(items)} items, {_MODE.value} mode, {mesh.shape['items']} "
          f"items-shards, {_SCHED.value} scheduler; ready in {time.perf_counter() - t0:.1f}s)", flush=True)
    stop.wait()
    _shut_down(service, engine, users_dir)
    state.close()
    server.close()
    print("bye", flush=True)

if __name__ == "__main__":
    app.run(main)
