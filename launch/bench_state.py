"""Throughput of the state database alone: committed events per second (`StateStore.append`, one
transaction each) from N client threads, on SQLite (WAL, synchronous=FULL: every commit is
fsynced) and, with --postgres, on a real PostgreSQL server this script starts itself (the
`pgserver` wheel). The server's own events/s (engine included) come from
`launch/loadtest.py --kind=events`.

python launch/bench_state.py --clients=8 --duration_s=20 --postgres --output_json=docs/benchmarks/state_db.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CLIENTS = flags.DEFINE_integer("clients", 8, "Concurrent client threads.")
_DURATION = flags.DEFINE_float("duration_s", 20.0, "How long each backend is driven.")
_USERS = flags.DEFINE_integer("num_users", 100, "Distinct users the events go to.")
_PG = flags.DEFINE_bool("postgres", False, "Also measure PostgreSQL (started here from the pgserver wheel).")
_OUT = flags.DEFINE_string("output_json", "bench_out/state_db.json", "Where to write the report.")


def _drive(store, clients: int, duration_s: float, users: int) -> dict:
    """Events from `clients` threads for `duration_s`; per-event commit latency and events/s."""
    import numpy as np
    lat, lock = [], threading.Lock()
    t_end = time.perf_counter() + duration_s

    def client(c):
        own, n = [], 0
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            store.append(f"bench-u{(c * 7919 + n) % users}", [1 + n % 50], event_id=f"c{c}-e{n}")
            own.append(time.perf_counter() - t0)
            n += 1
        with lock:
            lat.extend(own)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stored = sum(len(store.history(f"bench-u{u}")) for u in range(users))
    return {"events": len(lat), "wall_s": wall, "events_per_s": len(lat) / wall,
            "commit_p50_ms": float(np.percentile(lat, 50) * 1e3), "commit_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "stored_items": stored, "all_stored": stored == len(lat)}


def main(argv):
    del argv
    from rcllm_jax.serve.state import StateStore
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["sqlite (WAL, synchronous=FULL)"] = _drive(StateStore(Path(tmp) / "s.sqlite3"), _CLIENTS.value,
                                                        _DURATION.value, _USERS.value)
        if _PG.value:
            import pgserver
            srv = pgserver.get_server(str(Path(tmp) / "pg"), cleanup_mode="stop")
            try:
                rows["postgresql (pgserver, local socket)"] = _drive(StateStore(srv.get_uri()), _CLIENTS.value,
                                                                     _DURATION.value, _USERS.value)
            finally:
                srv.cleanup()
    print(f"{'backend':<36} {'events/s':>9} {'commit p50 ms':>14} {'p99 ms':>8}  all stored")
    for name, r in rows.items():
        print(f"{name:<36} {r['events_per_s']:9.1f} {r['commit_p50_ms']:14.2f} {r['commit_p99_ms']:8.2f}  "
              f"{r['all_stored']}")
    report = {"clients": _CLIENTS.value, "duration_s": _DURATION.value, "users": _USERS.value,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "cores": os.cpu_count(), "results": rows}
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(report, indent=2))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
