"""The mesh, item-cache layout and multi-host flags every launcher shares (`settings.MeshSettings`).

Import this module from a launcher before `app.run` (it defines the flags); call `setup()` in `main`
before anything touches JAX: it joins the multi-host job when asked, simulates CPU devices when a
CPU-only machine has fewer devices than `--mesh` needs (and says so), and returns the mesh with the
settings it was built from.
"""

from __future__ import annotations

from absl import flags, logging

from rcllm_jax.settings import MeshSettings, define_flags, read

define_flags(MeshSettings)


def setup():
    """(the `jax.sharding.Mesh` of --mesh, the `MeshSettings`), after joining the job and making
    sure the devices exist."""
    from rcllm_jax.parallel.mesh import make_mesh, parse_mesh, simulate_cpu_devices
    layout = read(MeshSettings)
    spec = parse_mesh(layout.mesh)
    per_process = -(-spec.size // max(1, layout.num_processes))
    note = simulate_cpu_devices(per_process)
    if note:
        logging.info(note)
    if layout.coordinator_address:
        from rcllm_jax.parallel.multihost import initialize
        initialize(layout.coordinator_address, layout.num_processes, layout.process_id)
    elif layout.num_processes != 1:
        raise flags.ValidationError("--num_processes > 1 needs --coordinator_address")
    return make_mesh(spec), layout
