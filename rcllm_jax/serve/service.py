"""The recommendation service behind the HTTP API: request validation, per-user histories, the
engine loop (one background thread owns the engine: every cache mutation is serialised), the
scheduler, and Prometheus metrics."""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from rcllm_jax.data.prompt import check_candidates
from rcllm_jax.engine.selective_recompute import BLOCK_MODES
from rcllm_jax.recommender import Recommender
from rcllm_jax.serve.scheduler import QueueFull, Scheduler, Task

SERVING_STEPS = ("batched", "serial")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        st = s.engine.stats()
        us = st["user_store"]
        yield GaugeMetricFamily("rcllm_queue_depth", "Requests waiting for the engine.", value=len(s.scheduler))
        yield GaugeMetricFamily("rcllm_users_cached", "Users whose history KV is cached.", value=st["users_cached"])
        yield CounterMetricFamily("rcllm_compiles", "XLA compilations since the start (warm-up included).",
                                  value=s.compiles[0])
        for name in ("hits", "extensions", "misses", "evictions"):
            yield CounterMetricFamily(f"rcllm_user_cache_{name}", f"User-store {name}.", value=us.get(name, 0))


def _never() -> bool:
    return False


def _user(v) -> str:
    """An opaque user id: a string of 1..128 printable non-space characters, or an integer (the
    same user as its decimal string: MovieLens ids are digit strings)."""
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and not -10**127 < v < 10**127):
        raise ApiError(400, f"user_id must be a string or an integer of at most 128 digits, got {str(type(v).__name__)}")
    s = str(v)
    if not 1 <= len(s) <= 128 or not all(33 <= ord(c) <= 126 for c in s):
        raise ApiError(400, "user_id must be 1..128 printable ASCII characters without spaces")
    return s


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{what} must be an integer, got {repr(v)[:40]}")
    if not -2**63 <= v < 2**63:
        raise ApiError(400, f"{what} is out of range (a 64-bit integer)")
    return v


class RecommenderService:
    def __init__(self, engine, items: dict, histories: dict[int, list[int]], *, mode: str = "rcllm",
                 scheduler: Scheduler, max_candidates: int = 100, request_timeout_s: float = 60.0,
                 retriever=None, num_candidates: int = 20, retry_after_s: int = 1, serving_step: str = "batched",
                 max_batch: int = 8):
        """retriever: proposes the candidates of a request that sends none (`rcllm_jax.retrieval`);
        num_candidates: how many it proposes unless the request says. serving_step: "batched" (block
        modes: each scheduling window runs as serving steps, `Engine.rank_step`, every shard's
        requests batched, up to max_batch per shard and step, all shards in one program) or
        "serial" (one request at a time, shard by shard)."""
        if serving_step not in SERVING_STEPS:
            raise ValueError(f"unknown serving step {serving_step!r}: {' | '.join(SERVING_STEPS)}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.batched = serving_step == "batched" and mode in BLOCK_MODES
        self.max_batch = max_batch
        self.engine, self.items, self.mode, self.scheduler = engine, items, mode, scheduler
        self.recommender = Recommender(engine, retriever, mode)
        self.num_candidates = min(num_candidates, max_candidates)
        self.histories = {str(u): list(h) for u, h in histories.items()}
        self.max_candidates, self.timeout, self.retry_after_s = max_candidates, request_timeout_s, retry_after_s
        self.metrics = Metrics(self)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self.compiles = [0]

    def start(self):
        import jax

        def count(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self.compiles[0] += 1
        jax.monitoring.register_event_duration_secs_listener(count)
        self.thread.start()

    # --- API ---------------------------------------------------------------------------------

    def _item_ids(self, values, what: str) -> list[int]:
        if not isinstance(values, list):
            raise ApiError(400, f"{what} must be a list of item ids")
        ids = [_int(v, f"every entry of {what}") for v in values]
        unknown = [i for i in ids if i not in self.items]
        if unknown:
            raise ApiError(404, f"unknown item id(s) in {what}: {unknown[:10]}")
        return ids

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
        history = self._item_ids(body["history"], "history") if "history" in body else None
        retrieved = "candidates" not in body
        if retrieved:  # retrieve -> rerank, from the history known now
            if "num_candidates" in body:
                n = _int(body["num_candidates"], "num_candidates")
                if not 1 <= n <= self.max_candidates:
                    raise ApiError(400, f"num_candidates must be in 1..{self.max_candidates}, got {n}")
            else:
                n = self.num_candidates
            try:
                cands = list(self.recommender.candidates(
                    history if history is not None else list(self.histories.get(user, [])), n))
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
                "ranking": [{"item_id": cands[i], "score": float(res["scores"][i]),
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
        user = _user(user_id)
        if not isinstance(body, dict) or set(body) != {"items"}:
            raise ApiError(400, 'body must be {"items": [item ids]}')
        new = self._item_ids(body["items"], "items")
        if not new:
            raise ApiError(400, "items is empty")
        task = Task("event", {"user": user, "items": new})
        self._submit(task)
        return self._wait(task, gone) | {"user_id": user_id}

    def item(self, item_id: str) -> dict:
        try:
            i = int(item_id)
        except ValueError:
            raise ApiError(400, f"item id must be an integer, got {item_id!r}") from None
        if i not in self.items:
            raise ApiError(404, f"unknown item id {i}")
        it = self.items[i]
        return {"item_id": i, "title": it.title, "year": it.year, "genres": list(it.genres)} | self.engine.item_info(i)

    def health(self) -> dict:
        alive = self.thread.is_alive() and not self.stopped.is_set()
        st = self.engine.stats()
        return {"status": "ok" if alive else "stopping", "queue_depth": len(self.scheduler),
                "shards": self.engine.num_shards, "mode": self.mode, "scheduler": self.scheduler.policy,
                "policy": dataclasses.asdict(BLOCK_MODES[self.mode]) if self.mode in BLOCK_MODES else None,
                "canonical": self.engine.canonical, "serving_step": "batched" if self.batched else "serial",
                "max_batch": self.max_batch,
                "item_blocks": st["item_blocks"], "users_cached": st["users_cached"]}

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # --- the engine loop -----------------------------------------------------------------------

    def _submit(self, task: Task):
        task.payload["request_id"] = uuid.uuid4().hex[:12]
        task.enqueued = time.perf_counter()
        if task.kind == "rank":
            task.need = self.engine.shard_bytes(task.payload["candidates"])
        try:
            self.scheduler.submit(task)
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise ApiError(503, str(e), {"Retry-After": str(self.retry_after_s)}) from None

    def _wait(self, task: Task, gone) -> dict:
        """The task's result; a task whose client left or that timed out is cancelled (the engine
        loop then drops it instead of computing it)."""
        deadline = task.enqueued + self.timeout
        while True:
            try:
                return task.future.result(timeout=0.1)
            except FutureTimeout:
                if gone():
                    task.future.cancel()
                    raise ApiError(499, f"request {task.payload['request_id']}: the client closed the connection") \
                        from None
                if time.perf_counter() > deadline:
                    task.future.cancel()
                    raise ApiError(503, f"request {task.payload['request_id']} not answered within "
                                        f"{self.timeout:.0f}s: the server is overloaded",
                                   {"Retry-After": str(self.retry_after_s)}) from None
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001 - engine failure: 500 with the request id, keep serving
                self.metrics.engine_errors.inc()
                raise ApiError(500, f"engine failure on request {task.payload['request_id']}: "
                                    f"{type(e).__name__}: {e}") from e

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
            history = self._history(t.payload)
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

    def _history(self, payload: dict) -> list[int]:
        """The user's history for a rank request: the one it sends (stored from now on), else the stored."""
        if payload["history"] is not None:
            self.histories[payload["user"]] = list(payload["history"])
        return self.histories.get(payload["user"], [])

    def _rank(self, t: Task) -> dict:
        p = t.payload
        history = self._history(p)
        t0 = time.perf_counter()
        try:
            rec = self.recommender.recommend(p["user"], history, p["candidates"], shard=t.shard)
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
        p = t.payload
        hist = self.histories.setdefault(p["user"], [])
        probe = self._prompt(hist + p["items"], [p["items"][-1]])
        if self.mode in BLOCK_MODES:  # the user store's prefix, computed now (off the request path)
            computed = self.engine.update_user(p["user"], probe)
        elif self.mode == "prefix_warm":  # the baseline's prefix cache, warmed at event time the same way
            computed = self.engine.warm_prefix(probe)
        else:  # full / prefix: nothing is computed before the user's next request
            computed = 0
        hist.extend(p["items"])
        self.metrics.events.inc()
        return {"user_id": p["user"], "history_length": len(hist), "computed_tokens": computed}

    def stop(self, timeout: float = 60.0):
        """Stop taking requests, finish every queued one, stop the loop."""
        self.scheduler.close()
        self.stopped.set()
        self.thread.join(timeout)


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
