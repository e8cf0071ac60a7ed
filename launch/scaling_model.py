"""Requests/s per device count on paper (`rcllm_jax/eval/scaling.py`), checked against what this machine measures.

python launch/scaling_model.py --runs=docs/benchmarks/serving_items1.json,docs/benchmarks/serving_items2.json,\
docs/benchmarks/serving.json --output_json=docs/benchmarks/scaling_model.json
Reads `launch/bench_serving.py` runs of the batched loop on 1, 2, 4 ... simulated devices. From
the one-device run: a request's host time and device time. Predicts (a) this machine, where the
simulated devices share the CPU cores (device time adds up; remote rows copied at the host's
measured memory bandwidth), and compares with each run's measured requests/s; (b) N real devices
each as fast as this whole CPU, joined by the stated links (`scaling.LINKS`), with each run's
measured remote bytes per request (8 devices, if not run: the 4-device bytes scaled by the remote
fractions of `--locality_json`, a bench_scaling.py run of coaccess + replication + affinity).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_RUNS = flags.DEFINE_list("runs", ["docs/benchmarks/serving_items1.json", "docs/benchmarks/serving_items2.json",
                                   "docs/benchmarks/serving.json"], "bench_serving.py JSON files (batched loop).")
_LOCALITY = flags.DEFINE_string("locality_json", "docs/benchmarks/scaling_retrieved.json",
                                "bench_scaling.py run whose coaccess + affinity rows give remote fractions.")
_DEVICES = flags.DEFINE_list("predict_devices", ["1", "2", "4", "8"], "Device counts of the real-device prediction.")
_OUT = flags.DEFINE_string("output_json", "docs/benchmarks/scaling_model.json", "Where to write the JSON.")


def main(argv):
    del argv
    from rcllm_jax.eval.floor import memory_bandwidth
    from rcllm_jax.eval.scaling import LINKS, requests_per_s
    runs = {}
    for f in _RUNS.value:
        d = json.loads(Path(f).read_text())
        if "batched" not in d["loops"]:
            raise app.UsageError(f"{f} has no batched loop")
        runs[d["config"]["devices"]] = d["loops"]["batched"] | {"file": f}
    if 1 not in runs:
        raise app.UsageError("the model is calibrated on a one-device run (--mesh=items:1)")
    base = runs[1]
    host_s, compute_s = base["host_s_per_request"], base["engine_s_per_request"]
    membw = memory_bandwidth()
    here = []
    for n, r in sorted(runs.items()):
        pred = requests_per_s(n, host_s, compute_s, r["remote_bytes_per_request"], membw, shared_cores=True)
        here.append({"devices": n, "measured_requests_per_s": r["requests_per_s"], "predicted_requests_per_s": pred,
                     "measured_over_predicted": r["requests_per_s"] / pred,
                     "remote_bytes_per_request": r["remote_bytes_per_request"]})
    remote = {n: r["remote_bytes_per_request"] for n, r in runs.items()}
    loc = json.loads(Path(_LOCALITY.value).read_text())["results"] if Path(_LOCALITY.value).exists() else []
    frac = {}
    for r in loc:  # remote fraction of coaccess + the most replication + affinity, per device count
        if r["placement"] == "coaccess" and r["scheduler"] == "affinity":
            if r["devices"] not in frac or r.get("replicate", 0) >= frac[r["devices"]][0]:
                frac[r["devices"]] = (r.get("replicate", 0), 1 - r["local_fraction"])
    real = []
    for n in map(int, _DEVICES.value):
        if n in remote:
            b, how = remote[n], "measured"
        elif 4 in remote and n in frac and 4 in frac and frac[4][1] > 0:
            b, how = remote[4] * frac[n][1] / frac[4][1], "4-device bytes x remote-fraction ratio"
        else:
            continue
        row = {"devices": n, "remote_bytes_per_request": b, "remote_bytes_from": how}
        for link, bw in LINKS.items():
            row[f"requests_per_s_{link}"] = requests_per_s(n, host_s, compute_s, b, bw)
        row["host_bound"] = compute_s / n < host_s
        real.append(row)
    result = {"config": {"runs": [r["file"] for r in runs.values()], "host_s_per_request": host_s,
                         "device_s_per_request": compute_s, "host_memory_bandwidth": membw, "links": LINKS,
                         "model": "SmolLM2-135M-Instruct"},
              "this_machine": here, "real_devices": real}
    print(f"calibration (1 device): host {host_s * 1e3:.1f} ms + device {compute_s * 1e3:.1f} ms per request")
    print(f"{'devices':>7} {'measured req/s':>15} {'predicted':>10} {'ratio':>6}   (this machine, shared cores)")
    for r in here:
        print(f"{r['devices']:7d} {r['measured_requests_per_s']:15.2f} {r['predicted_requests_per_s']:10.2f} "
              f"{r['measured_over_predicted']:6.2f}")
    print(f"{'devices':>7} " + " ".join(f"{k + ' req/s':>16}" for k in LINKS) + "   (real devices, each this fast)")
    for r in real:
        print(f"{r['devices']:7d} " + " ".join(f"{r[f'requests_per_s_{k}']:16.2f}" for k in LINKS)
              + ("  host-bound" if r["host_bound"] else ""))
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
