"""A catalog update taken by a live server under load: does any request fail across the switch?

python launch/bench_reload.py --output_json=bench_out/reload.json
ML-100k written as a catalog directory (`export_catalog.py`), its item caches built
(`build_cache.py --catalog`), served (`serve.py --catalog`, the default model); then --changed of
the items retitled and --new items added to the directory, `build_cache.py --update`, and
`loadtest.py` driving the server while POST /admin/reload swaps the new step in partway through.
Reported: the update's summary, the reload's answer and when it came, the load test's status
counts (every request answered exactly once, how many not 200) and its answers before and after
the switch. Processes share this machine's cores (a correctness run under load, not a timing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CHANGED = flags.DEFINE_float("changed", 0.01, "Fraction of the items retitled.")
_NEW = flags.DEFINE_integer("new", 10, "Items added.")
_CLIENTS = flags.DEFINE_integer("clients", 4, "Load-test clients.")
_DURATION = flags.DEFINE_float("duration_s", 90.0, "Load-test length.")
_AT = flags.DEFINE_float("reload_at_s", 30.0, "Seconds after the load test's first answer the reload is sent.")
_MESH = flags.DEFINE_string("mesh", "items:2", "The server's mesh.")
_OUT = flags.DEFINE_string("output_json", "bench_out/reload.json", "Where to write the JSON.")
LAUNCH = Path(__file__).resolve().parent


def _run(script: str, *args) -> str:
    r = subprocess.run([sys.executable, str(LAUNCH / script), *args], capture_output=True, text=True)
    if r.returncode:
        raise app.UsageError(f"{script} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def _answered(url: str) -> int:
    """Ranking requests the server has answered so far (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        m = re.search(r"\nrcllm_requests_total (\S+)\n", r.read().decode())
    return int(float(m.group(1))) if m else 0


def _edit(d: Path, changed: float, new: int) -> dict:
    """Retitle `changed` of the items of catalog directory `d` and append `new` items."""
    import numpy as np
    lines = (d / "items.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(rows), size=max(1, int(round(changed * len(rows)))), replace=False)
    for i in picked:
        rows[i]["text"] += " (restored edition)"
    top = max(int(r["id"]) for r in rows)
    rows += [dict(rows[j], id=str(top + 1 + j), text=rows[j]["text"] + " (sequel)") for j in range(new)]
    (d / "items.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"retitled": len(picked), "new": new, "items_after": len(rows)}


def main(argv):
    del argv
    from rcllm_jax.data.catalog import write_catalog
    from rcllm_jax.data.movielens import load_dataset
    tmp = Path(tempfile.mkdtemp(prefix="bench_reload_"))
    server = None
    try:
        cat = write_catalog(load_dataset("ml-100k"), tmp / "catalog")
        common = [f"--catalog={cat}", f"--snapshot_dir={tmp / 'snap'}", f"--mesh={_MESH.value}"]
        _run("build_cache.py", *common)
        server = subprocess.Popen([sys.executable, str(LAUNCH / "serve.py"), *common, "--port=0", "--nowarmup",
                                   "--calibration_requests=0", f"--state_db={tmp / 'state.sqlite3'}",
                                   f"--users_dir={tmp / 'users'}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url, log = None, []
        for line in server.stdout:
            log.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise app.UsageError("the server did not start:\n" + "".join(log[-40:]))
        threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
        change = _edit(cat, _CHANGED.value, _NEW.value)
        update = json.loads(re.search(r"(?s)^\{.*?^\}", _run("build_cache.py", *common, "--update"), re.M).group(0))
        load_json = tmp / "load.json"
        load = subprocess.Popen([sys.executable, str(LAUNCH / "loadtest.py"), f"--url={url}",
                                 f"--clients={_CLIENTS.value}", f"--duration_s={_DURATION.value}", "--requests=1000",
                                 f"--output_json={load_json}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        while _answered(url) < 1 and load.poll() is None:  # the load has started
            time.sleep(0.5)
        time.sleep(_AT.value)
        before = _answered(url)
        t0 = time.time()
        req = urllib.request.Request(url + "/admin/reload", b"{}", {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            reload = json.loads(r.read())
        reload["wall_s"] = time.time() - t0
        reload["answered_before"], reload["answered_during"] = before, _answered(url) - before
        _, err = load.communicate(timeout=_DURATION.value + 900)
        if not load_json.exists():
            raise app.UsageError(f"loadtest.py wrote no report:\n{err[-3000:]}")
        loadtest = json.loads(load_json.read_text())
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)
    keep = ("sent", "answered_200", "status_counts", "errors", "lost", "answered_twice", "throughput_rps",
            "latency_p50_s", "latency_p99_s", "compiles_during_run")
    result = {"config": {"mesh": _MESH.value, "clients": _CLIENTS.value, "duration_s": _DURATION.value,
                         "reload_at_s": _AT.value, **change},
              "update": {k: update.get(k) for k in ("step", "update", "restore_s", "build_s", "save_s", "total_s")},
              "reload": reload, "loadtest": {k: loadtest[k] for k in keep},
              "no_request_failed": loadtest["errors"] == 0 and loadtest["lost"] == 0 and not loadtest["answered_twice"]}
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    lt = result["loadtest"]
    print(f"update: {update['update']} in {update['total_s']:.1f}s; reload to step {reload['step']} "
          f"(+{reload['added']} items) staged in {reload['staged_s']:.1f}s, swapped in {reload['swap_s']:.2f}s "
          f"under load; load test: {lt['sent']} sent, {lt['answered_200']} answered 200, status {lt['status_counts']}, "
          f"lost {lt['lost']}, twice {lt['answered_twice']} -> "
          f"{'no request failed' if result['no_request_failed'] else 'REQUESTS FAILED'}")


if __name__ == "__main__":
    app.run(main)
