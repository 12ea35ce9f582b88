"""Scanned layers: a tower's blocks / the LLM's layers run as one ``nn.scan`` over params stacked on a
leading layer axis, instead of N unrolled copies.

Why: XLA compiles one layer body instead of 24 + 27 + 32, so compile time of the 7B step drops several
fold, and the program (and its memory plan) is the same at any depth. Numerics are the unrolled ones.

Layouts: unrolled params are ``.../blocks_3/attn/qkv/kernel`` (per-layer names, as every checkpoint
stores them); scanned params are ``.../blocks/attn/qkv/kernel`` with shape ``[depth, ...]``. The
logical axis of the stack is ``layers``, which the rules table leaves unsharded. This module is the one
place that maps between the two layouts; checkpoints always hold per-layer names.
"""
from __future__ import annotations

import re
from typing import Optional

import flax.linen as nn
import numpy as np
from flax import traverse_util

from ovla_jax import sharding as ax
from ovla_jax.models.remat import POLICIES

# Module-name stems of the per-layer containers that scan stacks: ViT ``blocks_i``, Llama ``layers_i``.
STACKS = ("blocks", "layers")
_PER_LAYER = re.compile(r"^(%s)_(\d+)$" % "|".join(STACKS))


def scanned(module_cls, *, length: int, remat: str, in_axes=0):
    """``module_cls`` (whose ``__call__(carry, *xs)`` returns ``(carry, ys)``) scanned ``length`` times,
    params stacked on axis 0 (logical name ``layers``), rngs split per layer, remat inside the body."""
    if remat not in POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(POLICIES)}")
    body = module_cls if remat == "none" else nn.remat(module_cls, policy=POLICIES[remat], prevent_cse=False)
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: ax.LAYERS})


def layer_of(path: tuple) -> Optional[tuple[tuple, int]]:
    """Per-layer path -> (scanned path, layer index), or None for a param outside any stack.
    ``(..., "layers_5", "mlp", "up_proj", "kernel")`` -> ``((..., "layers", "mlp", "up_proj", "kernel"), 5)``."""
    for i, part in enumerate(path):
        match = _PER_LAYER.match(part)
        if match:
            return path[:i] + (match.group(1),) + path[i + 1:], int(match.group(2))
    return None


def is_scanned(params) -> bool:
    """Whether a params tree is in the scanned layout (a bare ``blocks`` / ``layers`` container)."""
    return any(part in STACKS for path in traverse_util.flatten_dict(params) for part in path)


def stack_layers(params):
    """Per-layer params -> scanned layout (numpy or jax arrays; stacks built with the arrays' own module).
    Layers of one stack must be numbered 0..N-1 with no gap."""
    flat = traverse_util.flatten_dict(params)
    out, groups = {}, {}
    for path, value in flat.items():
        found = layer_of(path)
        if found is None:
            out[path] = value
        else:
            groups.setdefault(found[0], {})[found[1]] = value
    for path, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{'/'.join(path)}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
        values = [layers[i] for i in range(len(layers))]
        xp = np if isinstance(values[0], np.ndarray) else _jnp()
        out[path] = xp.stack(values)
    return traverse_util.unflatten_dict(out)


def unstack_layers(params):
    """Scanned params -> per-layer layout (each layer a view/slice of its stack)."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        stack = next((i for i, part in enumerate(path) if part in STACKS), None)
        if stack is None:
            out[path] = value
            continue
        for layer in range(value.shape[0]):
            out[path[:stack] + (f"{path[stack]}_{layer}",) + path[stack + 1:]] = value[layer]
    return traverse_util.unflatten_dict(out)


def _jnp():
    import jax.numpy as jnp

    return jnp
