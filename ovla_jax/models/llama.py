"""Llama decoder (Llama-2 / Vicuna), numerically matching transformers' ``LlamaForCausalLM``.

Axis letters: B batch, T new tokens, S cache (key) length, D hidden, N query heads, K key/value heads,
H head dim, V vocab, F MLP width.

Positions are ``cumsum(token_mask) - 1`` per row, so padding anywhere after the first token (right
padding for training, any padding for batched decoding) gives each row exactly the result of its
unpadded run; masked keys are never attended. RoPE uses HF's rotate-half layout (HF checkpoints
already hold q/k weights permuted for it).
"""
from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ovla_jax import sharding as ax
from ovla_jax.models.config import LlamaConfig
from ovla_jax.models.layers import attention, constrain, dense
from ovla_jax.models.lora import LoRA
from ovla_jax.models.remat import remat_module
from ovla_jax.models.scan import scanned

Dtype = Any


@flax.struct.dataclass
class KVCache:
    """Keys/values per layer: a tuple of float[B, S, K, H] (unrolled layers) or one stacked
    float[L, B, S, K, H] (scanned layers); which slots hold real tokens bool[B, S]; and the next slot to
    write (int32 scalar; all rows advance together)."""

    k: Any
    v: Any
    mask: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32, stacked: bool = False) -> "KVCache":
        shape = (batch, length, cfg.kv_heads, cfg.dim_per_head)
        if stacked:
            k = jnp.zeros((cfg.num_layers,) + shape, dtype)
            v = jnp.zeros((cfg.num_layers,) + shape, dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=k, v=v, mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the statistics in fp32, as HF."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """positions int[B, T] -> (cos, sin) float32[B, T, H] in HF's duplicated-halves layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x float[B, T, N, H]; rotate-half RoPE (HF ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    cfg: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        """x [B, T, D]; mask bool[B, T, S]; cache_kv (k, v) [B, S, K, H] or None (then S == T)."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, lora=self.lora)
        b, t, _ = x.shape
        n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        q = dense(n * h, (ax.EMBED, ax.HEADS), name="q_proj", **kw)(x).reshape(b, t, n, h)
        q = constrain(q, ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None)
        key = dense(k * h, (ax.EMBED, ax.KV_HEADS), name="k_proj", **kw)(x).reshape(b, t, k, h)
        value = dense(k * h, (ax.EMBED, ax.KV_HEADS), name="v_proj", **kw)(x).reshape(b, t, k, h)
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            start = (0, cache_index, 0, 0)
            key = jax.lax.dynamic_update_slice(ck, key.astype(ck.dtype), start)
            value = jax.lax.dynamic_update_slice(cv, value.astype(cv.dtype), start)
            new_kv = (key, value)
            key, value = key.astype(self.dtype), value.astype(self.dtype)
        out = attention(q, key, value, mask=mask[:, None, :, :]).reshape(b, t, n * h)
        return dense(cfg.hidden_size, (ax.HEADS, ax.EMBED), name="o_proj", **kw)(out), new_kv


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, lora=self.lora)
        f = self.cfg.intermediate_size
        gate = dense(f, (ax.EMBED, ax.MLP), name="gate_proj", **kw)(x)
        up = dense(f, (ax.EMBED, ax.MLP), name="up_proj", **kw)(x)
        hidden = constrain(nn.silu(gate) * up, ax.BATCH, ax.LENGTH, ax.ACT_MLP)
        return dense(self.cfg.hidden_size, (ax.MLP, ax.EMBED), name="down_proj", **kw)(hidden)


class LlamaDecoderLayer(nn.Module):
    cfg: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ax.BATCH, ax.LENGTH, ax.ACT_EMBED)
        y, new_kv = LlamaAttention(cfg, name="self_attn", lora=self.lora, **kw)(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x), cos, sin, mask, cache_kv, cache_index)
        x = x + y
        y = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + LlamaMLP(cfg, name="mlp", lora=self.lora, **kw)(y)
        return x, new_kv


class ScannedDecoderLayer(LlamaDecoderLayer):
    """A decoder layer as an ``nn.scan`` body: ``(x, cache_kv, cos, sin, mask, cache_index) -> (x, new_kv)``;
    the cache is scanned over (one layer's slice per step), everything else is broadcast."""

    def __call__(self, x, cache_kv, cos, sin, mask, cache_index):
        return LlamaDecoderLayer.__call__(self, x, cos, sin, mask, cache_kv, cache_index)


class LlamaModel(nn.Module):
    """Embedding table, decoder layers, final norm (HF ``model.*``)."""

    cfg: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    remat: str = "none"  # see ovla_jax.models.remat.POLICIES
    scan: bool = False  # layers as one nn.scan over stacked params (ovla_jax.models.scan)

    def setup(self):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (ax.VOCAB, ax.EMBED)))
        if self.scan:
            broadcast = nn.broadcast
            Layers = scanned(ScannedDecoderLayer, length=cfg.num_layers, remat=self.remat,
                             in_axes=(0, broadcast, broadcast, broadcast, broadcast))
            self.layers = Layers(cfg, lora=self.lora, **kw)
        else:
            Layer = remat_module(LlamaDecoderLayer, self.remat)
            self.layers = [Layer(cfg, lora=self.lora, **kw) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, **kw)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, token_mask, cache: Optional[KVCache] = None, causal: bool = True):
        """embeds [B, T, D], token_mask bool[B, T] -> (hidden [B, T, D], updated cache or None).
        ``causal=False`` (OFT's parallel decoding) lets every token attend every real token."""
        b, t, _ = embeds.shape
        token_mask = token_mask.astype(bool)
        offsets = jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1
        if cache is None:
            positions = jnp.maximum(offsets, 0)
            key_mask, start = token_mask, 0
            key_index = jnp.arange(t)
        else:
            seen = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)[:, None]
            positions = seen + jnp.maximum(offsets, 0)
            key_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, cache.index))
            start = cache.index
            key_index = jnp.arange(cache.mask.shape[1])
        query_index = start + jnp.arange(t)
        mask = key_mask[:, None, :] & jnp.ones((1, t, 1), bool)
        if causal:
            mask = mask & (key_index[None, None, :] <= query_index[None, :, None])
        cos, sin = rope_tables(positions, self.cfg.dim_per_head, self.cfg.rope_theta)
        x = embeds.astype(self.dtype)
        if self.scan:
            kv = None if cache is None else (cache.k, cache.v)
            x, new_kv = self.layers(x, kv, cos, sin, mask, jnp.asarray(start, jnp.int32))
            new_k, new_v = (None, None) if new_kv is None else new_kv
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, new_kv = layer(x, cos, sin, mask, kv, start)
                if new_kv is not None:
                    new_k.append(new_kv[0])
                    new_v.append(new_kv[1])
            new_k, new_v = tuple(new_k), tuple(new_v)
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(k=new_k, v=new_v, mask=key_mask, index=cache.index + t)
        return x, cache


class LlamaForCausalLM(nn.Module):
    """HF ``LlamaForCausalLM``: ``model`` + untied ``lm_head``. Logits are fp32."""

    cfg: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    remat: str = "none"  # see ovla_jax.models.remat.POLICIES
    scan: bool = False

    def setup(self):
        self.model = LlamaModel(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                                remat=self.remat, scan=self.scan)
        self.lm_head = dense(self.cfg.vocab_size, (ax.EMBED, ax.VOCAB), use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def hidden(self, embeds, token_mask, cache: Optional[KVCache] = None, causal: bool = True):
        return self.model(embeds, token_mask, cache, causal)

    def logits(self, hidden):
        """hidden [..., D] -> float32[..., V]. Apply only where logits are needed (it dominates small LLMs)."""
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, embeds, token_mask, cache: Optional[KVCache] = None, causal: bool = True):
        hidden, cache = self.hidden(embeds, token_mask, cache, causal)
        return self.logits(hidden), cache
