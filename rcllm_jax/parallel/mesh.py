"""`--mesh=items:N[,model:M]`: parsed here and nowhere else, plus the one table of named shardings.

Axes: `items` shards the item KV store (each items-shard is one device row that can serve a
request on its own: weights, the user store and glue are replicated along it); `model` is the
tensor-parallel axis: parsed and carried by the table, refused by the engine (model:1 only today).
"""

from __future__ import annotations

import dataclasses
import os

AXES = ("items", "model")


class MeshError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    items: int = 1
    model: int = 1

    @property
    def size(self) -> int:
        return self.items * self.model

    def __str__(self) -> str:
        return f"items:{self.items}" + (f",model:{self.model}" if self.model != 1 else "")


def parse_mesh(text: str | None) -> MeshSpec:
    """'items:4' / 'items:4,model:2' / '' (= items:1) -> MeshSpec; any other text is refused."""
    if text is None or not text.strip():
        return MeshSpec()
    sizes = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in AXES:
            raise MeshError(f"bad mesh axis {part.strip()!r} in --mesh={text!r}: expected items:N[,model:M]")
        if name in sizes:
            raise MeshError(f"mesh axis {name!r} given twice in --mesh={text!r}")
        try:
            n = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name!r} needs a positive integer size, got {value!r}") from None
        if n < 1:
            raise MeshError(f"mesh axis {name!r} needs a positive integer size, got {n}")
        sizes[name] = n
    return MeshSpec(**sizes)


def simulate_cpu_devices(n: int) -> str | None:
    """Before JAX starts its backends: if this machine has no accelerator, ask for `n` CPU devices
    (so `--mesh=items:4` works on a laptop). Returns a log line saying so, or None when nothing
    was changed. Must run before the first JAX computation."""
    import jax
    if os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu") or _has_accelerator():
        return None
    current = int(os.environ.get("JAX_NUM_CPU_DEVICES", "1") or 1)
    if current >= n:
        return None
    jax.config.update("jax_num_cpu_devices", n)
    os.environ["JAX_NUM_CPU_DEVICES"] = str(n)
    return f"no accelerator found: simulating {n} CPU devices for the mesh (JAX_NUM_CPU_DEVICES={n})"


def _has_accelerator() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def make_mesh(spec: MeshSpec, devices=None):
    """A `jax.sharding.Mesh` of shape (items, model) over the first spec.size devices (all
    processes' devices in a multi-host run), refusing a mesh larger than what exists."""
    import jax
    import numpy as np
    devices = list(jax.devices() if devices is None else devices)
    if spec.size > len(devices):
        raise MeshError(f"--mesh={spec} needs {spec.size} devices; {len(devices)} available "
                        f"({devices[0].platform}); on CPU set JAX_NUM_CPU_DEVICES={spec.size} before JAX starts")
    return jax.sharding.Mesh(np.asarray(devices[:spec.size]).reshape(spec.items, spec.model), AXES)


# The one table of named shardings: every array the engine places on a mesh.
def partition_specs():
    """{name: PartitionSpec}. Shapes: the block store's KV [L, slots, K, H] and its int8 scales
    [L, slots, K]; a serving step's per-request arrays [N x B, ...] (N items-shards of B requests)
    and its cached rows [L, N x B, T, K, H]; a fetch's rows [N, ...] (one per items-shard); a build
    pass's packed rows [N x rows, ...]."""
    from jax.sharding import PartitionSpec as P
    return {
        "block_store": P(None, "items", "model", None),  # slots along items, kv heads along model
        "block_scales": P(None, "items", "model"),  # an int8 store's scale per token and KV head
        "replicated": P(),  # weights, the KV pool (user store, prefix cache): on every device
        "per_shard": P("items"),  # one leading row block per items-shard: step inputs and outputs,
        #                           fetched rows, a build pass's rows
        "step_rows": P(None, "items"),  # a serving step's cached rows: the batch axis after the layers
    }


def shardings(mesh):
    """Named shardings of the table on `mesh`."""
    from jax.sharding import NamedSharding
    return {name: NamedSharding(mesh, spec) for name, spec in partition_specs().items()}


def on_device(a, device):
    """The part of global array `a` that `device` holds (its shard's data), or None where this
    process does not hold `device`."""
    return next((s.data for s in a.addressable_shards if s.device == device), None)


def by_device(a) -> dict:
    """{device: the part of global array `a` it holds} over this process's devices."""
    return {s.device: s.data for s in a.addressable_shards}
