"""Which Pallas kernel variants a kernel test runs, and how.

Here (CPU): every variant (`tpu`: Mosaic, `gpu`: Triton) in the Pallas interpreter, so a test id
names its variant. With RCLLM_KERNELS_COMPILED=1 (what `launch/device_check.py` sets on an
accelerator): only the variants of this machine's backend run, compiled; the others are skipped."""

import os

import jax
import pytest

COMPILED = os.environ.get("RCLLM_KERNELS_COMPILED") == "1"


def variants(**kernels):
    """pytest params of kernel functions by variant name (tpu=..., gpu=...)."""
    backend = jax.default_backend()
    return [pytest.param(fn, id=name, marks=pytest.mark.skipif(
        COMPILED and backend != name, reason=f"compiled run on {backend}: the {name} variant does not apply"))
        for name, fn in kernels.items()]


def run(kernel, *args, **kw):
    """The kernel in the interpreter, or compiled where RCLLM_KERNELS_COMPILED=1."""
    return kernel(*args, interpret=not COMPILED, **kw)
