"""Small building blocks shared by the towers and the decoder: annotated Dense, exact GELU.

Every kernel gets logical axis names so the one rules table in ``ovla_jax.sharding`` shards it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovla_jax import quantize as Q
from ovla_jax import sharding as ax
from ovla_jax.models.lora import LoRA

Dtype = Any
DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def constrain(x, *names: str | None):
    """Shard activation ``x`` by logical axis names (one per dim) when the train step traced it under
    ``ovla_jax.sharding.activation_rules``; otherwise returns ``x`` as is."""
    return nn.with_logical_constraint(x, names)


def exact_gelu(x):
    """erf GELU, as torch's ``nn.GELU()`` (flax's ``nn.gelu`` defaults to the tanh approximation)."""
    return nn.gelu(x, approximate=False)


def matmul(x, w):
    """x[..., in] @ w[in, out] accumulated in fp32 whatever the operand dtype (bf16 operands with an fp32
    accumulator is what TPUs and GPUs do, and ~2x an fp32 matmul on AVX-512 CPUs, while a bf16 result
    type is slower than fp32 there); the caller casts the fp32 result back."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


class Dense(nn.Module):
    """``nn.Dense`` (kernel [in, out], bias [out], same names and numerics) with logical axis names on
    its params and an optional LoRA adapter (``lora_a`` [in, r], ``lora_b`` [r, out]).

    Adapter dropout is active only when the caller provides a ``dropout`` rng (training). A kernel given
    quantized (``ovla_jax.quantize``: int8 / int4 inference, or a QLoRA frozen base) is dequantized here,
    next to its matmul: under scanned layers that is inside the layer body, so only one layer's kernels
    exist in full precision at a time."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = DEFAULT_KERNEL_INIT
    lora: Optional[LoRA] = None
    out_dtype: Optional[Dtype] = None  # the result's dtype when not ``dtype``: fp32 keeps the accumulator

    @nn.compact
    def __call__(self, x):
        d_in, (in_axis, out_axis) = x.shape[-1], self.axes
        x = x.astype(self.dtype)
        y = self._product(x, d_in)
        if self.lora is not None:
            r = self.lora.rank
            a = self.param("lora_a", nn.with_logical_partitioning(nn.initializers.normal(1.0 / r), (in_axis, None)),
                           (d_in, r), self.param_dtype)
            b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, out_axis)),
                           (r, self.features), self.param_dtype)
            h = x
            if self.lora.dropout > 0.0 and self.has_rng("dropout"):
                h = nn.Dropout(self.lora.dropout, deterministic=False)(h)
            down = matmul(h, a.astype(self.dtype)).astype(self.dtype)
            y = y + matmul(down, b.astype(self.dtype)) * jnp.asarray(self.lora.scale, y.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y.astype(self.out_dtype or self.dtype)

    def _product(self, x, d_in: int):
        """``x @ kernel`` accumulated in fp32. An int8 kernel's per-column scale multiplies the product
        (``x @ (q * s) == (x @ q) * s``): the weights are only converted, exactly (|q| <= 127), never
        scaled, so there is one pass less over them and no rounding of ``q * s`` to the compute dtype."""
        if self.has_variable("params", "kernel"):
            stored = self.get_variable("params", "kernel")
            if Q.is_quantized(stored):
                if stored.kernel_shape != (d_in, self.features):
                    raise ValueError(f"{'/'.join(self.scope.path)}: quantized kernel holds {stored.kernel_shape}, "
                                     f"the layer needs {(d_in, self.features)}")
                # A huge kernel (the 7B LM head) goes a block of output columns at a time: its converted
                # copy (f32 where XLA:CPU upcasts a one-token product) is a block's, not the whole head's.
                blocks = -(-d_in * self.features // QUANTIZED_BLOCK)
                edges = [self.features * i // blocks for i in range(blocks + 1)]
                parts = []
                for lo, hi in zip(edges[:-1], edges[1:]):
                    after = parts[-1] if parts else None
                    parts.append(_quantized_product(x, Q.column_slice(stored, lo, hi), self.dtype, after))
                return jnp.concatenate(parts, axis=-1)
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (d_in, self.features), self.param_dtype)
        return matmul(x, kernel.astype(self.dtype))


QUANTIZED_BLOCK = 1 << 25  # weights of a quantized kernel converted at once (the 7B LM head: 4 blocks)


def _quantized_product(x, stored, dtype, after=None):
    """``x @ kernel`` of a quantized kernel in fp32. ``after``: a previous block's product that this block's
    conversion must wait for. XLA:CPU converts every block up front otherwise (its scheduler does not
    minimize memory here, and it drops optimization barriers), so the wait is a data dependence: a zero,
    ``min(|after[0]|, 0)``, added to the converted weights (exact; only a NaN would propagate, as it
    would through the product anyway)."""
    if isinstance(stored, Q.Int8Weight):
        kernel = stored.values.astype(dtype)
    else:
        kernel = Q.dequantize_weight(stored, dtype)  # int4: its scales vary along the rows
    if after is not None:
        kernel = kernel + jnp.minimum(jnp.abs(after[(0,) * after.ndim]), 0).astype(dtype)
    product = matmul(x, kernel)
    return product * stored.scale if isinstance(stored, Q.Int8Weight) else product


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, kernel_init: Callable = DEFAULT_KERNEL_INIT,
          lora: Optional[LoRA] = None, out_dtype: Optional[Dtype] = None, name: str | None = None) -> Dense:
    """A :class:`Dense` whose kernel [in, out] and bias [out] carry logical axis names."""
    return Dense(features, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                 lora=lora, out_dtype=out_dtype, name=name)


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
    bool broadcastable to [B, N, T, S]. fp32 inputs: XLA's / cudnn's kernel. Lower precision: both
    einsums take the low-precision operands and accumulate in fp32, the softmax runs in fp32, and the
    result is cast back (what the fused kernels of TPUs and GPUs do)."""
    if q.dtype == jnp.float32:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    b, t, n, h = q.shape
    kv, s = k.shape[2], k.shape[1]
    groups = n // kv
    # Grouped heads get a group axis; plain multi-head attention (the towers) keeps the simpler layout,
    # which XLA:CPU runs ~10% faster.
    if groups > 1:
        q = q.reshape(b, t, kv, groups, h)
        scores, mix, shape = "btkgh,bskh->bkgts", "bkgts,bskh->btkgh", (b, kv, groups, t, s)
    else:
        scores, mix, shape = "btnh,bsnh->bnts", "bnts,bsnh->btnh", (b, n, t, s)
    logits = jnp.einsum(scores, q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(h))
    if mask is not None:
        logits = jnp.where(jnp.broadcast_to(mask, (b, n, t, s)).reshape(shape), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(mix, probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(v.dtype)
