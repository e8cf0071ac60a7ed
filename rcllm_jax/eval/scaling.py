"""Throughput and memory per device, on paper: what a serving loop would do on N real devices, from
what one run measured (`launch/bench_serving.py`), and what each device of an items x model mesh
holds (`memory_per_device`, `launch/memory_plan.py`).

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


# Memory per device as the vendors state it (GB = 1e9 bytes). What a program can use is less: XLA's
# GPU client preallocates 75% by default (XLA_PYTHON_CLIENT_MEM_FRACTION) and every runtime keeps some.
DEVICE_GB = {"H100 80GB": 80.0, "H200": 141.0, "TPU v5e": 16.0, "TPU v5p": 95.0}


def kv_share(cfg, model: int) -> float:
    """The fraction of a token's KV heads one device of a `model`-way tensor-parallel group holds:
    1/model; `model` must divide the KV heads, as the engine requires (`mesh.check_model_axis`)."""
    if cfg.num_kv_heads % model:
        raise ValueError(f"model:{model} does not divide the {cfg.num_kv_heads} KV heads")
    return 1.0 / model


def memory_per_device(cfg, items: int, model: int, *, catalog_tokens: int, users: int, user_tokens: int,
                      weight_dtype: str = "bfloat16", kv_dtype: str = "bfloat16", replicate: float = 0.0) -> dict:
    """Bytes one device of an items:N,model:M mesh holds: the weights (query/output heads, the MLP,
    the vocabulary and the KV projections split M ways, norms whole), its part of the item
    cache (the catalog's item tokens, + the hot-item replication budget, over the N items-shards and
    its KV heads) and of the user store (every user's history prefix on every items-shard, its KV
    heads). Activations and the runtime's own reserve are not counted."""
    import numpy as np
    from rcllm_jax.model.config import kv_bytes_per_token, param_counts
    if cfg.num_heads % model:
        raise ValueError(f"model:{model} does not divide the {cfg.num_heads} query heads")
    share = kv_share(cfg, model)
    p = param_counts(cfg)
    wb = np.dtype(weight_dtype).itemsize
    weights = wb * ((p["heads"] + p["mlp"] + p["vocab"] + p["kv_heads"]) / model + p["replicated"])
    bpt = kv_bytes_per_token(cfg, kv_dtype)
    item_cache = catalog_tokens * (1 + replicate) * bpt * share / items
    user_store = users * user_tokens * bpt * share
    return {"weights": weights, "item_cache": item_cache, "user_store": user_store,
            "total": weights + item_cache + user_store, "kv_bytes_per_token": bpt}


def smallest_mesh(cfg, device_gb: float, *, headroom: float = 0.9, max_devices: int = 256, **kw) -> tuple | None:
    """The items:N,model:M mesh of fewest devices (then the smallest M) whose every device holds
    `memory_per_device(...)` within `headroom` of `device_gb`; M over the divisors of the KV heads;
    None if none within max_devices."""
    best = None
    for m in [m for m in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % m == 0]:
        for n in range(1, max_devices // m + 1):
            if memory_per_device(cfg, n, m, **kw)["total"] <= headroom * device_gb * 1e9:
                if best is None or (n * m, m) < (best[0] * best[1], best[1]):
                    best = (n, m)
                break
    return best
