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
    type is slower than fp32 there); the caller casts the fp32 result back. ``w`` (e.g. an fp32 master
    weight) is cast to ``x``'s dtype here. At low precision both backward products take low-precision
    operands too (:func:`_low_matmul`)."""
    if x.dtype == jnp.float32:
        return jax.lax.dot_general(x, w.astype(jnp.float32), (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    flat = _low_matmul(x.reshape(-1, x.shape[-1]), w)
    return flat.reshape(x.shape[:-1] + (w.shape[-1],))


def _dot_f32(spec: str, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# Mixed-precision products with their own backward pass.
#
# Plain autodiff of a bf16 x bf16 -> fp32 product gets an fp32 cotangent, and both backward products then
# run on fp32 operands (the bf16 operand converted up): two thirds of a training step's FLOPs at the fp32
# rate (measured: 2/3 of the dots of the full-size bf16 step were fp32 x fp32). Here the cotangent is
# rounded once to the compute dtype, as a bf16 product's gradient is under PyTorch autocast, and every
# backward product accumulates in fp32. A master weight's gradient comes back in fp32 straight from
# the accumulator (no bf16 rounding of the weight gradient).
#
# The backward products are written in forms XLA:CPU runs on bf16 operands: its bf16 kernels (YNNPACK)
# need the lhs contracted on its last axis, row-major, and XLA folds a plain transpose into the dot's
# dimension numbers (then converts both operands to fp32, or fails at run time for batched dots). A
# transpose that is padded along the contraction (zero rows: the sum is unchanged) stays a real
# row-major array. The forms are pinned by tests/test_bf16_step.py.

def _pad_rows(x, axis: int):
    """``x`` with 1..16 zero rows appended along ``axis`` (a multiple of 16 in all)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 16 - x.shape[axis] % 16)
    return jnp.pad(x, pad)


@jax.custom_vjp
def _low_matmul(x, w):
    """x[M, in] (low precision) @ w[in, out] (any float dtype) -> fp32[M, out]."""
    return _dot_f32("mi,io->mo", x, w.astype(x.dtype))


def _low_matmul_fwd(x, w):
    low_w = w.astype(x.dtype)
    # A zero-size array carries w's dtype to the backward pass (a dtype is not a valid residual).
    return _dot_f32("mi,io->mo", x, low_w), (x, low_w, jnp.zeros((0,), w.dtype))


def _low_matmul_bwd(residuals, g):
    x, low_w, w_kind = residuals
    g = g.astype(x.dtype)
    grad_x = _dot_f32("mo,io->mi", g, low_w).astype(x.dtype)
    grad_w = _dot_f32("im,mo->io", _pad_rows(x.T, 1), _pad_rows(g, 0)).astype(w_kind.dtype)
    return grad_x, grad_w


_low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd)


def _low_product(spec: str, backward):
    """A custom-VJP ``einsum(spec, a, b)`` of two low-precision operands -> fp32, whose backward pass is
    ``backward(a, b, g)`` -> (grad_a, grad_b) with ``g`` already rounded to the operands' dtype."""

    @jax.custom_vjp
    def product(a, b):
        return _dot_f32(spec, a, b)

    def product_bwd(residuals, g):
        a, b = residuals
        grad_a, grad_b = backward(a, b, g.astype(a.dtype))
        return grad_a.astype(a.dtype), grad_b.astype(b.dtype)

    product.defvjp(lambda a, b: (product(a, b), (a, b)), product_bwd)
    return product


# The attention products. Each rhs gradient contracts the lhs's query axis, so that operand goes in with
# its last two axes swapped (contracted last, as XLA:CPU's bf16 kernels need).
_scores = _low_product(  # q[B, T, N, H] . k[B, S, N, H] -> fp32[B, N, T, S]
    "btnh,bsnh->bnts", lambda q, k, g: (_dot_f32("bnts,bsnh->btnh", g, k),
                                        _dot_f32("bnst,btnh->bsnh", jnp.swapaxes(g, 2, 3), q)))
_mix = _low_product(  # p[B, N, T, S] . v[B, S, N, H] -> fp32[B, T, N, H]
    "bnts,bsnh->btnh", lambda p, v, g: (_dot_f32("btnh,bsnh->bnts", g, v),
                                        _dot_f32("bnst,btnh->bsnh", jnp.swapaxes(p, 2, 3), g)))


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
            down = matmul(h, a).astype(self.dtype)
            y = y + matmul(down, b) * jnp.asarray(self.lora.scale, y.dtype)
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
        return matmul(x, kernel)


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
    products take the low-precision operands and accumulate in fp32 (their gradients too), the softmax
    runs in fp32, and the result is cast back (what the fused kernels of TPUs and GPUs do)."""
    if q.dtype == jnp.float32:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    b, t, n, h = q.shape
    s = k.shape[1]
    if k.shape[2] != n:  # grouped keys / values: each serves n / K query heads
        k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
    logits = _scores(q, k.astype(q.dtype)) / jnp.sqrt(jnp.float32(h))
    if mask is not None:
        logits = jnp.where(jnp.broadcast_to(mask, (b, n, t, s)), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return _mix(probs, v).astype(v.dtype)
