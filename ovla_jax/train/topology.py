"""TPU slices by name (``v5p-256``, ``v4-128``, ``v5e-64``, ``v6e-8`` or a raw ``v5p:4x4x8``) -> the
compile-only devices JAX describes for them (``jax.experimental.topologies``, libtpu from the
``[tpu]`` extra): what ahead-of-time compilation targets on a host without TPUs.

Naming, as Cloud TPU's accelerator types: v4 and v5p count TensorCores (2 per chip, which JAX runs as
one "megacore" device per chip), v5e and v6e count chips (one core each). So ``v5p-256`` is 128 chips
(a 4x4x8 torus) and ``v5e-64`` is 64 chips (8x8).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    peak_bf16: float  # FLOP/s per chip (per JAX device)
    hbm_bytes: int  # per chip (per JAX device): what libtpu makes available to a program (its OOM message)
    cores_in_name: int  # TensorCores per chip as counted by the accelerator-type name
    dims: int  # torus dimensions (3 for v4/v5p, 2 for v5e/v6e)
    chip_config: str  # "megacore": both cores of a chip form one device
    hbm_bandwidth: float  # bytes/s per chip (Google's published figure): the roofline's memory side


# HBM: the usable amount libtpu reports ("available HBM") when a compile does not fit (libtpu 0.0.42):
# of the nominal 32 / 96 / 16 / 32 GiB.
CHIPS = {
    "v4": Chip("v4", 275e12, int(30.75 * GIB), 2, 3, "megacore", 1.2e12),
    "v5p": Chip("v5p", 459e12, int(95.74 * GIB), 2, 3, "megacore", 2.765e12),
    "v5e": Chip("v5e", 197e12, int(15.75 * GIB), 1, 2, "default", 8.19e11),
    "v6e": Chip("v6e", 918e12, int(31.25 * GIB), 1, 2, "default", 1.64e12),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"


def _shape_3d(chips: int) -> tuple[int, int, int]:
    """Cloud TPU's slice shapes for v4/v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ..."""
    shape = [1, 1, 1]
    order = (0, 1, 2)
    if chips >= 4:
        shape = [2, 2, 1]
        while math.prod(shape) < chips:
            i = min(order[::-1], key=lambda d: (shape[d], -d))  # grow the smallest dim, last dims first
            shape[i] *= 2
    elif chips == 2:
        shape = [1, 2, 1]
    return tuple(shape)


def _shape_2d(chips: int) -> tuple[int, int]:
    """v5e/v6e slice shapes: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
    if chips == 1:
        return (1, 1)
    side = 2 ** (int(math.log2(chips)) // 2)
    return (side, chips // side)


def parse_slice(name: str) -> Slice:
    """``v5p-256`` / ``v5litepod-16`` / ``v5e-64`` / ``v6e-8`` / ``v4:2x2x2`` -> Slice."""
    raw = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if raw:
        chip = CHIPS[raw.group(1)]
        shape = tuple(int(x) for x in raw.group(2).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"topology {name!r}: {chip.generation} slices have {chip.dims} dimensions")
        return Slice(name, chip, shape)
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise ValueError(f"unknown TPU topology {name!r}: use an accelerator type like v5p-256, v4-128, v5e-64, "
                         f"v6e-8, or a raw topology like v5p:4x4x8 (generations: {', '.join(CHIPS)})")
    chip = CHIPS["v5e" if match.group(1) == "v5litepod" else match.group(1)]
    count = int(match.group(2))
    if count % chip.cores_in_name:
        raise ValueError(f"{name}: {chip.generation} accelerator types count {chip.cores_in_name} cores per chip")
    chips = count // chip.cores_in_name
    if chips & (chips - 1):
        raise ValueError(f"{name}: {chips} chips is not a power of two (Cloud TPU slice sizes are)")
    shape = _shape_3d(chips) if chip.dims == 3 else _shape_2d(chips)
    return Slice(name, chip, shape)


def slice_devices(tpu: Slice):
    """The slice's compile-only TPU devices (one per chip), from libtpu's topology description."""
    import importlib.util

    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # keeps libtpu from probing for local TPUs
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only use never opens a TPU, so several compiles (or one beside a TPU job) may load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("compiling for a TPU slice needs libtpu: pip install -e '.[tpu]' (no TPU needed)")
    from jax.experimental import topologies
    kwargs = dict(chip_config_name=tpu.chip.chip_config, num_slices=1)
    # A host holds up to 2x2x1 chips; a smaller slice (v5e-1, v6e-1, v5e-2, ...) is one host of its own shape.
    kwargs["chips_per_host_bounds"] = (2, 2, 1) if tpu.chips >= 4 else tuple(tpu.shape) + (1,) * (3 - len(tpu.shape))
    if tpu.chip.dims == 3:
        # Slices made of whole 4x4x4 cubes are tori (wraparound links); smaller ones are meshes.
        kwargs["wrap"] = tuple(all(d % 4 == 0 for d in tpu.shape) for _ in tpu.shape)
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology_name, **kwargs)
    except Exception as e:  # a shape or generation this libtpu does not know
        raise RuntimeError(f"cannot describe TPU topology {tpu.topology_name} ({tpu.name}): {e}") from None
    devices = list(topology.devices)
    if len(devices) != tpu.chips:
        raise RuntimeError(f"{tpu.name}: libtpu describes {len(devices)} devices, expected {tpu.chips} chips")
    return devices
