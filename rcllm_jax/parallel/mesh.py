"""`--mesh=items:N[,model:M]`: parsed here and nowhere else, plus the one table of named shardings.

Axes: `items` shards the item KV store (each items-shard is one row of the mesh that serves a
request on its own: weights, the user store and glue are replicated along `items`); `model` is
the tensor-parallel axis inside a row: query and KV heads and the MLP's intermediate dim of the
weights (`weight_shardings`), and the KV heads of the block store and of the pool, are split over it.
A request on items-shard s runs on row s (`row_view`: a global array's part held by the row, as an
array over the row's own (1, M) mesh), its programs partitioned by XLA over the row's M devices
(GSPMD: the partial sums of the output and down projections are all-reduced). model:1 keeps
every per-shard array on the row's one device (`shard_view`), as before tensor parallelism.
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
    [L, slots, K]; the KV pool [L, slots, K, H]; a serving step's per-request arrays [N x B, ...]
    (N items-shards of B requests) and its cached rows [L, N x B, T, K, H]; a collective fetch's
    rows [N, L, T, K, H] (one per items-shard); a build pass's packed rows [N x rows, ...]. The
    weights' specs: `weight_shardings`."""
    from jax.sharding import PartitionSpec as P
    return {
        "block_store": P(None, "items", "model", None),  # slots along items, kv heads along model
        "block_scales": P(None, "items", "model"),  # an int8 store's scale per token and KV head
        "replicated": P(),  # small arrays every device needs (tables, a step's scalars)
        "kv_pool": P(None, None, "model", None),  # the KV pool [L, slots, K, H] (user store, prefix cache):
        #                                           on every items-shard, its KV heads along model
        "per_shard": P("items"),  # one leading row block per items-shard: step inputs and outputs,
        #                           a build pass's rows
        "step_rows": P(None, "items"),  # a serving step's cached rows: the batch axis after the layers
        "step_rows_split": P(None, "items", None, "model", None),  # the same on model > 1: KV heads split
        "fetched": P("items", None, None, "model", None),  # a collective fetch's rows [N, L, T, K, H]: one
        #                                                     per items-shard, its KV heads along model
        # the weights (`weight_shardings` picks by name), whole along items, split along model:
        "weight_columns": P(None, None, "model"),  # wq, wk, wv, w_gate, w_up [L, D, out]: heads / MLP features
        "weight_rows": P(None, "model", None),  # wo, w_down [L, in, D]: their partial sums all-reduced
        "weight_bias": P(None, "model"),  # bq, bk, bv [L, out]
        "embed": P("model", None),  # [V, D]: the vocabulary
        "lm_head": P(None, "model"),  # [D, V]: the vocabulary
    }


# Weights split over `model` (Megatron-style): parameter name -> its entry of the table; every other
# weight (norms) is whole on every device.
_WEIGHT_SPECS = {"wq": "weight_columns", "wk": "weight_columns", "wv": "weight_columns", "w_gate": "weight_columns",
                 "w_up": "weight_columns", "wo": "weight_rows", "w_down": "weight_rows", "bq": "weight_bias",
                 "bk": "weight_bias", "bv": "weight_bias", "embed": "embed", "lm_head": "lm_head"}


def check_model_axis(cfg, model: int) -> None:
    """Refuse a `model` axis that does not split the heads whole: it must divide the KV heads (and
    so the query heads, a multiple of them)."""
    if cfg.num_kv_heads % model:
        raise MeshError(f"model:{model} does not divide the model's {cfg.num_kv_heads} KV heads "
                        f"({cfg.num_heads} query heads): use a model axis that divides {cfg.num_kv_heads}")


def weight_shardings(params, mesh):
    """NamedShardings of a parameter tree on `mesh`, tensor-parallel over `model`: query/KV heads,
    the MLP's intermediate dim and the vocabulary split (a dim that `model` does not divide, e.g.
    an odd vocabulary, stays whole); norms and any other leaf whole. Every leaf is whole along
    `items`."""
    import jax
    from jax.sharding import NamedSharding
    table, model = partition_specs(), mesh.shape["model"]

    def spec(path, a):
        entry = _WEIGHT_SPECS.get(getattr(path[-1], "key", None))
        p = table[entry] if entry is not None and model > 1 else table["replicated"]
        if any(e == "model" and n % model for e, n in zip(p, a.shape)):
            p = table["replicated"]
        return NamedSharding(mesh, p)
    return jax.tree_util.tree_map_with_path(spec, params)


def row_mesh(mesh, shard: int):
    """Items-shard `shard`'s row of the mesh as a (1, model) mesh of its own (the same axis names)."""
    import jax
    return jax.sharding.Mesh(mesh.devices[shard:shard + 1], AXES)


def row_view(a, mesh, shard: int):
    """The part of global array `a` (NamedSharding on `mesh`) that items-shard `shard`'s row holds,
    as an array over `row_mesh` with the same spec (a dim split along `items` shrinks to the row's
    part); nothing moves. None where this process does not hold the row."""
    import jax
    pieces = {s.device: s.data for s in a.addressable_shards}
    devs = list(mesh.devices[shard])
    if any(d not in pieces for d in devs):
        return None
    spec = a.sharding.spec
    split = [("items" in (e if isinstance(e, tuple) else (e,))) for e in tuple(spec) + (None,) * (a.ndim - len(spec))]
    shape = tuple(n // mesh.shape["items"] if on else n for n, on in zip(a.shape, split))
    return jax.make_array_from_single_device_arrays(shape, jax.sharding.NamedSharding(row_mesh(mesh, shard), spec),
                                                    [pieces[d] for d in devs])


def shard_view(a, mesh, shard: int):
    """What a request on items-shard `shard` reads of global array `a`: on model:1 the part on the
    row's one device (a single-device array), else `row_view`. None where this process lacks it."""
    if mesh.shape["model"] == 1:
        return on_device(a, mesh.devices[shard, 0])
    return row_view(a, mesh, shard)


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
