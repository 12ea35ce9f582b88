"""Vision-to-language projector: an MLP from fused patch features to the LLM width.

``fused-gelu-mlp`` (two towers, OpenVLA-7B): fc1 (V -> 4V), GELU, fc2 (4V -> L), GELU, fc3 (L -> L).
``gelu-mlp`` (one tower): fc1 (V -> L), GELU, fc2 (L -> L). GELU is exact (erf), as torch's.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ovla_jax import sharding as ax
from ovla_jax.models.layers import dense, exact_gelu
from ovla_jax.models.lora import LoRA


class Projector(nn.Module):
    """float[B, P, V] -> float[B, P, L]."""

    kind: str
    llm_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: Optional[LoRA] = None

    @nn.compact
    def __call__(self, features):
        vision_dim = features.shape[-1]
        if self.kind == "fused-gelu-mlp":
            widths = (4 * vision_dim, self.llm_dim, self.llm_dim)
        elif self.kind == "gelu-mlp":
            widths = (self.llm_dim, self.llm_dim)
        else:
            raise ValueError(f"unknown projector kind {self.kind!r}")
        x = features.astype(self.dtype)
        for i, width in enumerate(widths):
            if i:
                x = exact_gelu(x)  # on the previous layer's fp32 accumulator (see vit.MlpBlock)
            axes = (ax.EMBED, ax.MLP) if i % 2 == 0 else (ax.MLP, ax.EMBED)
            last = i == len(widths) - 1
            x = dense(width, axes, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                      out_dtype=None if last else jnp.float32, name=f"fc{i + 1}")(x)
        return x
