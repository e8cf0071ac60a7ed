"""The recommendation service behind the HTTP API: request validation, the user state (histories
and the event log in the state database, `serve/state.py`), the engine loop (one background
thread owns the engine: only it touches a cache; handlers read the stats it publishes and the
item table taken at start), the scheduler, and Prometheus metrics.

A recommend request never changes stored state: its `history`, when it sends one, is used for
that request only. Histories change through events (`add_events`) and `put_history`, each one
database transaction, answered only after it commits."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
import typing
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from rcllm_jax.data.prompt import check_candidates
from rcllm_jax.engine.selective_recompute import BLOCK_MODES
from rcllm_jax.recommender import Recommender
from rcllm_jax.serve.scheduler import SERVING_STEPS, QueueFull, Scheduler, Task
from rcllm_jax.serve.state import EventConflict, StateStore

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@typing.runtime_checkable
class ServingEngine(typing.Protocol):
    """What the service (and its `Recommender`) uses of an engine: exactly these members. Only the
    engine loop's thread calls the ones that touch caches; the service reads `shard_bytes`,
    `item_info`, `stats` and `cached_users` once when it is built, then only the loop does. `rcllm_jax.engine.
    Engine` is one; tests/test_scheduler.py's MockEngine (answers by hand) another, and
    tests/test_serving_state.py runs the service's contract against both."""

    builder: object  # .build(history, candidates) -> prompt (ValueError naming the problem)
    head: object  # the slot head weighing collaborative features, or None
    num_shards: int
    canonical: str

    def stats(self) -> dict: ...

    def cached_users(self) -> frozenset: ...

    def shard_bytes(self, item_ids) -> np.ndarray: ...

    def item_info(self, item_id: int) -> dict: ...

    def rank(self, prompt, mode, user_id=None, shard: int | None = None): ...

    def rank_step(self, requests, mode="rcllm"): ...

    def update_user(self, user_id, prompt, version: int | None = None) -> int: ...

    def warm_prefix(self, prompt) -> int: ...


class ApiError(Exception):
    """An answer other than 200: HTTP status, message (and headers)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    """Prometheus metrics of one service (its own registry, rendered by `prometheus_client`):
    counters for what only grows (requests, HTTP responses by status, item blocks and bytes,
    compiles, user-store hits/misses/...), gauges for levels (queue depth, users cached), the TTFT
    histogram. Values are exact integers where they count."""

    def __init__(self, service):
        import prometheus_client as pc
        self.registry = pc.CollectorRegistry()
        c = lambda name, doc, **kw: pc.Counter(name, doc, namespace="rcllm", registry=self.registry, **kw)  # noqa: E731
        self.requests = c("requests", "Ranking requests answered.")
        self.events = c("events", "History events applied.")
        self.rejected = c("rejected", "Requests refused with 503: the queue was full.")
        self.dropped = c("dropped", "Requests dropped before computing: their client was gone or timed out.")
        self.engine_errors = c("engine_errors", "Requests the engine failed on (answered 500).")
        self.responses = c("http_responses", "HTTP responses by status code.", labelnames=("status",))
        self.item_blocks = c("item_blocks", "Cached item blocks read by ranking requests, by where they were.",
                             labelnames=("where",))
        self.remote_bytes = c("remote_item_bytes", "Item KV bytes fetched from other shards.")
        self.ttft = pc.Histogram("ttft_seconds", "Time from the engine taking a request to its scores "
                                 "(history prefix included when it was not cached).", namespace="rcllm",
                                 registry=self.registry, buckets=TTFT_BUCKETS)
        self.registry.register(_EngineCollector(service))
        pc.ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds

    def render(self) -> bytes:
        import prometheus_client as pc
        return pc.generate_latest(self.registry)


class _EngineCollector:
    """Read at scrape time from the engine and the scheduler (no copy kept up to date)."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.service
        st = s.stats
        us = st["user_store"]
        yield GaugeMetricFamily("rcllm_queue_depth", "Requests waiting for the engine.", value=len(s.scheduler))
        yield GaugeMetricFamily("rcllm_queue_bound", "Requests that may wait (beyond: 503); adapts to the measured "
                                "service time under --latency_target_s.", value=s.scheduler.max_queue)
        yield GaugeMetricFamily("rcllm_queued_cost_seconds", "Estimated engine time of the waiting requests (a new "
                                "user's costs more: its history prefix is computed).", value=s.scheduler.queued_cost)
        yield GaugeMetricFamily("rcllm_users_cached", "Users whose history KV is cached.", value=st["users_cached"])
        yield CounterMetricFamily("rcllm_compiles", "XLA compilations since the start (warm-up included).",
                                  value=compiles())
        for name in ("hits", "extensions", "misses", "evictions"):
            yield CounterMetricFamily(f"rcllm_user_cache_{name}", f"User-store {name}.", value=us.get(name, 0))


_COMPILES = [0, False]  # XLA backend compilations of this process, whether the listener is installed
_COMPILES_LOCK = threading.Lock()


def count_compiles():
    """Install the process's one compile listener (idempotent: every later call is a no-op), so
    `compiles()` counts from now on, the warm-up included when called before it."""
    import jax
    with _COMPILES_LOCK:
        if _COMPILES[1]:
            return

        def listen(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                _COMPILES[0] += 1
        jax.monitoring.register_event_duration_secs_listener(listen)
        _COMPILES[1] = True


def compiles() -> int:
    """XLA compilations counted since `count_compiles`."""
    return _COMPILES[0]


def _never() -> bool:
    return False


def _user(v) -> str:
    """An opaque user id: a string of 1..128 printable non-space characters, or an integer (the
    same user as its decimal string: MovieLens ids are digit strings). The string is the id as it
    is: "007", "7" and "-0" are three users."""
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and not -10**127 < v < 10**127):
        raise ApiError(400, f"user_id must be a string or an integer of at most 128 digits, got {str(type(v).__name__)}")
    s = str(v)
    if not 1 <= len(s) <= 128 or not s.isprintable() or any(c.isspace() for c in s):
        raise ApiError(400, "user_id must be 1..128 printable characters without spaces (any script)")
    return s


def _event_id(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not 1 <= len(v) <= 128 or not all(32 <= ord(c) <= 126 for c in v):
        raise ApiError(400, "event_id must be a string of 1..128 printable ASCII characters")
    return v


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{what} must be an integer, got {repr(v)[:40]}")
    if not -2**63 <= v < 2**63:
        raise ApiError(400, f"{what} is out of range (a 64-bit integer)")
    return v


class RecommenderService:
    def __init__(self, engine, items: dict, state: StateStore, *, mode: str = "rcllm",
                 scheduler: Scheduler, max_candidates: int = 100, request_timeout_s: float = 60.0,
                 retriever=None, num_candidates: int = 20, retry_after_s: int = 1, serving_step: str = "batched",
                 max_batch: int = 8, latency_target_s: float | None = None,
                 cost_s: tuple[float, float] | None = None, catalog: dict | None = None, reloader=None):
        """engine: a `ServingEngine`; state: the user histories and event log (`StateStore`).
        retriever: proposes the candidates of a request that sends none (`rcllm_jax.retrieval`);
        num_candidates: how many it proposes unless the request says. serving_step: "batched" (block
        modes: each scheduling window runs as serving steps, `Engine.rank_step`, every shard's
        requests batched, up to max_batch per shard and step, all shards in one program) or
        "serial" (one request at a time, shard by shard). latency_target_s: adapt the queue bound to
        the service time measured on real traffic (a moving average per request), so that the last
        queued request waits about this long (at least 8 outstanding); None: the bound stays.
        cost_s: (returning, new) - a request's estimated engine seconds when its user's history
        prefix is cached (as the loop last published) or must be computed, what the scheduler's
        `max_cost_s` admits by (None: every task costs 0). items: the served items (candidates);
        catalog: every item a history may name (default: the served ones). reloader: () -> a
        `recommender.Reload` (the newest snapshot step and catalog, staged), what POST /admin/reload
        swaps in (None: no reloads)."""
        if serving_step not in SERVING_STEPS:
            raise ValueError(f"unknown serving step {serving_step!r}: {' | '.join(SERVING_STEPS)}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.batched = serving_step == "batched" and mode in BLOCK_MODES
        self.max_batch = max_batch
        self.engine, self.mode, self.scheduler, self.state = engine, mode, scheduler, state
        self.recommender = Recommender(engine, retriever, mode)
        self.reloader, self.reloading = reloader, threading.Lock()
        self.num_candidates = min(num_candidates, max_candidates)
        self.max_candidates, self.timeout, self.retry_after_s = max_candidates, request_timeout_s, retry_after_s
        self._set_catalog(items, catalog)
        self.stats, self.cached = engine.stats(), engine.cached_users()
        self.cost_s = cost_s
        self.latency_target_s, self.service_s = latency_target_s, None
        self.metrics = Metrics(self)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    def start(self):
        count_compiles()
        self.thread.start()

    def _set_catalog(self, items: dict, catalog: dict | None):
        """The item tables handler threads read instead of the engine (replaced whole by a reload)."""
        ids = {i: getattr(it, "id", i) for i, it in (catalog or items).items()}  # `Item.id`: what the API carries
        self.items, self.ids = items, ids
        self.by_id = {str(ids[i]): i for i in items}  # what may be ranked
        self.in_catalog = {str(v): i for i, v in ids.items()}  # what a history may name
        self.item_bytes = {i: np.asarray(self.engine.shard_bytes([i]), np.int64) for i in items}
        self.item_table = {i: self.engine.item_info(i) for i in items}

    def reload(self, gone=_never) -> dict:
        """POST /admin/reload: stage the newest snapshot step and the catalog as it is now beside
        what is served (this thread; requests go on being answered), then swap them in inside the
        engine loop between two requests, so none fails or sees half of each. 409, nothing changed,
        when the step or the catalog is refused or another reload runs."""
        if self.reloader is None:
            raise ApiError(404, "this server has no reloadable snapshot")
        if not self.reloading.acquire(blocking=False):
            raise ApiError(409, "a reload is already running")
        try:
            t0 = time.perf_counter()
            try:
                r = self.reloader()
            except (ValueError, RuntimeError, OSError) as e:  # CatalogError, SnapshotError, a missing file
                raise ApiError(409, f"reload refused, nothing changed: {e}") from None
            staged_s = time.perf_counter() - t0

            def swap():
                before = set(self.by_id)
                self.engine.install(r.staged)
                self._set_catalog({i: r.dataset.items[i] for i in r.item_ids}, r.dataset.items)
                self.recommender.retriever = r.retriever
                self.stats = self.engine.stats()
                return {"step": r.staged.step, "items": len(r.item_ids), "added": len(set(self.by_id) - before),
                        "removed": len(before - set(self.by_id)), "staged_s": staged_s, "note": r.note}
            task = Task("call", {"fn": swap})
            self._submit(task)
            out = self._wait(task, gone)
            out["swap_s"] = time.perf_counter() - t0 - staged_s
            logging.info("reloaded: %s", out)
            return out
        finally:
            self.reloading.release()

    # --- API ---------------------------------------------------------------------------------

    def _item_ids(self, values, what: str, served: bool = True) -> list[int]:
        """The engine's indices of the items a request names (as the catalog does: strings, or
        integers for integer ids; 7 and "7" are the same item): served items (candidates), or
        any of the catalog's (histories)."""
        if not isinstance(values, list):
            raise ApiError(400, f"{what} must be a list of item ids")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ApiError(400, f"every entry of {what} must be an item id (a string or an integer), "
                                    f"got {repr(v)[:40]}")
            if isinstance(v, int) and not -2**63 <= v < 2**63:
                raise ApiError(400, f"an entry of {what} is out of range (a 64-bit integer)")
        ids = [(self.by_id if served else self.in_catalog).get(str(v)) for v in values]
        unknown = [v for v, i in zip(values, ids) if i is None]
        if unknown:
            raise ApiError(404, f"unknown item id(s) in {what}: {unknown[:10]}")
        return ids

    def _known(self, stored) -> list[int]:
        """The engine's indices of a stored history's items (ones the catalog no longer has are left out)."""
        return [i for i in (self.in_catalog.get(str(v)) for v in stored) if i is not None]

    def _rank_task(self, body) -> tuple[Task, dict]:
        """Validate a recommend body into an engine task (ApiError: a 4xx naming the problem)."""
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        extra = set(body) - {"user_id", "history", "candidates", "num_candidates", "top_k"}
        if extra:
            raise ApiError(400, f"unknown field(s): {sorted(extra)}")
        if "user_id" not in body:
            raise ApiError(400, "user_id is required")
        user = _user(body["user_id"])
        # the history this request is ranked with: the one it sends (for this request only), else the
        # stored one as the database holds it now (its candidates are retrieved for the same)
        history = (self._item_ids(body["history"], "history", served=False) if "history" in body
                   else self._known(self.state.history(user)))
        retrieved = "candidates" not in body
        if retrieved:  # retrieve -> rerank, from the history known now
            if "num_candidates" in body:
                n = _int(body["num_candidates"], "num_candidates")
                if not 1 <= n <= self.max_candidates:
                    raise ApiError(400, f"num_candidates must be in 1..{self.max_candidates}, got {n}")
            else:
                n = self.num_candidates
            try:
                cands = list(self.recommender.candidates(history, n))
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        else:
            if "num_candidates" in body:
                raise ApiError(400, "num_candidates applies to retrieved candidates only; candidates were given")
            cands = self._item_ids(body["candidates"], "candidates")
            try:
                check_candidates(cands)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            if len(cands) > self.max_candidates:
                raise ApiError(400, f"{len(cands)} candidates; this server ranks at most {self.max_candidates}")
        top_k = _int(body.get("top_k", len(cands)), "top_k")
        if top_k < 1:
            raise ApiError(400, "top_k must be >= 1")
        task = Task("rank", {"user": user, "history": history, "candidates": cands})
        return task, {"user_id": body["user_id"], "top_k": top_k, "retrieved": retrieved, "t0": time.perf_counter()}

    def _ranking(self, task: Task, meta: dict, res: dict) -> dict:
        cands = task.payload["candidates"]
        order = np.argsort(-res["scores"], kind="stable")[:meta["top_k"]]
        return {"user_id": meta["user_id"], "request_id": task.payload["request_id"],
                "ranking": [{"item_id": self.ids[cands[i]], "score": float(res["scores"][i]),
                             "title": self.items[cands[i]].title} for i in order],
                "shard": res["shard"], "mode": self.mode, "retrieved": meta["retrieved"],
                "timings": {"queue_s": res["queue_s"], "ttft_s": res["ttft_s"], "prefill_s": res["prefill_s"],
                            "total_s": time.perf_counter() - meta["t0"]},
                "cache": {"prompt_tokens": res["prompt_tokens"], "computed_tokens": res["computed_tokens"],
                          "local_item_blocks": res["local"], "remote_item_blocks": res["remote"],
                          "remote_item_bytes": res["remote_bytes"]}}

    def recommend(self, body, gone=_never) -> dict:
        """One ranking. `gone()` turning true (the client left) drops the request if not yet computed."""
        task, meta = self._rank_task(body)
        self._submit(task)
        return self._ranking(task, meta, self._wait(task, gone))

    def recommend_many(self, bodies: list, gone=_never) -> list[dict]:
        """Many rankings queued together (the scheduler groups them by shard); one answer per body
        in order: a ranking, or {"error", "status"} for one that was refused."""
        out, pending = [None] * len(bodies), []
        for i, body in enumerate(bodies):
            try:
                task, meta = self._rank_task(body)
                self._submit(task)
                pending.append((i, task, meta))
            except ApiError as e:
                out[i] = {"error": e.message, "status": e.status}
        for i, task, meta in pending:
            try:
                out[i] = self._ranking(task, meta, self._wait(task, gone))
            except ApiError as e:
                out[i] = {"error": e.message, "status": e.status}
        return out

    def add_events(self, user_id, body, gone=_never) -> dict:
        """Append items to the user's stored history (one transaction, answered after it commits;
        a body's `event_id` makes a retry apply once)."""
        user = _user(user_id)
        if not isinstance(body, dict) or "items" not in body or set(body) - {"items", "event_id"}:
            raise ApiError(400, 'body must be {"items": [item ids], "event_id"?: string}')
        new = self._item_ids(body["items"], "items", served=False)
        if not new:
            raise ApiError(400, "items is empty")
        task = Task("event", {"user": user, "items": [self.ids[i] for i in new],
                              "event_id": _event_id(body.get("event_id"))})
        self._submit(task)
        return self._wait(task, gone) | {"user_id": user}

    def put_history(self, user_id, body, gone=_never) -> dict:
        """Replace the user's stored history (one transaction)."""
        user = _user(user_id)
        if not isinstance(body, dict) or set(body) != {"items"}:
            raise ApiError(400, 'body must be {"items": [item ids]}')
        items = [self.ids[i] for i in self._item_ids(body["items"], "items", served=False)]
        task = Task("history", {"user": user, "items": items})
        self._submit(task)
        return self._wait(task, gone) | {"user_id": user}

    def user(self, user_id) -> dict:
        """A user's stored history and its version (404 for a user the database does not know)."""
        user = _user(user_id)
        got = self.state.user(user)
        if got is None:
            raise ApiError(404, f"unknown user {user!r}")
        return {"user_id": user, "history": got[0], "version": got[1]}

    def item(self, item_id: str) -> dict:
        i = self.by_id.get(item_id)
        if i is None:
            raise ApiError(404, f"unknown item id {item_id[:128]!r}")
        it = self.items[i]
        text = getattr(it, "text", None)
        return ({"item_id": self.ids[i], "title": it.title, "year": it.year, "genres": list(it.genres)}
                | ({} if text is None else {"text": text}) | self.item_table[i])

    def health(self) -> dict:
        alive = self.thread.is_alive() and not self.stopped.is_set()
        st = self.stats
        # the policy each block mode runs (rcllm's calibrated for this model, head and prompt, if it was)
        policies, calibration = getattr(self.engine, "policies", BLOCK_MODES), getattr(self.engine, "calibration", None)
        return {"status": "ok" if alive else "stopping", "queue_depth": len(self.scheduler),
                "shards": self.engine.num_shards, "mode": self.mode, "scheduler": self.scheduler.policy,
                "policy": dataclasses.asdict(policies[self.mode]) if self.mode in policies else None,
                "calibration": None if calibration is None or self.mode != "rcllm" else calibration.summary(),
                "canonical": self.engine.canonical, "serving_step": "batched" if self.batched else "serial",
                "max_batch": self.max_batch, "queue_bound": self.scheduler.max_queue,
                "service_s": self.service_s,
                "item_blocks": st["item_blocks"], "users_cached": st["users_cached"]}

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # --- the engine loop -----------------------------------------------------------------------

    def _submit(self, task: Task):
        task.payload["request_id"] = uuid.uuid4().hex[:12]
        task.enqueued = time.perf_counter()
        if task.kind == "rank":
            task.need = sum((self.item_bytes[c] for c in task.payload["candidates"]),
                            np.zeros(self.engine.num_shards, np.int64))
        if self.cost_s is not None and task.kind in ("rank", "event"):  # an event extends the user's prefix
            task.cost = self.cost_s[0] if task.payload["user"] in self.cached else self.cost_s[1]
        try:
            self.scheduler.submit(task)
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise ApiError(503, str(e), {"Retry-After": str(self.retry_after_s)}) from None

    def _wait(self, task: Task, gone) -> dict:
        """The task's result. A task whose client left or that timed out is cancelled while still
        queued (the engine loop then drops it: a 499 / 503 means it was not applied); one the
        engine has already started is awaited to its end and answered."""
        deadline = task.enqueued + self.timeout
        while True:
            try:
                return task.future.result(timeout=0.1)
            except FutureTimeout:
                if gone() and task.future.cancel():
                    raise ApiError(499, f"request {task.payload['request_id']}: the client closed the connection") \
                        from None
                if time.perf_counter() > deadline and task.future.cancel():
                    raise ApiError(503, f"request {task.payload['request_id']} not answered within "
                                        f"{self.timeout:.0f}s: the server is overloaded (not applied)",
                                   {"Retry-After": str(self.retry_after_s)}) from None
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001 - engine failure: 500 with the request id, keep serving
                self.metrics.engine_errors.inc()
                logging.error("engine failure on request %s: %s: %s", task.payload["request_id"], type(e).__name__, e)
                raise ApiError(500, f"engine failure on request {task.payload['request_id']} "
                                    "(the server log has the cause)") from e

    def _loop(self):
        while not (self.stopped.is_set() and not len(self.scheduler)):
            window = self.scheduler.next_window(timeout=0.05)
            i = 0
            while i < len(window):  # runs of rank tasks are scheduled together; events in place
                if window[i].kind != "rank":
                    self._execute(window[i])
                    i += 1
                    continue
                j = i
                while j < len(window) and window[j].kind == "rank":
                    j += 1
                batches = self.scheduler.assign(window[i:j])
                if self.batched:
                    for step in serving_steps(batches, self.max_batch):
                        self._execute_step(step)
                else:
                    for shard, batch in batches.items():
                        for t in batch:
                            self._execute(t)
                i = j
            if window:  # published for the handlers (a reference swap each)
                self.stats, self.cached = self.engine.stats(), self.engine.cached_users()

    def _observe(self, seconds: float, n: int = 1):
        """n requests took `seconds` of engine time each: update the moving average and, with a
        latency target, the queue bound (outstanding = target / service time, >= 8, minus the window)."""
        for _ in range(n):
            self.service_s = seconds if self.service_s is None else 0.9 * self.service_s + 0.1 * seconds
        if self.latency_target_s is not None:
            outstanding = max(8, int(self.latency_target_s / max(self.service_s, 1e-3)))
            self.scheduler.max_queue = max(1, outstanding - self.scheduler.window)

    def _execute_step(self, tasks: list[Task]):
        """One serving step: the window's next batch of every shard, ranked together."""
        live = []
        for t in tasks:
            if t.future.set_running_or_notify_cancel():
                live.append(t)
            else:  # its client left or timed out: drop it
                self.metrics.dropped.inc()
        started = time.perf_counter()
        ready = []  # (task, the history it is ranked with: its own, as one at a time would)
        for t in live:  # a prompt refused (too long, malformed) fails its own request only
            history = t.payload["history"]
            try:
                self._prompt(history, t.payload["candidates"])
                ready.append((t, history))
            except ApiError as e:
                t.future.set_exception(e)
        if not ready:
            return
        try:
            t0 = time.perf_counter()
            recs = self.recommender.recommend_step([(t.payload["user"], history, t.payload["candidates"], t.shard)
                                                    for t, history in ready])
            wall = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - the step failed: every request in it answers 500
            traceback.print_exc()
            for t, _ in ready:
                t.future.set_exception(e)
            return
        self._observe(wall / len(ready), len(ready))
        for (t, _), rec in zip(ready, recs):
            out = self._answer(rec, wall)
            out["queue_s"] = started - t.enqueued
            t.future.set_result(out)

    def _execute(self, t: Task):
        if not t.future.set_running_or_notify_cancel():  # its client left or timed out: drop it
            self.metrics.dropped.inc()
            return
        started = time.perf_counter()
        try:
            if t.kind == "rank":
                out = self._rank(t)
                out["queue_s"] = started - t.enqueued
                self._observe(time.perf_counter() - started)
            elif t.kind == "call":  # an admin action run between requests (`reload`)
                out = t.payload["fn"]()
            else:
                out = self._event(t)
            t.future.set_result(out)
        except ApiError as e:
            t.future.set_exception(e)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            t.future.set_exception(e)

    def _prompt(self, history, cands):
        try:
            return self.engine.builder.build(history, cands)
        except ValueError as e:
            raise ApiError(413 if "exceeds" in str(e) else 400, str(e)) from None

    def _rank(self, t: Task) -> dict:
        p = t.payload
        t0 = time.perf_counter()
        try:
            rec = self.recommender.recommend(p["user"], p["history"], p["candidates"], shard=t.shard)
        except ValueError as e:  # the prompt: too long for the model (413) or malformed (400)
            raise ApiError(413 if "exceeds" in str(e) else 400, str(e)) from None
        return self._answer(rec, time.perf_counter() - t0)  # incl. computing the history prefix when not cached

    def _answer(self, rec, wall: float) -> dict:
        """A ranked request's answer fields (and its metrics) from its `Recommendation`: the final
        scores (the engine's + the head's collaborative term) in prompt order, the engine's counts."""
        res = rec.result
        at = {c: j for j, c in enumerate(rec.candidates)}
        scores = np.empty(len(rec.candidates), np.float64)
        scores[[at[c] for c in rec.ranking]] = rec.scores
        self.metrics.item_blocks.labels("remote").inc(res.remote_item_blocks)
        self.metrics.item_blocks.labels("local").inc(res.local_item_blocks)
        self.metrics.remote_bytes.inc(res.remote_item_bytes)
        self.metrics.ttft.observe(wall)
        self.metrics.requests.inc()
        return {"scores": scores, "ttft_s": wall, "prefill_s": res.ttft_s, "shard": res.shard,
                "prompt_tokens": res.prompt_tokens, "computed_tokens": res.computed_tokens,
                "local": res.local_item_blocks, "remote": res.remote_item_blocks,
                "remote_bytes": int(res.remote_item_bytes)}

    def _event(self, t: Task) -> dict:
        """An event or a history replacement: committed to the database (refused, nothing written,
        when the new history's prompt cannot be built), then the user's prefix brought up to date
        in the cache the mode reads at request time (a cache: a failure there is logged, the
        committed event stands)."""
        p = t.payload
        probe = []  # the new history's prompt (with one candidate), built inside the transaction

        def check(history):  # the stored ids (as the catalog names them)
            probe.append(self._prompt(self._known(history), [next(iter(self.items))]))
        try:
            if t.kind == "event":
                applied = self.state.append(p["user"], p["items"], p["event_id"], check=check)
            else:
                applied = self.state.put_history(p["user"], p["items"], check=check)
        except EventConflict as e:
            raise ApiError(409, str(e)) from None
        computed = 0
        if not applied.replay:
            try:
                if self.mode in BLOCK_MODES:  # the user store's prefix, computed now (off the request path)
                    computed = self.engine.update_user(p["user"], probe[-1], version=applied.version)
                elif self.mode == "prefix_warm":  # the baseline's prefix cache, warmed at event time the same way
                    computed = self.engine.warm_prefix(probe[-1])
                # full / prefix: nothing is computed before the user's next request
            except Exception:  # noqa: BLE001 - the cache only; the event is committed
                logging.exception("event of user %r committed; its prefix was not cached", p["user"])
            self.metrics.events.inc()
        return {"history_length": applied.history_length, "version": applied.version, "computed_tokens": computed,
                "replay": applied.replay}

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop taking requests, finish every queued one, stop the loop. Returns whether the loop has
        ended (False: it is still running after `timeout`)."""
        self.scheduler.close()
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()


def serving_steps(batches: dict[int, list[Task]], max_batch: int) -> list[list[Task]]:
    """A window's shard batches as serving steps: step k holds the k-th run of up to max_batch
    requests of every shard (arrival order within a shard)."""
    steps = []
    for s, batch in batches.items():
        for k in range(0, len(batch), max_batch):
            if len(steps) <= k // max_batch:
                steps.append([])
            steps[k // max_batch].extend(batch[k:k + max_batch])
    return steps
