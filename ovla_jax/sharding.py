"""Logical axis names for every parameter and the ONE table mapping them to mesh axes.

Models annotate kernels with the logical names below (``nn.with_logical_partitioning``); nothing else
in the code base names a mesh axis for a parameter. Mesh axes: ``data`` (pure data parallel),
``fsdp`` (data parallel with sharded params/optimizer state), ``tensor`` (Megatron-style).
"""
from __future__ import annotations

# Logical axis names used by the models.
EMBED = "embed"  # model width (residual stream)
MLP = "mlp"  # MLP hidden width
HEADS = "heads"  # query heads * head_dim, flattened
KV_HEADS = "kv_heads"  # key/value heads * head_dim, flattened
QKV = "qkv"  # fused q|k|v output of the ViT attention
VOCAB = "vocab"
PATCH = "patch"  # conv patch-embedding input (h, w, c)
NORM = "norm"  # 1-D scales and biases: replicated
POS = "pos"  # position embedding table length / prefix tokens: replicated
LAYERS = "layers"  # leading axis of scanned (stacked) layer params: never sharded

# Logical axis names of activations (constrained at block boundaries, so GSPMD keeps the batch split over
# the data-parallel axes instead of propagating the params' fsdp sharding onto the hidden dimension).
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"  # the residual stream's width: replicated (params are fsdp-sharded, activations not)
ACT_HEADS = "act_heads"  # attention heads
ACT_MLP = "act_mlp"  # MLP hidden

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or None = replicated). Ordered: the first rule whose mesh axis is still
# free for a given array wins (flax semantics).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (QKV, "tensor"),
    (VOCAB, "tensor"),
    (PATCH, None),
    (NORM, None),
    (POS, None),
    (LAYERS, None),
    # activations
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
)


def activation_rules(mesh):
    """Context under which the models' ``constrain`` calls become sharding constraints (trace the train
    step inside it); outside it they are no-ops (inference, tests on one device)."""
    import contextlib

    import flax.linen as nn
    import jax

    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_AXIS_RULES))
    return stack


def make_mesh(axes: dict | None = None, devices=None):
    """A (data, fsdp, tensor) mesh; sizes from ``axes`` ({"fsdp": -1} by default; -1 = the rest).

    Axis types are Auto (GSPMD-style): jit + NamedSharding code works, including matmuls over a sharded
    contracting dimension, which Explicit axes would reject.
    """
    import math

    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = np.asarray(devices if devices is not None else jax.devices())
    sizes = {name: int((axes or {"fsdp": -1}).get(name, 1)) for name in MESH_AXES}
    unknown = set(axes or {}) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if devices.size % known:
            raise ValueError(f"{devices.size} devices do not divide into mesh {sizes}")
        sizes[rest[0]] = devices.size // known
    if math.prod(sizes.values()) != devices.size:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {devices.size}")
    shape = tuple(sizes.values())
    grid = devices.reshape(shape)
    if devices.flat[0].platform == "tpu":  # place mesh axes along the physical ICI torus
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, list(devices.flat), allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_shardings(boxed_params, mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of ``nn.Partitioned`` (e.g. from ``jax.eval_shape(model.init)``),
    through the one rules table. A dimension that does not divide its mesh axis stays replicated."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    specs = nn.get_partition_spec(boxed_params)
    shapes = jax.tree_util.tree_map(lambda x: x.value.shape if isinstance(x, nn.Partitioned) else x.shape,
                                    boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    mesh_specs = nn.logical_to_mesh(specs, rules)

    def fit(spec, shape):
        axes = []
        for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
            size = 1
            for n in names:
                size *= mesh.shape[n]
            axes.append(axis if axis and dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree_util.tree_map(fit, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh):
    """Examples split over every data-parallel axis (data x fsdp)."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
