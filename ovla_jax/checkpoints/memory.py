"""Will the weights fit? Checked before the first tensor is read, so a load that cannot succeed stops at
once with the memory it needs, instead of minutes later in the kernel's OOM killer.

CPU devices share the host's memory (``MemAvailable``, capped by the cgroup limit a container runs
under); accelerators report their own (``device.memory_stats()``). Set ``OVLA_JAX_SKIP_MEMORY_CHECK=1``
to load anyway (e.g. with swap the check does not count).
"""
from __future__ import annotations

import os
from typing import Optional

from ovla_jax.checkpoints.errors import CheckpointError

GIB = 1024 ** 3
SKIP_ENV = "OVLA_JAX_SKIP_MEMORY_CHECK"


class InsufficientMemory(CheckpointError):
    """The weights, in the form asked for, do not fit where they are to be placed."""


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> Optional[int]:
    """Memory a new allocation can take without swapping: ``MemAvailable``, and no more than the cgroup
    (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) leaves. None when the system does not say."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            room = max(limit - usage, 0)
            available = room if available is None else min(available, room)
            break
    return available


def device_available_bytes(device) -> Optional[int]:
    """Free memory of one accelerator (its allocator's limit minus what is in use), or None."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def check_fits(per_device: dict, transient: int, what: str, hint: str = "") -> None:
    """Raise :class:`InsufficientMemory` when ``per_device`` ({device: bytes}) plus ``transient`` bytes of
    host staging do not fit. CPU devices are summed against the host's available memory."""
    if os.environ.get(SKIP_ENV):
        return
    cpu = sum(n for d, n in per_device.items() if d.platform == "cpu")
    checks = []
    if cpu or transient:
        checks.append(("this host", cpu + transient, host_available_bytes()))
    for device, n in per_device.items():
        if device.platform != "cpu":
            checks.append((f"device {device}", n, device_available_bytes(device)))
    for where, need, available in checks:
        if available is not None and need > available:
            raise InsufficientMemory(
                f"{what} need {need / GIB:.2f} GiB on {where} (the weights in their final form + "
                f"{transient / GIB:.2f} GiB for the largest tensor while it is converted), which has "
                f"{available / GIB:.2f} GiB available{hint}. (Set {SKIP_ENV}=1 to try anyway.)")
