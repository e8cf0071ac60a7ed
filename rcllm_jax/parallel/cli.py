"""The mesh, item-cache layout and multi-host flags every launcher shares (absl), defined once here.

Import this module from a launcher before `app.run`; call `setup()` in `main` before anything
touches JAX: it joins the multi-host job when asked, simulates CPU devices when a CPU-only machine
has fewer devices than `--mesh` needs (and says so), and returns the mesh.
"""

from __future__ import annotations

from absl import flags, logging

from rcllm_jax.parallel.placement import PLACEMENTS

MESH = flags.DEFINE_string("mesh", "items:1", "Device mesh: items:N[,model:M] (item caches sharded over items).")
PLACEMENT = flags.DEFINE_enum("placement", "coaccess", list(PLACEMENTS),
                              "Item block placement over the items axis: coaccess (METIS partition of the "
                              "retriever's item co-access graph), similarity (balanced k-means of the model's "
                              "item embeddings) or hash (baseline).")
REPLICATE = flags.DEFINE_float("replicate", 0.1, "Hot-item replication: up to this fraction of a shard's item "
                               "tokens more per shard for the items requests would fetch remotely most "
                               "(held by every shard; 0 = off).", lower_bound=0.0, upper_bound=1.0)
KV_DTYPE = flags.DEFINE_enum("kv_dtype", "bfloat16", ["bfloat16", "float32", "int8"], "How the item and glue "
                             "caches hold KV (read back into the model's dtype per request): bfloat16 halves their "
                             "memory and the bytes moved between shards; int8 (a scale per token and KV head) "
                             "about quarters them.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                                  "(with --num_processes and --process_id; omit for one process).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")


def setup():
    """Join the job, make sure the devices exist, return the `jax.sharding.Mesh` of --mesh."""
    from rcllm_jax.parallel.mesh import make_mesh, parse_mesh, simulate_cpu_devices
    spec = parse_mesh(MESH.value)
    per_process = -(-spec.size // max(1, NUM_PROCESSES.value))
    note = simulate_cpu_devices(per_process)
    if note:
        logging.info(note)
    if COORDINATOR.value:
        from rcllm_jax.parallel.multihost import initialize
        initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    elif NUM_PROCESSES.value != 1:
        raise flags.ValidationError("--num_processes > 1 needs --coordinator_address")
    return make_mesh(spec)
