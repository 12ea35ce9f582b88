"""Which JAX backends to try on this host.

With the ``[tpu]`` extra installed (libtpu, for ahead-of-time pod compiles), JAX tries the TPU backend
on every start; on a host without a TPU, libtpu prints errors ("Failed to find host bounds",
INVALID_ARGUMENT about TPU_WORKER_HOSTNAMES) that read like failures although the CPU backend then works.
``quiet_libtpu`` restricts JAX to the CPU on hosts that have neither a TPU nor a GPU plugin, before any
backend starts. An explicit ``JAX_PLATFORMS`` always wins.
"""
from __future__ import annotations

import glob
import importlib.util
import os

_TPU_ENV = ("TPU_NAME", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")  # set on TPU VMs (not TPU_ACCELERATOR_TYPE: AOT compiles set it)
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def has_tpu() -> bool:
    """A TPU chip is attached (``/dev/accel*`` on v2-v5e, ``/dev/vfio/<n>`` on v5p / v6e) or the host
    says it is a TPU VM."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or any(os.environ.get(k) for k in _TPU_ENV))


def has_gpu_plugin() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS)


def quiet_libtpu() -> None:
    """``JAX_PLATFORMS=cpu`` where the only accelerator backend JAX would try is a TPU the host lacks."""
    if "JAX_PLATFORMS" in os.environ or has_tpu() or has_gpu_plugin():
        return
    if importlib.util.find_spec("libtpu") is None:
        return  # no libtpu, no noise: leave JAX's defaults alone
    os.environ["JAX_PLATFORMS"] = "cpu"
