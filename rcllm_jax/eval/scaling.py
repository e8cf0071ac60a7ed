"""Throughput per device count, on paper: what a serving loop would do on N real devices, from what
one run measured (`launch/bench_serving.py`).

A request costs
  host_s     the engine loop's host work (validation, retrieval, prompt, layout, scheduling,
             scores): one thread, does not scale with devices;
  compute_s  device time of its blended prefill (its share of a serving step);
  fetch_s    remote_bytes / link bandwidth: its remote cached rows crossing between devices
             (not overlapped with compute: the conservative case).
On N devices with concurrent shards the devices share the request stream and the host feeds them
all: requests/s = 1 / max(host_s, (compute_s + fetch_s) / N).
On simulated devices (one CPU's cores shared by every "device", this machine) device time adds
up instead: requests/s = 1 / (host_s + compute_s + fetch_s), fetch_s at the host's copy bandwidth.
"""

from __future__ import annotations

# Stated link bandwidths (one direction, bytes/s): NVLink 4 on H100 SXM (900 GB/s both
# directions), PCIe Gen5 x16 (~64 GB/s).
LINKS = {"nvlink4": 450e9, "pcie5_x16": 64e9}


def requests_per_s(devices: int, host_s: float, compute_s: float, remote_bytes: float, link_bytes_per_s: float,
                   shared_cores: bool = False) -> float:
    """Predicted requests/s of `devices` items-shards serving concurrently (module docstring)."""
    if devices < 1 or min(host_s, compute_s, remote_bytes) < 0 or link_bytes_per_s <= 0:
        raise ValueError("devices >= 1, non-negative costs and a positive bandwidth")
    device_s = compute_s + remote_bytes / link_bytes_per_s
    if shared_cores:
        return 1.0 / (host_s + device_s)
    return 1.0 / max(host_s, device_s / devices)
