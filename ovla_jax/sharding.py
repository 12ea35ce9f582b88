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
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
)
