"""Initialization schemes for models trained from scratch.

The modules initialize like the official checkpoints' configs (transformers' ``initializer_range``):
every dense kernel and the token embeddings ~ normal(0.02). That suits 4096-wide layers (about
1.3 / sqrt(width)) and never matters for the 7B, which starts from trained weights. In the demo's
32-64-wide models it starts every layer ~6-8x smaller than its fan-in scale and the token embeddings
~50x smaller than the patch features, so the colour word reaches FiLM and the LLM as a tiny signal.
The ViTs' learned position embeddings (normal(0.02), as timm's DINOv2) sit ~50x below the unit-scale
patch features too, and they are the only place a patch's token says *where* it is (RoPE reaches the
LLM's queries and keys, not the values it reads out), so the policy cannot say which way to move until
training has grown them: the demo's OFT policy sat at the median x / y action for ~300 of its 1200 steps.
In single runs of that policy (1200 steps, see the README), ``fan_in`` without the positions gave 36%
success against 15% at lr 1e-3 and 62% at lr 2e-3; with them rescaled too, the plateau ended by step
200 and the policy got 98%.

Schemes rescale a fresh init; they do not draw new numbers. A normal(0.02) sample times c is a
normal(0.02 c) sample, so ``fan_in`` gives dense kernels ~ normal(1 / sqrt(fan_in)) (LeCun normal),
token and position embeddings ~ normal(1), with the same random stream as ``hf``.
"""
from __future__ import annotations

import flax

HF_STD = 0.02  # what the modules draw (ovla_jax.models.layers.DEFAULT_KERNEL_INIT, the LLM's embeddings)
SCHEMES = ("hf", "fan_in")
EMBEDDINGS = ("embedding", "pos_embed")  # the LLM's token table (nn.Embed) and each ViT's positions


def _is_dense_kernel(path: tuple) -> bool:
    # Dense kernels are [in, out] (stacked [L, in, out] under scanned layers). The patch embedding's HWIO
    # kernel is LeCun-initialized already; LoRA factors are named lora_a / lora_b and keep their init.
    return path[-1] == "kernel" and "patch_embed" not in path


def rescale_init(params, scheme: str = "hf"):
    """Fresh params (as ``model.init`` returns them, unboxed) -> params under ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose from {SCHEMES}")
    if scheme == "hf":
        return params
    flat = flax.traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if _is_dense_kernel(path) and value.ndim >= 2:
            value = value * (value.shape[-2] ** -0.5 / HF_STD)
        elif path[-1] in EMBEDDINGS:
            value = value * (1.0 / HF_STD)
        out[path] = value
    return flax.traverse_util.unflatten_dict(out)
