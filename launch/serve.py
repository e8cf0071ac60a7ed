"""Serve ranked recommendations over HTTP.

python launch/serve.py --mesh=items:4
With no other flag: fetches the default model (SmolLM2-135M-Instruct) and MovieLens-100k, restores
the item-cache snapshot for this model (or builds and saves it once), restores the saved user
store's KV, opens the state database (user histories and the event log, SQLite: seeded once
from the dataset's histories), and serves on 127.0.0.1:8000 (README: API and curl examples). On a
CPU-only machine with fewer devices than --mesh asks for, it simulates them and says so in its
log. Every acknowledged event is committed before its answer: a kill -9 loses none. SIGTERM or
Ctrl-C: stops accepting, answers every queued request, saves the user store's KV (a cache of the
database's histories; a restart restores it). POST /admin/reload takes the newest snapshot step and
the catalog as it is now (after launch/build_cache.py --update) without a restart.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, logging  # noqa: E402

from rcllm_jax.parallel import cli as dist_cli  # noqa: E402  (--mesh, --placement, multi-host flags)
from rcllm_jax.settings import (CatalogSettings, EngineSettings, ModelSettings, ServingSettings,  # noqa: E402
                                define_flags, read)

define_flags(ModelSettings, CatalogSettings, EngineSettings, ServingSettings)


def _warmup_prompts(builder, ds, item_ids, n: int, retriever, num_candidates: int, max_candidates: int):
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
            k = min(k, max_candidates, len(item_ids))
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


def _open(mesh, layout, model: ModelSettings, catalog: CatalogSettings, eng: EngineSettings):
    """The served engine and its catalog (`open_served`), a UsageError naming what to do when the
    snapshot is refused or the head does not fit the model."""
    from rcllm_jax.cache.snapshot import SnapshotError
    from rcllm_jax.data.catalog import CatalogError
    from rcllm_jax.engine.ranking_head import HeadError
    from rcllm_jax.recommender import open_served
    try:
        return open_served(model, catalog, eng, layout, mesh=mesh)
    except CatalogError as e:
        raise app.UsageError(str(e)) from None
    except SnapshotError as e:
        raise app.UsageError(f"{e} (--rebuild_on_damage rebuilds it)") from None
    except HeadError as e:
        raise app.UsageError(f"the ranking head {model.ranking_head or 'shipped with rcllm_jax'} does not fit --model "
                             f"and --prompt ({e}): train one (launch/train.py --model=... --prompt=...) and pass "
                             "--ranking_head, or serve with --head=label") from None


def _warm_up(served, step: str, eng: EngineSettings, srv: ServingSettings) -> tuple[float, float | None]:
    """Compile before the first user waits (block modes: every accepted request shape on every
    shard); returns the measured engine time of a returning user's and a new user's request (p50)."""
    from rcllm_jax.engine.selective_recompute import BLOCK_MODES
    engine, ds, item_ids = served.engine, served.dataset, served.item_ids
    t1 = time.perf_counter()
    probes = _warmup_prompts(engine.builder, ds, item_ids, srv.warmup_prompts, served.recommender.retriever,
                             srv.num_candidates, eng.max_candidates)
    if eng.mode in BLOCK_MODES:  # every shape a request can take, on every shard (and batch bucket)
        n_shapes = engine.warm_up(eng.mode, eng.max_candidates, srv.max_batch if step == "batched" else 0)
        what = f"every accepted request shape ({n_shapes} shard x shape programs)"
    else:  # the baselines: requests shaped like traffic (a shape outside their buckets still compiles)
        for s in range(engine.num_shards):
            for j, probe in enumerate(probes):
                engine.rank(probe, eng.mode, user_id=f"warmup-{j}", shard=s)
        n_fetch = engine.warm_fetch()
        what = f"{len(probes)} prompt shapes (+ {n_fetch} remote-fetch shapes)"
    warm = [engine.rank(p, eng.mode, user_id=f"warmup-{j}", shard=0).ttft_s for j, p in enumerate(probes)]
    engine.reset_caches()
    cold = []  # a new user's request: its history prefix computed too
    for j, p in enumerate(probes):
        t2 = time.perf_counter()
        engine.rank(p, eng.mode, user_id=f"warmup-cold-{j}", shard=0)
        cold.append(time.perf_counter() - t2)
    service_s = max(float(sorted(warm)[len(warm) // 2]), 1e-3)
    cold_s = float(sorted(cold)[len(cold) // 2])
    engine.reset_caches()
    logging.info("warmed up %d shards x %s in %.1fs (service time p50 %.3fs returning users, %.3fs new users)",
                 engine.num_shards, what, time.perf_counter() - t1, service_s, cold_s)
    return service_s, cold_s


def _admission(service_s: float, cold_s: float | None, srv: ServingSettings):
    """(max_queue, window, cost_s, max_cost_s) of the scheduler. The count bound covers every
    request waiting for the engine: the queue plus the window the loop has taken from it, sized so
    that the last of them waits about --latency_target_s. The cost bound: half the target of
    estimated engine time waiting, a new user's request (its history prefix computed) costing what
    the warm-up measured for one."""
    target = srv.latency_target_s
    outstanding = srv.max_queue + srv.window if srv.max_queue else max(8, int(target / service_s))
    window = srv.window if srv.max_queue else max(1, min(srv.window, outstanding // 2))
    cost_s = (service_s, max(cold_s, service_s)) if cold_s is not None and not srv.max_queue else None
    max_cost_s = target / 2 if cost_s else None
    logging.info("queue bound %d + window %d requests%s (%s)", outstanding - window, window,
                 f", {max_cost_s:g}s of estimated engine time each" if cost_s else "",
                 "--max_queue" if srv.max_queue else f"--latency_target_s={target:g} / service time "
                 f"{service_s:.3f}s returning users" + (f", {cost_s[1]:.3f}s new" if cost_s else ""))
    return outstanding - window, window, cost_s, max_cost_s


def _state(served, users_dir: str, srv: ServingSettings):
    """The state database (seeded with the dataset's histories), the saved user prefixes that still
    stand for their users' histories restored into the engine."""
    from rcllm_jax.cache.snapshot import SnapshotError, SnapshotMismatchError
    from rcllm_jax.serve.state import StateStore
    engine, ds = served.engine, served.dataset
    state = StateStore(srv.state_db or users_dir.rstrip("/") + "-state.sqlite3", max_history=srv.max_history)
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
    seeded = state.seed(f"dataset:{ds.name}", {ds.user_key(u): [ds.items[i].id for i in s]  # as the catalog names them
                                              for u, s in ds.sequences.items()})
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


def _service(served, step: str, eng: EngineSettings, srv: ServingSettings, state, service_s, cold_s, reloader):
    """The RecommenderService over the served engine, admission sized from the warm-up's times."""
    from rcllm_jax.serve.scheduler import Scheduler
    from rcllm_jax.serve.service import RecommenderService
    engine, ds = served.engine, served.dataset
    max_queue, window, cost_s, max_cost_s = _admission(service_s, cold_s, srv)
    return RecommenderService(engine, {i: ds.items[i] for i in served.item_ids}, state, catalog=ds.items, mode=eng.mode,
                              scheduler=Scheduler(engine.num_shards, srv.scheduler, max_queue, window,
                                                  max_cost_s=max_cost_s), cost_s=cost_s,
                              max_candidates=eng.max_candidates, request_timeout_s=srv.request_timeout_s,
                              retriever=served.recommender.retriever, num_candidates=srv.num_candidates,
                              serving_step=step, max_batch=srv.max_batch,
                              latency_target_s=srv.latency_target_s if srv.adapt_queue_bound and not srv.max_queue
                              else None, reloader=reloader)


def main(argv):
    del argv
    mesh, layout = dist_cli.setup()
    model, catalog, eng, srv = read(ModelSettings, CatalogSettings, EngineSettings, ServingSettings)
    import jax

    from rcllm_jax.engine.engine import MODES
    from rcllm_jax.serve.http import HttpServer, make_app
    from rcllm_jax.serve.service import count_compiles

    if eng.mode not in MODES:
        raise app.UsageError(f"unknown --mode {eng.mode!r}; modes: {', '.join(MODES)}")
    if jax.process_count() > 1:
        raise app.UsageError("serve.py runs as one process (multi-host serving is not implemented; "
                             "launch/build_cache.py and bench.py take the multi-host flags)")
    t0 = time.perf_counter()
    count_compiles()  # /metrics counts every compile of this process, the warm-up's included
    step = srv.serving_step if srv.serving_step != "auto" else (
        "serial" if jax.default_backend() == "cpu" else "batched")
    served = _open(mesh, layout, model, catalog, eng)
    for note in served.notes:
        logging.info("%s", note)
    users_dir = srv.users_dir or served.users_dir
    # a request's engine time when nothing is measured (no warm-up)
    service_s, cold_s = _warm_up(served, step, eng, srv) if srv.warmup else (0.25, None)
    state = _state(served, users_dir, srv)
    from rcllm_jax.recommender import stage_reload
    service = _service(served, step, eng, srv, state, service_s, cold_s,
                       reloader=lambda: stage_reload(served, model, catalog))
    service.start()
    server = HttpServer(make_app(service, srv.max_body_bytes), srv.host, srv.port,
                        max_connections=srv.max_connections, max_client_connections=srv.max_client_connections,
                        grace_s=srv.shutdown_grace_s, retry_after_s=service.retry_after_s,
                        count=lambda status: service.metrics.responses.labels(str(status)).inc())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    host, port = server.address
    print(f"serving on http://{host}:{port} ({len(served.item_ids)} items, {eng.mode} mode, "
          f"{mesh.shape['items']} items-shards, {srv.scheduler} scheduler; ready in {time.perf_counter() - t0:.1f}s)",
          flush=True)
    stop.wait()
    _shut_down(service, served.engine, users_dir)
    state.close()
    server.close()
    print("bye", flush=True)


if __name__ == "__main__":
    app.run(main)
