"""Frozen parameters in low precision (LoRA, QLoRA and the frozen fine-tuning modes).

A frozen parameter is only ever read: cast to the compute dtype and used as a matmul operand. So it is
stored in that dtype (``frozen_dtype``; bf16 when the step computes in bf16, as upstream trains LoRA on
a bf16 base) or, for Dense kernels, quantized to int8 / int4 (``frozen_quantize``, QLoRA-style, with
``ovla_jax.quantize``); each :class:`~ovla_jax.models.layers.Dense` dequantizes its kernel next to its
matmul, inside the scanned layer body, so one layer's kernels exist in full precision at a time.
Trainable parameters (adapters, OFT heads, the proprio projector, FiLM) and their optimizer state stay
fp32. The step differentiates only the trainable subtree (:func:`partition`): frozen weights get no
gradient, no optimizer state and no update, and pass through the step unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from ovla_jax import quantize as Q

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class FrozenForm:
    """How frozen params are stored: ``dtype`` for floats (None = as created / loaded), ``quantize``
    (``none | int8 | int4``) for Dense kernels."""

    dtype: Optional[str] = None
    quantize: str = "none"

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"frozen_dtype {self.dtype!r}: choose from {DTYPES}")
        if self.quantize not in Q.MODES:
            raise ValueError(f"frozen_quantize {self.quantize!r}: choose from {Q.MODES}")


def _flat_mask(params, mask) -> dict:
    flat = traverse_util.flatten_dict(params)
    if mask is None:
        return {p: True for p in flat}
    flat_mask = traverse_util.flatten_dict(mask)
    return {p: bool(flat_mask[p]) for p in flat}


def partition(params, mask):
    """params -> (trainable subtree, frozen subtree) by ``mask`` (a tree of bools like the params, None =
    all train). Quantized leaves sit where their kernel would and go with it."""
    flat = traverse_util.flatten_dict(params)
    trains = _flat_mask(params, mask)
    trainable = {p: v for p, v in flat.items() if trains[p]}
    frozen = {p: v for p, v in flat.items() if not trains[p]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable, frozen):
    """The inverse of :func:`partition`."""
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)


def apply_form(params, mask, form: FrozenForm, only=None):
    """Frozen leaves of ``params`` (concrete or abstract) in ``form``: floats cast, Dense kernels (stacked
    ones too) quantized. ``only`` (a set of paths), when given, limits the change to those leaves."""
    flat = traverse_util.flatten_dict(params)
    trains = _flat_mask(params, mask)
    dtype = jnp.dtype(form.dtype) if form.dtype else None
    out = {}
    for path, leaf in flat.items():
        if not trains[path] and (only is None or path in only) and not Q.is_quantized(leaf):
            if form.quantize != "none" and Q.is_dense_kernel(path, leaf):
                leaf = Q.quantize_leaf(leaf, form.quantize)
            if dtype is not None and not Q.is_quantized(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
                leaf = leaf.astype(dtype)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def abstract_form(abstract, mask, form: FrozenForm):
    """:func:`apply_form` on shapes only."""
    return jax.eval_shape(lambda p: apply_form(p, mask, form), abstract)


def form_shardings(param_shardings, abstract_params):
    """Param shardings (one NamedSharding per dense param, from the rules table) -> the same with each
    quantized leaf of ``abstract_params`` given its parts' shardings (``quantize.sharding_like_kernel``)."""
    flat_sh = traverse_util.flatten_dict(param_shardings)
    for path, leaf in traverse_util.flatten_dict(abstract_params).items():
        if Q.is_quantized(leaf):
            flat_sh[path] = Q.sharding_like_kernel(flat_sh[path], leaf)
    return traverse_util.unflatten_dict(flat_sh)


def frozen_paths(mask) -> set:
    return {p for p, t in traverse_util.flatten_dict(mask).items() if not t} if mask is not None else set()
