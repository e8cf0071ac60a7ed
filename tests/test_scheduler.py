"""The scheduler and the service's engine loop against a deterministic mock engine whose answers
can be worked out by hand (no model, no HTTP)."""

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rcllm_jax.serve.scheduler import QueueFull, Scheduler, Task
from rcllm_jax.serve.service import ApiError, RecommenderService
from rcllm_jax.serve.state import StateStore


def _task(need, cost=0.0):
    return Task("rank", None, need=np.asarray(need, np.int64), cost=cost)


def test_affinity_sends_each_request_to_its_blocks_under_a_cap():
    s = Scheduler(3, "affinity", window=8, slack=0.0)
    # bytes held per shard: r0 all on 0, r1 mostly 1, r2 mostly 0, r3 all on 2, r4 split 0/2 (0 wins)
    tasks = [s.submit(_task(n)) for n in ([9, 0, 0], [1, 8, 0], [6, 0, 3], [0, 0, 5], [4, 0, 3])]
    got = s.assign(tasks)
    # cap = ceil(5 / 3) = 2 per shard. Order by best share: r0 (1.0), r3 (1.0), r1 (0.89), r2 (0.67),
    # r4 (0.57): r0 -> 0, r3 -> 2, r1 -> 1, r2 -> 0 (shard 0 now full), r4: 0 full -> 2 (3/7 > 0/7)
    assert [t.shard for t in tasks] == [0, 1, 0, 2, 2]
    assert {k: [t.seq for t in v] for k, v in got.items()} == {0: [0, 2], 1: [1], 2: [3, 4]}


def test_affinity_ties_go_to_the_shard_that_has_taken_fewer():
    s = Scheduler(2, "affinity", window=8, slack=1.0)
    tasks = [s.submit(_task(n)) for n in ([5, 5], [5, 5], [5, 5], [0, 0])]  # indifferent to placement
    s.assign(tasks)
    # cap = ceil(4 / 2 x 2) = 4: never binding. Equal shares: fewer taken wins, then the lower index
    assert [t.shard for t in tasks] == [0, 1, 0, 1]


def test_cost_bound_admits_by_estimated_engine_time():
    """Hand-counted: at most 2.5 s of estimated work waits; a task is always taken into an empty
    queue, whatever it costs; what a window takes is freed."""
    s = Scheduler(2, max_queue=100, window=10, max_cost_s=2.5)
    big = s.submit(_task([1, 0], 10.0))  # alone: admitted
    with pytest.raises(QueueFull, match="10.0s of engine time"):
        s.submit(_task([1, 0], 0.1))
    assert s.next_window(0) == [big] and s.queued_cost == 0.0
    for _ in range(2):
        s.submit(_task([1, 0], 1.0))
    with pytest.raises(QueueFull):
        s.submit(_task([1, 0], 1.0))  # 3.0 > 2.5
    s.submit(_task([1, 0], 0.5))  # 2.5: fits
    assert s.queued_cost == 2.5 and [t.cost for t in s.next_window(0)] == [1.0, 1.0, 0.5] and s.queued_cost == 0.0
    with pytest.raises(ValueError, match="max_cost_s"):
        Scheduler(2, max_cost_s=0)


def test_round_robin_and_route():
    rr = Scheduler(3, "round_robin")
    tasks = [rr.submit(_task([9, 0, 0])) for _ in range(5)]
    rr.assign(tasks[:2])
    rr.assign(tasks[2:])
    assert [t.shard for t in tasks] == [0, 1, 2, 0, 1]
    assert [rr.route([9, 0, 0]) for _ in range(3)] == [2, 0, 1]  # the same stream goes on
    aff = Scheduler(3, "affinity")
    assert [aff.route(n) for n in ([0, 2, 9], [4, 4, 1], [0, 0, 0])] == [2, 0, 0]


def test_bounded_queue_and_windows():
    s = Scheduler(2, max_queue=3, window=2)
    for _ in range(3):
        s.submit(_task([1, 0]))
    with pytest.raises(QueueFull, match="queue full"):
        s.submit(_task([1, 0]))
    assert [t.seq for t in s.next_window(0)] == [0, 1] and [t.seq for t in s.next_window(0)] == [2]
    assert s.next_window(0.01) == []
    s.close()
    with pytest.raises(QueueFull, match="shutting down"):
        s.submit(_task([1, 0]))
    with pytest.raises(ValueError, match="unknown scheduler"):
        Scheduler(2, "random")


# --- the service loop with a mock engine ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
    title: str
    year: int = 2000
    genres: tuple = ()


@dataclasses.dataclass
class Result:
    scores: np.ndarray
    ttft_s: float
    shard: int
    prompt_tokens: int
    computed_tokens: int
    local_item_blocks: int
    remote_item_blocks: int
    remote_item_bytes: int


class MockEngine:
    """The engine's public interface only. Item i lives on shard i % 2 with i tokens of 10 bytes;
    the score of a candidate is -(its item id) plus the user's history length: rankings are
    ascending ids, and the history is visible in scores."""

    num_shards = 2
    canonical = "candidate"
    head = None  # label prompts: no ranking head

    def __init__(self, fail_user=None, delay=0.0):
        self.calls, self.steps, self.events, self.fail_user, self.delay = [], [], [], fail_user, delay
        self.prefixes = set()  # users whose history prefix a request or an event computed

        class Builder:
            def build(self, history, cands):
                if len(cands) > 5 or any(h >= 25 for h in history[-10:]):  # items 25+: titles too long
                    raise ValueError("prompt of 9999 tokens exceeds the model's context of 4096")
                return ("prompt", tuple(history), tuple(cands))
        self.builder = Builder()

    def shard_bytes(self, item_ids):
        need = np.zeros(2, np.int64)
        for i in item_ids:
            need[i % 2] += 10 * i
        return need

    def item_info(self, i):
        return {"cached": True, "shard": i % 2, "block_tokens": i}

    def stats(self):
        return {"item_blocks": len(ITEMS), "users_cached": 0,
                "user_store": {"hits": 0, "extensions": 0, "misses": 0, "evictions": 0}}

    def cached_users(self):
        return frozenset(self.prefixes)

    def rank(self, prompt, mode, user_id, shard):
        time.sleep(self.delay)
        if user_id == self.fail_user:
            raise RuntimeError("device lost")
        self.prefixes.add(user_id)
        _, hist, cands = prompt
        self.calls.append((user_id, shard))
        local = sum(1 for c in cands if c % 2 == shard)
        return Result(np.array([-c + len(hist) for c in cands], np.float32), 0.01, shard, 10, 1, local,
                      len(cands) - local, sum(c for c in cands if c % 2 != shard) * 10)

    def rank_step(self, requests, mode):
        self.steps.append([(user_id, shard) for _, user_id, shard in requests])
        return [self.rank(prompt, mode, user_id, shard) for prompt, user_id, shard in requests]

    def update_user(self, user, prompt, version=None):
        self.events.append(("user_store", user))
        self.prefixes.add(user)
        return len(prompt[1])

    def warm_prefix(self, prompt):
        self.events.append(("prefix_cache", None))
        return 100 + len(prompt[1])


ITEMS = {i: Item(f"movie {i}") for i in range(1, 30)}


def burst(svc, bodies):
    """Queue every body before the service's engine loop starts (one scheduling window), start it,
    answer them all, stop it. The answers, in order."""
    got = {}
    client = threading.Thread(target=lambda: got.update(outs=svc.recommend_many(bodies)))
    client.start()
    while len(svc.scheduler) < len(bodies):
        time.sleep(0.01)
    svc.start()
    client.join()
    svc.stop()
    return got["outs"]


def _state(histories=None):
    """A state database of its own (a fresh SQLite file) seeded with these histories."""
    import tempfile
    st = StateStore(Path(tempfile.mkdtemp()) / "state.sqlite3")
    st.seed("test", histories or {})
    return st


def _service(**kw):
    eng = MockEngine(**{k: kw.pop(k) for k in ("fail_user", "delay") if k in kw})
    svc = RecommenderService(eng, ITEMS, _state({7: [1, 2, 3]}), scheduler=Scheduler(2, "affinity", **kw),
                             max_candidates=5)
    svc.start()
    return svc, eng


def test_service_answers_by_hand_and_routes_by_affinity():
    svc, eng = _service()
    try:
        out = svc.recommend({"user_id": 7, "candidates": [4, 2, 8, 3], "top_k": 3})
        # scores -c + 3; best first: 2, 3, 4. Items 4, 2, 8 (14 tokens) live on shard 0, 3 on shard 1
        assert [r["item_id"] for r in out["ranking"]] == [2, 3, 4]
        assert [r["score"] for r in out["ranking"]] == [1.0, 0.0, -1.0]
        assert out["shard"] == 0 and out["cache"]["remote_item_blocks"] == 1
        ev = svc.add_events("7", {"items": [5, 6]})
        assert ev["history_length"] == 5 and ev["computed_tokens"] == 5
        assert svc.recommend({"user_id": 7, "candidates": [1]})["ranking"][0]["score"] == 4.0  # history grew
        assert svc.recommend({"user_id": 9, "history": [1], "candidates": [1]})["ranking"][0]["score"] == 0.0
        # opaque ids: "7" is user 7 (its history of 5 items), "u-abc" a user of its own
        assert svc.recommend({"user_id": "7", "candidates": [1]})["ranking"][0]["score"] == 4.0
        assert svc.recommend({"user_id": "u-abc", "candidates": [1]})["ranking"][0]["score"] == -1.0
        for body, status, msg in [
                ({"user_id": 7, "candidates": []}, 400, "empty"),
                ({"user_id": 7, "candidates": [1, 1]}, 400, "duplicate"),
                ({"user_id": 7, "candidates": [1, 999]}, 404, "unknown item"),
                ({"user_id": 7, "candidates": [1, 2, 3, 4, 5, 6]}, 400, "at most 5"),
                ({"user_id": 1.5, "candidates": [1]}, 400, "user_id must be a string or an integer"),
                ({"user_id": "a b", "candidates": [1]}, 400, "printable characters without spaces"),
                ({"user_id": 10**200, "candidates": [1]}, 400, "at most 128 digits"),
                ({"user_id": 7, "candidates": [2**70]}, 400, "out of range"),
                ({"candidates": [1]}, 400, "user_id is required"),
                ({"user_id": 7, "candidates": [1], "colour": 1}, 400, "unknown field"),
                ([1, 2], 400, "JSON object")]:
            with pytest.raises(ApiError, match=msg) as e:
                svc.recommend(body)
            assert e.value.status == status
        with pytest.raises(ApiError, match="unknown item id"):
            svc.item("12345")
        assert svc.item("3")["shard"] == 1
    finally:
        svc.stop()


def test_events_compute_what_the_mode_reads_at_request_time():
    """An event brings the user's prefix up to date where the mode will read it: the user store
    (block modes), the prefix cache (prefix_warm: the baseline warmed at event time too), or
    nowhere (full and prefix compute the prefix per request)."""
    for mode, want, computed in (("rcllm", [("user_store", "7")], 5), ("prefix_warm", [("prefix_cache", None)], 105),
                                 ("prefix", [], 0), ("full", [], 0)):
        eng = MockEngine()
        svc = RecommenderService(eng, ITEMS, _state({7: [1, 2, 3]}), mode=mode, scheduler=Scheduler(2, "affinity"),
                                 max_candidates=5)
        svc.start()
        try:
            ev = svc.add_events("7", {"items": [5, 6]})
            assert eng.events == want and ev == {"user_id": "7", "history_length": 5, "computed_tokens": computed,
                                                 "version": 1, "replay": False}
        finally:
            svc.stop()


def test_engine_failure_is_a_500_with_request_id_and_the_loop_survives():
    svc, eng = _service(fail_user="13")  # user ids reach the engine as strings
    try:
        with pytest.raises(ApiError, match="engine failure on request [0-9a-f]{12}") as e:
            svc.recommend({"user_id": 13, "candidates": [1, 2]})
        assert e.value.status == 500 and "device lost" not in e.value.message  # the cause stays in the log
        assert svc.recommend({"user_id": 7, "candidates": [1, 2]})["ranking"][0]["item_id"] == 1
        assert svc.health()["status"] == "ok"
    finally:
        svc.stop()


def test_full_queue_answers_503_and_stop_drains_everything():
    svc, eng = _service(delay=0.05, max_queue=2, window=1)
    results, errors = [], []

    def call(u):
        try:
            results.append(svc.recommend({"user_id": u, "candidates": [1, 2]}))
        except ApiError as e:
            errors.append(e)
    threads = [threading.Thread(target=call, args=(u,)) for u in range(20, 32)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    svc.stop()  # drains what was queued
    for t in threads:
        t.join()
    assert len(results) + len(errors) == 12 and results
    assert errors and all(e.status == 503 and e.headers == {"Retry-After": "1"} for e in errors)
    assert len(eng.calls) == len(results)  # every accepted request answered once, none twice
    assert len({r["request_id"] for r in results}) == len(results)


def test_request_without_candidates_is_retrieved_then_reranked():
    """No candidates: the retriever proposes them from the user's history (a hand-made table),
    the engine ranks them; an unknown user with no history gets the popularity fallback."""
    from rcllm_jax.retrieval import ItemKNN
    seqs = [[1, 2, 3], [1, 2], [2, 3], [4], [3, 5]]
    retriever = ItemKNN.fit(seqs, list(ITEMS), neighbours=5, decay=0.5)
    eng = MockEngine()
    svc = RecommenderService(eng, ITEMS, _state({7: [3, 1]}), scheduler=Scheduler(2, "affinity"), max_candidates=5,
                             retriever=retriever, num_candidates=3)
    svc.start()
    try:
        out = svc.recommend({"user_id": 7})
        # retrieved for [3, 1]: 2, 5, then by popularity 4; the mock ranks ascending ids
        assert out["retrieved"] is True
        assert [r["item_id"] for r in out["ranking"]] == [2, 4, 5]
        cold = svc.recommend({"user_id": 4242, "num_candidates": 2})  # nobody knows this user
        assert [r["item_id"] for r in cold["ranking"]] == [2, 3]  # the two most popular items
        given = svc.recommend({"user_id": 7, "candidates": [9, 8]})
        assert given["retrieved"] is False and [r["item_id"] for r in given["ranking"]] == [8, 9]
        for body, msg in [({"user_id": 7, "num_candidates": 0}, "num_candidates must be in 1..5"),
                          ({"user_id": 7, "num_candidates": 9}, "num_candidates must be in 1..5"),
                          ({"user_id": 7, "candidates": [1], "num_candidates": 2}, "retrieved candidates only"),
                          ({"candidates": [1]}, "user_id is required")]:
            with pytest.raises(ApiError, match=msg) as e:
                svc.recommend(body)
            assert e.value.status == 400
    finally:
        svc.stop()
    plain = RecommenderService(MockEngine(), ITEMS, _state({}), scheduler=Scheduler(2), max_candidates=5)
    with pytest.raises(ApiError, match="no retriever") as e:
        plain.recommend({"user_id": 1})
    assert e.value.status == 400


def test_timed_out_and_abandoned_requests_are_dropped_not_computed():
    """A request still queued when its time is up gets 503 + Retry-After, one whose client left
    gets 499; neither is computed. Metrics count them, typed and exact."""
    eng = MockEngine(delay=0.5)
    svc = RecommenderService(eng, ITEMS, _state({}), scheduler=Scheduler(2, "affinity", window=1), max_candidates=5,
                             request_timeout_s=0.25)
    svc.start()
    out = {}

    def call(u, gone=lambda: False):
        try:
            out[u] = svc.recommend({"user_id": u, "candidates": [1, 2]}, gone)
        except ApiError as e:
            out[u] = e
    try:
        first = threading.Thread(target=call, args=("busy",))
        first.start()
        time.sleep(0.05)  # "busy" is being computed (0.5 s); the next two wait behind it
        rest = [threading.Thread(target=call, args=("late",)), threading.Thread(target=call, args=("gone", lambda: True))]
        for t in rest:
            t.start()
        for t in [first] + rest:
            t.join()
        time.sleep(0.3)  # the loop has passed over the cancelled ones
        assert out["late"].status == 503 and out["late"].headers == {"Retry-After": "1"} and "overloaded" in out["late"].message
        assert out["gone"].status == 499
        assert [c[0] for c in eng.calls] == ["busy"]  # only the one already running was computed
        text = svc.metrics_text().decode()
        assert "\nrcllm_dropped_total 2.0\n" in text and "# TYPE rcllm_dropped_total counter" in text
        assert "# HELP rcllm_queue_depth" in text and "# TYPE rcllm_compiles_total counter" in text
    finally:
        svc.stop()


def test_windows_run_as_serving_steps_of_every_shard():
    """A window's shard batches become serving steps (step k = the k-th run of up to max_batch
    requests of each shard), worked out by hand; the batched loop ranks a queued window in those
    steps, the serial loop one request at a time, with the same answers."""
    from rcllm_jax.serve.service import serving_steps
    t = [Task("rank", i) for i in range(7)]
    assert serving_steps({0: t[:5], 1: t[5:]}, 2) == [[t[0], t[1], t[5], t[6]], [t[2], t[3]], [t[4]]]
    assert serving_steps({1: t[:3]}, 8) == [t[:3]]
    bodies = [{"user_id": u, "candidates": c} for u, c in
              [(1, [2, 4]), (2, [4, 6]), (3, [1, 3]), (4, [3, 5]), (5, [2, 8]), (6, [1, 9])]]
    answers = {}
    for step in ("batched", "serial"):
        eng = MockEngine()
        svc = RecommenderService(eng, ITEMS, _state({}), scheduler=Scheduler(2, "affinity", window=8), max_candidates=5,
                                 serving_step=step, max_batch=2)
        outs = burst(svc, bodies)  # the six requests queue first: one window
        answers[step] = [[r["item_id"] for r in out["ranking"]] for out in outs]
        if step == "batched":  # items 2, 4, 6, 8 on shard 0, odd ones on shard 1: 3 + 3, up to 2 each per step
            assert [sorted(s) for s in eng.steps] == [[("1", 0), ("2", 0), ("3", 1), ("4", 1)], [("5", 0), ("6", 1)]]
        else:
            assert eng.steps == [] and len(eng.calls) == 6
    assert answers["batched"] == answers["serial"] == [[2, 4], [4, 6], [1, 3], [3, 5], [2, 8], [1, 9]]
    with pytest.raises(ValueError, match="unknown serving step"):
        RecommenderService(MockEngine(), ITEMS, _state({}), scheduler=Scheduler(2), serving_step="parallel")



def test_new_users_are_admitted_by_their_cost():
    """With costs (returning 0.1 s, new 1.0 s) and 1.5 s of queued work at most: while the loop is
    stopped, a new user's request and a returning user's are admitted, a second new user's is
    refused (503) although the count bound (100) is far, and returning users still fit."""
    eng = MockEngine()
    eng.prefixes.add("5")  # user 5's prefix is cached
    svc = RecommenderService(eng, ITEMS, _state({5: [1, 2], 6: [3, 4], 8: [5]}),
                             scheduler=Scheduler(2, max_queue=100, window=100, max_cost_s=1.5), max_candidates=5,
                             cost_s=(0.1, 1.0))
    bodies = [{"user_id": u, "candidates": [1, 2]} for u in (6, 5, 8, 5, 5)]
    got = {}
    client = threading.Thread(target=lambda: got.update(outs=svc.recommend_many(bodies)))
    client.start()
    while len(svc.scheduler) < 4:  # 6 (1.0), 5 (0.1), 5, 5 admitted; 8 (a second 1.0) refused
        time.sleep(0.01)
    assert svc.scheduler.queued_cost == pytest.approx(1.3)
    svc.start()
    client.join()
    svc.stop()
    assert [o.get("status", 200) for o in got["outs"]] == [200, 200, 503, 200, 200]


def test_queue_bound_adapts_to_the_measured_service_time():
    """With a latency target, the bound is target / (moving average of the engine time per
    request), at least 8 outstanding, minus the window: fast requests raise it, slow ones (new
    users computing their prefix) bring it down; without a target it stays as configured."""
    eng = MockEngine(delay=0.02)
    sched = Scheduler(2, "affinity", max_queue=3, window=2)
    svc = RecommenderService(eng, ITEMS, _state({}), scheduler=sched, max_candidates=5, latency_target_s=1.0)
    svc.start()
    try:
        for u in range(5):
            svc.recommend({"user_id": u, "candidates": [1, 2]})
        fast = sched.max_queue
        assert 0.02 <= svc.service_s < 0.1 and fast == int(1.0 / svc.service_s) - 2 > 8
        eng.delay = 0.3
        for u in range(10):
            svc.recommend({"user_id": u, "candidates": [1, 2]})
        assert svc.service_s > 0.15 and sched.max_queue == max(8, int(1.0 / svc.service_s)) - 2 < fast
        assert f"\nrcllm_queue_bound {float(sched.max_queue)}\n" in svc.metrics_text().decode()
    finally:
        svc.stop()
    fixed = Scheduler(2, max_queue=3)
    plain = RecommenderService(MockEngine(), ITEMS, _state({}), scheduler=fixed, max_candidates=5)
    plain.start()
    try:
        plain.recommend({"user_id": 1, "candidates": [1]})
    finally:
        plain.stop()
    assert fixed.max_queue == 3
