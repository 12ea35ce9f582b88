"""OpenVLA-OFT's extra modules: the L1 regression action head and the proprio projector.

Both mirror OFT's PyTorch modules (``L1RegressionActionHead`` = an ``MLPResNet``; ``ProprioProjector``)
so their checkpoints map name for name (``ovla_jax/checkpoints/oft.py``):

- ``L1ActionHead``: per chunk step, the D slot hidden states concatenated (D * H) -> LayerNorm ->
  Linear(D * H -> W) -> ReLU -> ``num_blocks`` x [LayerNorm -> Linear(W -> W) -> ReLU, residual] ->
  LayerNorm -> Linear(W -> D). W is the LLM width in OFT.
- ``ProprioProjector``: Linear(P -> H) -> exact GELU -> Linear(H -> H): one LLM token from the state.

LayerNorms use torch's eps (1e-5). Axis letters: B batch, K chunk, D action dims, H LLM width.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovla_jax import sharding as ax
from ovla_jax.models.layers import dense, exact_gelu, layer_norm

Dtype = Any
TORCH_LN_EPS = 1e-5


class MLPResNetBlock(nn.Module):
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(TORCH_LN_EPS, name="norm", **kw)(x)
        y = dense(self.width, (ax.EMBED, ax.MLP), name="fc", **kw)(y)
        return x + nn.relu(y)


class L1ActionHead(nn.Module):
    """slot hidden states float[B, K * D, H] -> normalized actions float32[B, K, D]."""

    chunk: int
    action_dim: int
    width: int
    num_blocks: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        b, slots, h = hidden.shape
        if slots != self.chunk * self.action_dim:
            raise ValueError(f"L1 head: got {slots} slot states; chunk {self.chunk} x action_dim {self.action_dim} "
                             f"= {self.chunk * self.action_dim} expected")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = hidden.reshape(b, self.chunk, self.action_dim * h)
        x = layer_norm(TORCH_LN_EPS, name="layer_norm1", **kw)(x)
        x = nn.relu(dense(self.width, (ax.EMBED, ax.MLP), name="fc1", **kw)(x))
        for i in range(self.num_blocks):
            x = MLPResNetBlock(self.width, name=f"block_{i}", **kw)(x)
        x = layer_norm(TORCH_LN_EPS, name="layer_norm2", **kw)(x)
        return dense(self.action_dim, (ax.MLP, None), name="fc2", **kw)(x).astype(jnp.float32)


class ProprioProjector(nn.Module):
    """normalized state float[B, P] -> one LLM embedding float[B, 1, H]."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, proprio):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = exact_gelu(dense(self.hidden_size, (None, ax.MLP), name="fc1", **kw)(proprio))
        return dense(self.hidden_size, (ax.MLP, ax.EMBED), name="fc2", **kw)(x)[:, None, :]
