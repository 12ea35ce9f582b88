"""Rematerialization (activation checkpointing) of transformer blocks, selected by name.

Trades compute for memory: with ``full`` only each block's input is kept for the backward pass; ``dots``
keeps matmul outputs without a batch dimension (the usual LLM choice: recompute the cheap elementwise
ops, keep the expensive ones); ``dots_all`` keeps the attention einsums too (more memory, less
recompute). Param names are unchanged, so checkpoints are interchangeable.
"""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,  # attention's batched einsums kept too
}


def remat_module(module_cls, policy: str):
    """``module_cls`` itself for "none", else its ``nn.remat`` version under the named policy."""
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(POLICIES)}")
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=POLICIES[policy], prevent_cse=True)
