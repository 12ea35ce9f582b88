"""Small building blocks shared by the towers and the decoder: annotated Dense, exact GELU.

Every kernel gets logical axis names so the one rules table in ``ovla_jax.sharding`` shards it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovla_jax import sharding as ax

Dtype = Any
DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def exact_gelu(x):
    """erf GELU, as torch's ``nn.GELU()`` (flax's ``nn.gelu`` defaults to the tanh approximation)."""
    return nn.gelu(x, approximate=False)


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, kernel_init: Callable = DEFAULT_KERNEL_INIT,
          name: str | None = None) -> nn.Dense:
    """``nn.Dense`` whose kernel [in, out] and bias [out] carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with replicated, annotated scale/bias (statistics computed in fp32 by flax)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (ax.NORM,)),
        name=name,
    )


def attention(q, k, v, mask=None):
    """Multi-head attention. q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (GQA); mask
    bool broadcastable to [B, N, T, S]. Softmax in fp32 when inputs are fp32; XLA/cudnn picks the kernel."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
