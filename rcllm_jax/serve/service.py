"""The recommendation service behind the HTTP API: request validation, per-user histories, the
engine loop (one background thread owns the engine: every cache mutation is serialised), the
scheduler, and Prometheus metrics."""

from __future__ import annotations

import collections
import threading
import time
import traceback
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from rcllm_jax.data.prompt import check_candidates
from rcllm_jax.recommender import Recommender
from rcllm_jax.serve.scheduler import QueueFull, Scheduler, Task

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiError(Exception):
    """An answer other than 200: HTTP status, message (and headers)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        self.ttft = np.zeros(len(TTFT_BUCKETS) + 1, np.int64)
        self.ttft_sum = 0.0

    def inc(self, name: str, by: float = 1):
        with self.lock:
            self.counters[name] += by

    def observe_ttft(self, s: float):
        with self.lock:
            self.ttft[np.searchsorted(TTFT_BUCKETS, s)] += 1
            self.ttft_sum += s

    def render(self, gauges: dict) -> str:
        with self.lock:
            lines = ["# TYPE rcllm_ttft_seconds histogram"]
            cum = np.cumsum(self.ttft)
            for b, c in zip(TTFT_BUCKETS, cum):
                lines.append(f'rcllm_ttft_seconds_bucket{{le="{b}"}} {int(c)}')
            lines += [f'rcllm_ttft_seconds_bucket{{le="+Inf"}} {int(cum[-1])}',
                      f"rcllm_ttft_seconds_sum {self.ttft_sum:.6f}", f"rcllm_ttft_seconds_count {int(cum[-1])}"]
            for name, v in sorted(self.counters.items()):
                lines += [f"# TYPE rcllm_{name} counter", f"rcllm_{name} {v:g}"]
        for name, v in sorted(gauges.items()):
            lines += [f"# TYPE rcllm_{name} gauge", f"rcllm_{name} {v:g}"]
        return "\n".join(lines) + "\n"


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{what} must be an integer, got {v!r}")
    return v


class RecommenderService:
    def __init__(self, engine, items: dict, histories: dict[int, list[int]], *, mode: str = "rcllm",
                 scheduler: Scheduler, max_candidates: int = 100, request_timeout_s: float = 60.0,
                 retriever=None, num_candidates: int = 20):
        """retriever: proposes the candidates of a request that sends none (`rcllm_jax.retrieval`);
        num_candidates: how many it proposes unless the request says."""
        self.engine, self.items, self.mode, self.scheduler = engine, items, mode, scheduler
        self.recommender = Recommender(engine, retriever, mode)
        self.num_candidates = min(num_candidates, max_candidates)
        self.histories = {int(u): list(h) for u, h in histories.items()}
        self.max_candidates, self.timeout = max_candidates, request_timeout_s
        self.metrics = Metrics()
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

    def recommend(self, body) -> dict:
        t0 = time.perf_counter()
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        extra = set(body) - {"user_id", "history", "candidates", "num_candidates", "top_k"}
        if extra:
            raise ApiError(400, f"unknown field(s): {sorted(extra)}")
        if "user_id" not in body:
            raise ApiError(400, "user_id is required")
        user = _int(body["user_id"], "user_id")
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
        res = self._run(task)
        total = time.perf_counter() - t0
        order = np.argsort(-res["scores"], kind="stable")[:top_k]
        return {"user_id": user, "request_id": task.payload["request_id"],
                "ranking": [{"item_id": cands[i], "score": float(res["scores"][i]),
                             "title": self.items[cands[i]].title} for i in order],
                "shard": res["shard"], "mode": self.mode, "retrieved": retrieved,
                "timings": {"queue_s": res["queue_s"], "ttft_s": res["ttft_s"], "prefill_s": res["prefill_s"],
                            "total_s": total},
                "cache": {"prompt_tokens": res["prompt_tokens"], "computed_tokens": res["computed_tokens"],
                          "local_item_blocks": res["local"], "remote_item_blocks": res["remote"]}}

    def add_events(self, user_id: str, body) -> dict:
        try:
            user = int(user_id)
        except ValueError:
            raise ApiError(400, f"user id must be an integer, got {user_id!r}") from None
        if not isinstance(body, dict) or set(body) != {"items"}:
            raise ApiError(400, 'body must be {"items": [item ids]}')
        new = self._item_ids(body["items"], "items")
        if not new:
            raise ApiError(400, "items is empty")
        return self._run(Task("event", {"user": user, "items": new}))

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
                "item_blocks": st["item_blocks"], "users_cached": st["users_cached"]}

    def metrics_text(self) -> str:
        st = self.engine.stats()
        us = st["user_store"]
        return self.metrics.render({"queue_depth": len(self.scheduler), "compiles": self.compiles[0],
                                    "user_cache_hits": us.get("hits", 0), "user_cache_extensions": us.get("extensions", 0),
                                    "user_cache_misses": us.get("misses", 0), "user_cache_evictions": us.get("evictions", 0),
                                    "users_cached": st["users_cached"]})

    # --- the engine loop -----------------------------------------------------------------------

    def _run(self, task: Task) -> dict:
        task.payload["request_id"] = uuid.uuid4().hex[:12]
        task.enqueued = time.perf_counter()
        if task.kind == "rank":
            task.need = self.engine.shard_bytes(task.payload["candidates"])
        try:
            self.scheduler.submit(task)
        except QueueFull as e:
            self.metrics.inc("rejected_total")
            raise ApiError(503, str(e), {"Retry-After": "1"}) from None
        try:
            return task.future.result(timeout=self.timeout)
        except FutureTimeout:
            raise ApiError(504, f"request {task.payload['request_id']} not answered within {self.timeout:.0f}s") from None
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - engine failure: 500 with the request id, keep serving
            self.metrics.inc("engine_errors_total")
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
                for shard, batch in self.scheduler.assign(window[i:j]).items():
                    for t in batch:
                        self._execute(t)
                i = j

    def _execute(self, t: Task):
        if t.future.done():
            return
        started = time.perf_counter()
        try:
            if t.kind == "rank":
                out = self._rank(t)
                out["queue_s"] = started - t.enqueued
                self.metrics.observe_ttft(out["ttft_s"])
                self.metrics.inc("requests_total")
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
        if p["history"] is not None:
            self.histories[p["user"]] = list(p["history"])
        t0 = time.perf_counter()
        try:
            res = self.recommender.recommend(p["user"], self.histories.get(p["user"], []), p["candidates"],
                                             shard=t.shard).result
        except ValueError as e:  # the prompt: too long for the model (413) or malformed (400)
            raise ApiError(413 if "exceeds" in str(e) else 400, str(e)) from None
        wall = time.perf_counter() - t0  # incl. computing the user's history prefix when not cached
        self.metrics.inc("remote_item_blocks_total", res.remote_item_blocks)
        self.metrics.inc("local_item_blocks_total", res.local_item_blocks)
        self.metrics.inc("remote_item_bytes_total", res.remote_item_bytes)
        return {"scores": np.asarray(res.scores), "ttft_s": wall, "prefill_s": res.ttft_s, "shard": res.shard,
                "prompt_tokens": res.prompt_tokens, "computed_tokens": res.computed_tokens,
                "local": res.local_item_blocks, "remote": res.remote_item_blocks}

    def _event(self, t: Task) -> dict:
        p = t.payload
        hist = self.histories.setdefault(p["user"], [])
        probe = self._prompt(hist + p["items"], [p["items"][-1]])
        computed = self.engine.update_user(p["user"], probe)
        hist.extend(p["items"])
        self.metrics.inc("events_total")
        return {"user_id": p["user"], "history_length": len(hist), "computed_tokens": computed}

    def stop(self, timeout: float = 60.0):
        """Stop taking requests, finish every queued one, stop the loop."""
        self.scheduler.close()
        self.stopped.set()
        self.thread.join(timeout)
