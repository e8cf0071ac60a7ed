"""Multi-host start-up: one process per host, all running the same program (JAX multi-controller).

Every process must make the same calls in the same order (build, restore, rank): the item store's
fetch, replicated writes and snapshot saves are collectives. A request's prefill runs on the
device of its items-shard; the process holding that device broadcasts the answer to the others.
CPU processes talk over gloo (loopback in the tests).
"""

from __future__ import annotations


def initialize(coordinator_address: str, num_processes: int, process_id: int):
    import jax
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} outside 0..{num_processes - 1}")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address must be host:port, got {coordinator_address!r}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return jax.process_index(), jax.process_count()
