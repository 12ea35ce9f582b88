"""Weight-only quantization: every Dense kernel [in, out] (the towers' and the LLM's linear layers, the
projector, the heads, the LM head; stacked [L, in, out] under scanned layers) stored in 8 or 4 bits;
convolutions, embeddings and norms stay as they are. Inference (``OpenVLAPolicy(quantize=...)``) and
QLoRA-style training (``config.frozen_quantize``) both use it. A quantized kernel is dequantized by the
:class:`~ovla_jax.models.layers.Dense` that uses it, inside the jitted call and (scanned layers) inside
the layer body, so one layer's kernels exist in full precision at a time: the memory saved is the
stored weights' (7B: 7.95 GB in int8, 4.50 GB in int4, instead of 15 GB in bf16).

- ``int8``: symmetric per output channel, ``scale = max|w| / 127`` over the input axis,
  ``q = round(w / scale)``: each weight is off by at most half a step (``scale / 2``).
- ``int4``: symmetric per group of ``INT4_GROUP`` consecutive input rows and output channel,
  ``scale = max|w| / 7`` over the group, two 4-bit values packed per byte (rows 2i and 2i + 1), so the
  memory is really half a byte per weight on every backend. Small groups keep the error local: one
  outlier weight coarsens only its own group's 16 levels.

Leading axes (a stack of layers) are kept: each layer gets its own scales, exactly as if it were
quantized alone.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8", "int4")
INT4_GROUP = 128  # input rows sharing one int4 scale (per output channel)
STACKS = ("blocks", "layers")  # containers of scanned layers (ovla_jax.models.scan.STACKS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    values: jax.Array  # int8[..., in, out]
    scale: jax.Array  # float32[..., out]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


@dataclasses.dataclass
class Int4Weight:
    packed: jax.Array  # uint8[..., in // 2, out]: row 2i in the low nibble, row 2i + 1 in the high one
    scale: jax.Array  # float32[..., in // group, out]
    group: int  # static: rows per scale

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        *lead, half, out = self.packed.shape
        return (*lead, 2 * half, out)


jax.tree_util.register_dataclass(Int4Weight, data_fields=["packed", "scale"], meta_fields=["group"])
QUANTIZED = (Int8Weight, Int4Weight)


def is_quantized(x) -> bool:
    return isinstance(x, QUANTIZED)


def _key_name(part) -> str:
    return getattr(part, "key", getattr(part, "name", part))


def is_dense_kernel(path, leaf) -> bool:
    """A Dense kernel: leaf ``kernel`` of rank 2, or rank 3 inside a scanned stack (``blocks`` / ``layers``).
    ``path``: a tuple of names or a jax key path. The patch embedding's HWIO kernel (rank 4) is not one."""
    names = [_key_name(p) for p in path]
    rank = 3 if any(n in STACKS for n in names) else 2
    return bool(names) and names[-1] == "kernel" and getattr(leaf, "ndim", len(getattr(leaf, "shape", ()))) == rank


def quantize_weight(w) -> Int8Weight:
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / safe[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale.astype(jnp.float32))


def int4_group(rows: int, group: int = INT4_GROUP) -> int:
    """The group size for a kernel with ``rows`` input rows: ``group`` when it divides them, else their
    largest common even divisor (e.g. SigLIP's 4304-row fc2 gets groups of 16); 0 = cannot pack (odd)."""
    g = math.gcd(rows, group)
    return g if g % 2 == 0 else 0


def quantize_weight_int4(w, group: int = INT4_GROUP) -> Int4Weight:
    w = jnp.asarray(w, jnp.float32)
    *lead, rows, cols = w.shape
    g = int4_group(rows, group)
    if not g:
        raise ValueError(f"int4 packs two rows per byte: a kernel with {rows} input rows cannot be packed")
    grouped = w.reshape(*lead, rows // g, g, cols)
    scale = jnp.max(jnp.abs(grouped), axis=-2) / 7.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(grouped / safe[..., None, :]), -7, 7).astype(jnp.int8).reshape(*lead, rows, cols)
    nibbles = q.astype(jnp.uint8) & 0xF
    packed = nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)
    return Int4Weight(packed, scale.astype(jnp.float32), g)


def _unpack_int4(x: Int4Weight) -> jax.Array:
    """-> float32[..., in, out] = q * scale."""
    def signed(n):  # 4-bit two's complement -> int8
        return (n.astype(jnp.int8) ^ 8) - 8
    *lead, half, cols = x.packed.shape
    low, high = signed(x.packed & 0xF), signed(x.packed >> 4)
    q = jnp.stack([low, high], axis=-2).reshape(*lead, 2 * half, cols).astype(jnp.float32)
    rows = 2 * half
    return (q.reshape(*lead, rows // x.group, x.group, cols) * x.scale[..., None, :]).reshape(*lead, rows, cols)


def quantize_leaf(x, mode: str):
    """One Dense kernel -> its quantized form (int4 leaves a kernel with an odd number of rows as it is)."""
    if mode == "int8":
        return quantize_weight(x)
    if mode == "int4":
        return quantize_weight_int4(x) if int4_group(x.shape[-2]) else x
    raise ValueError(f"quantize {mode!r}: choose from {MODES[1:]}")


def quantize_params(params, mode: str = "int8", where=None):
    """params -> the same tree with every Dense kernel an :class:`Int8Weight` or :class:`Int4Weight`
    (``mode`` "none": unchanged). ``where(path)`` (a tuple of names), when given, picks which kernels
    (training quantizes only the frozen ones). Works on abstract params too (``jax.eval_shape``), which
    is how the 7B model's size is checked."""
    if mode not in MODES:
        raise ValueError(f"quantize {mode!r}: choose from {MODES}")
    if mode == "none":
        return params

    def one(path, x):
        if not is_dense_kernel(path, x) or (where is not None and not where(tuple(_key_name(p) for p in path))):
            return x
        return quantize_leaf(x, mode)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_weight(x, dtype=jnp.float32):
    """A quantized kernel -> the dense kernel of ``dtype``; anything else is returned as is."""
    if isinstance(x, Int8Weight):
        return (x.values.astype(jnp.float32) * x.scale[..., None, :]).astype(dtype)
    if isinstance(x, Int4Weight):
        return _unpack_int4(x).astype(dtype)
    return x


def dequantize(params, dtype=jnp.float32):
    """Quantized leaves -> dense kernels of ``dtype`` (tests and export; the models dequantize each kernel
    where they use it)."""
    return jax.tree.map(lambda x: dequantize_weight(x, dtype), params, is_leaf=is_quantized)


def column_slice(x, start: int, stop: int):
    """Output columns ``start:stop`` of a quantized kernel, still quantized (every part ends with the
    output axis)."""
    return jax.tree.map(lambda a: a[..., start:stop], x)


def sharding_like_kernel(kernel_sharding, leaf):
    """Shardings for a quantized leaf whose dense kernel would take ``kernel_sharding`` (a NamedSharding):
    int8 values as the kernel, scales as its output axis; int4's packed rows and group scales keep the
    kernel's input-axis sharding where their (halved / grouped) row count still divides it."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = kernel_sharding.mesh
    spec = tuple(kernel_sharding.spec) + (None,) * (len(leaf.kernel_shape) - len(kernel_sharding.spec))

    def fit(shape, axes):
        out = []
        for dim, axis in zip(shape, axes):
            names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
            size = math.prod(mesh.shape[n] for n in names)
            out.append(axis if axis and dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*out))

    if isinstance(leaf, Int8Weight):
        return Int8Weight(fit(leaf.values.shape, spec), fit(leaf.scale.shape, spec[:-2] + spec[-1:]))
    return Int4Weight(fit(leaf.packed.shape, spec), fit(leaf.scale.shape, spec), leaf.group)


def nbytes(params) -> int:
    """Bytes the (possibly abstract) params take."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))
