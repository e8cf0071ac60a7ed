"""Bounded load test of a running server (loopback only).

python launch/loadtest.py --url=http://127.0.0.1:8000 --clients=8 --requests=200 --duration_s=120
N client threads send POST /v1/recommend (real users, their histories, candidates as in the
benchmark) until `--requests` are sent or `--duration_s` passes. Reports throughput, TTFT and
latency p50/p99, status counts, and checks every request was answered exactly once (each carries
a client tag; answers are matched by it). Writes JSON.

--kind=events: the clients post one-item events instead (POST /v1/users/{id}/events, each with an
event_id, to `--num_users` new users of this run); afterwards every user's stored history
(GET /v1/users/{id}) must hold exactly its acknowledged events, in no other count (an event
answered 503 is not applied; retried with its event_id it is applied once).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from rcllm_jax.eval.metrics import percentile  # noqa: E402

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "Server address (loopback only).")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Concurrent clients.")
_REQUESTS = flags.DEFINE_integer("requests", 200, "Requests in total (upper bound).")
_DURATION = flags.DEFINE_float("duration_s", 120.0, "Stop sending after this long.")
_CANDS = flags.DEFINE_integer("num_candidates", 20, "Candidates per request.")
_NEG = flags.DEFINE_string("negatives", "retrieval", "Negative sampling (uniform, popularity, retrieval).")
_USERS = flags.DEFINE_integer("num_users", 100, "Distinct users (requests cycle over them).")
_MAX_ITEM = flags.DEFINE_integer("max_item", 0, "Only candidates with id <= this (servers started with --max_items).")
_OUT = flags.DEFINE_string("output_json", "bench_out/loadtest.json", "Where to write the report.")
_KIND = flags.DEFINE_enum("kind", "recommend", ["recommend", "events"], "What the clients send.")
_RETRIES = flags.DEFINE_integer("retries_on_503", 0, "Resend a request answered 503 after its Retry-After (1 s), "
                                "up to this many times (a client that backs off); latency counts from the first try.")
_BACKOFF = flags.DEFINE_enum("backoff", "fixed", ["fixed", "jittered"], "How a client waits before resending a 503: "
                              "fixed (the Retry-After, 1 s) or jittered (uniform in 0.5..1.5 x the Retry-After, so "
                              "clients refused together do not all come back together).")
_WARM = flags.DEFINE_bool("warm_users", False, "First send one untimed request per distinct user, one at a time, so "
                          "the timed ones come from returning users (history prefixes cached, as after their "
                          "events in production).")


def _post(url, body, timeout=300.0):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _stored_events(url, user) -> int:
    """How many items the server's state database holds for a user (0: unknown to it)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/users/{user}", timeout=60) as r:
            return len(json.loads(r.read())["history"])
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return 0
        raise


def _metric(url, family_name: str, sample_name: str) -> float | None:
    """One sample of the server's /metrics (None if it does not say)."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            return next((s.value for s in family.samples if s.name == sample_name), None)
    return None


def _compiles(url) -> int | None:
    """The server's XLA compilations so far (its /metrics counter), None if it does not say."""
    n = _metric(url, "rcllm_compiles", "rcllm_compiles_total")
    return None if n is None else int(n)


def _rss_gib(url) -> float | None:
    """The server process's resident memory (its /metrics process collector), GiB."""
    b = _metric(url, "process_resident_memory_bytes", "process_resident_memory_bytes")
    return None if b is None else b / 2**30


def _bodies() -> list[dict]:
    """The requests the clients send: events on this run's own users, or recommend requests of
    ML-100k users with sampled candidates."""
    from rcllm_jax.data.movielens import LeaveOneOut, load_dataset, sample_candidates
    if _KIND.value == "events":
        run = f"load-{os.getpid()}-{int(time.time())}"
        return [{"user_id": f"{run}-u{n % _USERS.value}", "items": [1 + n % 50], "event_id": f"{run}-e{n}"}
                for n in range(_REQUESTS.value)]
    split = LeaveOneOut(load_dataset("ml-100k"))
    if _MAX_ITEM.value:
        keep = {i: it for i, it in split.dataset.items.items() if i <= _MAX_ITEM.value}
        seqs = {u: tuple(i for i in s if i in keep) for u, s in split.dataset.sequences.items()}
        split = LeaveOneOut(type(split.dataset)(split.dataset.name, keep, {u: s for u, s in seqs.items() if len(s) >= 3}))
    users = list(split.users)
    bodies, n = [], 0
    while len(bodies) < _REQUESTS.value and n < 100 * _REQUESTS.value:
        u = users[n % min(len(users), _USERS.value)]
        n += 1
        try:
            cands = sample_candidates(split, u, split.target(u), _CANDS.value, _NEG.value, seed=n)
        except ValueError:  # a user who rated (nearly) the whole catalog: no negatives to draw
            continue
        bodies.append({"user_id": int(u), "candidates": [int(c) for c in cands]})
    return bodies


def _warm_users(bodies):
    """One untimed request per distinct user first, one at a time (their prefixes cached)."""
    t_warm = time.perf_counter()
    for u in sorted({b["user_id"] for b in bodies}):
        first = next(b for b in bodies if b["user_id"] == u)
        status, body = _post(_URL.value + "/v1/recommend", first)
        if status != 200:
            raise app.UsageError(f"warm-up request for user {u} answered {status}: {body}")
    print(f"warmed {len({b['user_id'] for b in bodies})} users in {time.perf_counter() - t_warm:.1f}s", flush=True)


def _send(b: dict):
    """(status, body) of one request (-1 and the error for a dropped connection)."""
    try:
        if _KIND.value == "events":
            return _post(f"{_URL.value}/v1/users/{b['user_id']}/events", {"items": b["items"], "event_id": b["event_id"]})
        return _post(_URL.value + "/v1/recommend", b)
    except Exception as e:  # noqa: BLE001 - a dropped connection is an error, not a crash
        return -1, {"error": str(e)}


def _drive(bodies):
    """The closed loop: --clients threads, each sending the next body, resending a 503 after its
    Retry-After (--retries_on_503, --backoff), until the bodies or --duration_s run out. Returns
    (sent indices, {index: [(status, body, latency from the first try)]}, 503s resent, answers per
    client, wall seconds)."""
    import numpy as np
    answers = collections.defaultdict(list)  # tag -> responses (must be exactly one each)
    lock, nxt = threading.Lock(), iter(range(len(bodies)))
    t_end = time.perf_counter() + _DURATION.value
    sent, retried = [], [0]
    per_client = [0] * _CLIENTS.value  # answers (200) each client got: a closed loop's fairness

    def client(c: int):
        rng = np.random.default_rng()  # a client's own jitter
        while time.perf_counter() < t_end:
            with lock:
                n = next(nxt, None)
            if n is None:
                return
            t0 = time.perf_counter()
            for attempt in range(_RETRIES.value + 1):
                status, body = _send(bodies[n])
                if status != 503 or attempt == _RETRIES.value:
                    break
                with lock:
                    retried[0] += 1
                time.sleep(1.0 if _BACKOFF.value == "fixed" else rng.uniform(0.5, 1.5))  # the server's Retry-After
            with lock:
                sent.append(n)
                answers[n].append((status, body, time.perf_counter() - t0))
                per_client[c] += status == 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(_CLIENTS.value)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent, answers, retried[0], per_client, time.perf_counter() - t0


def main(argv):
    del argv
    host = urllib.parse.urlparse(_URL.value).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise app.UsageError(f"load tests run against loopback only, not {host!r}")
    bodies = _bodies()
    try:  # what the server runs (mode, shards, scheduler), recorded with the figures
        with urllib.request.urlopen(_URL.value + "/healthz", timeout=30) as r:
            server = json.loads(r.read())
    except (OSError, ValueError) as e:
        raise app.UsageError(f"no server answering at {_URL.value}/healthz: {e}") from None
    if _WARM.value and _KIND.value == "recommend":
        _warm_users(bodies)
    compiles0 = _compiles(_URL.value)
    sent, answers, retried, per_client, wall = _drive(bodies)
    compiles1, rss1 = _compiles(_URL.value), _rss_gib(_URL.value)
    ok = [a for n in sorted(set(sent)) for a in answers[n] if a[0] == 200]
    statuses = collections.Counter(a[0] for n in set(sent) for a in answers[n])
    lost = [n for n in sent if not answers[n]]
    twice = [n for n in set(sent) if len(answers[n]) > 1]
    lat = [a[2] for a in ok]
    if _KIND.value == "events":  # exactly the acknowledged events are stored, once each
        ttft, ids, served = [], [], []
        acked = collections.Counter(bodies[n]["user_id"] for n in sorted(set(sent)) for a in answers[n]
                                    if a[0] == 200)
        mismatched = sum(_stored_events(_URL.value, u) != acked[u] for u in sorted({b["user_id"] for b in bodies}))
    else:
        ttft = [a[1]["timings"]["ttft_s"] for a in ok]
        served = [a[1]["timings"]["total_s"] for a in ok]  # the server's own: arrival of the answered try to answer
        ids = [a[1]["request_id"] for a in ok]
        mismatched = None
    report = {"kind": _KIND.value, "clients": _CLIENTS.value, "users": len({b["user_id"] for b in bodies}),
              "warm_users": _WARM.value,
              "server": {k: server.get(k) for k in ("mode", "policy", "canonical", "shards", "scheduler",
                                                    "serving_step", "max_batch")},
              "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "sent": len(sent), "answered_200": len(ok), "status_counts": dict(statuses),
              "errors": len(sent) - len(ok), "retried_503": retried, "lost": len(lost), "answered_twice": len(twice),
              "duplicate_request_ids": len(ids) - len(set(ids)), "wall_s": wall,
              "compiles_during_run": None if compiles0 is None or compiles1 is None else compiles1 - compiles0,
              "throughput_rps": len(ok) / wall if wall else 0.0,
              "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
              "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
              "server_latency_p50_s": percentile(served, 50), "server_latency_p99_s": percentile(served, 99),
              "shards": dict(collections.Counter(a[1].get("shard") for a in ok)),
              "answered_per_client": per_client,
              "users_with_other_than_acknowledged_events": mismatched, "server_rss_gib_after": rss1}
    print(json.dumps(report, indent=2))
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(report, indent=2))
    if lost or twice or mismatched:
        sys.exit(1)

if __name__ == "__main__":
    app.run(main)
