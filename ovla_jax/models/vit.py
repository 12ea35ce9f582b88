"""One Vision Transformer for both OpenVLA towers (DINOv2-reg4 ViT-L/14 and SigLIP So400m/14).

Variants differ by flags in ``ViTConfig`` (cls token, registers, LayerScale, pool head). Parameter
names mirror timm's (``blocks_3/attn/qkv``) so the checkpoint name map is mechanical.

Shapes: B batch, P patches, D width, N = prefix (cls + registers) + P tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ovla_jax import sharding as ax
from ovla_jax.models.config import ViTConfig
from ovla_jax.models.lora import LoRA
from ovla_jax.models.layers import attention, constrain, dense, exact_gelu, layer_norm, matmul
from ovla_jax.models.remat import remat_module
from ovla_jax.models.scan import scanned

Dtype = Any


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (timm's LayerScale; ``scale_factor`` as in the HF checkpoint)."""

    dim: int
    init_value: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale_factor", nn.with_logical_partitioning(
            nn.initializers.constant(self.init_value), (ax.NORM,)), (self.dim,), self.param_dtype)
        return x * scale.astype(jnp.promote_types(self.dtype, x.dtype))


class MlpBlock(nn.Module):
    """fc1 -> exact GELU -> fc2. At low precision the GELU acts on fc1's fp32 accumulator, and fc2 casts
    its input: one rounding instead of one per elementwise op, and the widest activation (4x the width)
    never makes a bf16 round trip, which on CPUs costs more than the fp32 math."""

    hidden: int
    out: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    out_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        x = dense(self.hidden, (ax.EMBED, ax.MLP), name="fc1", out_dtype=jnp.float32, **kw)(x)
        x = exact_gelu(constrain(x, ax.BATCH, ax.LENGTH, ax.ACT_MLP))
        return dense(self.out, (ax.MLP, ax.EMBED), name="fc2", out_dtype=self.out_dtype, **kw)(x)


class SelfAttention(nn.Module):
    """Fused-qkv attention; the qkv output is laid out [3, heads, head_dim] as timm's."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    out_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        qkv = dense(3 * d, (ax.EMBED, ax.QKV), name="qkv", **kw)(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return dense(d, (ax.HEADS, ax.EMBED), name="proj", out_dtype=self.out_dtype, **kw)(out.reshape(b, n, d))


class ViTBlock(nn.Module):
    """Pre-norm transformer block, optional LayerScale on both residual branches. With ``film`` (OFT+),
    the language vector float[B, L] modulates the stream after the attention residual:
    ``x * (1 + gamma) + beta`` with gamma = ``scale``(language), beta = ``shift``(language)."""

    cfg: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    film: bool = False

    @nn.compact
    def __call__(self, x, language=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Each residual branch stays in its fp32 accumulator through the LayerScale and is rounded once,
        # as it joins the stream (a no-op at fp32).
        branch = dict(out_dtype=jnp.float32)
        x = constrain(x, ax.BATCH, ax.LENGTH, ax.ACT_EMBED)
        y = layer_norm(cfg.norm_eps, name="norm1", **kw)(x)
        y = SelfAttention(cfg.num_heads, name="attn", lora=self.lora, **branch, **kw)(y)
        if cfg.layerscale:
            y = LayerScale(cfg.width, cfg.layerscale_init, name="ls1", **kw)(y)
        x = x + y.astype(x.dtype)
        if self.film:
            if language is None:
                raise ValueError("a FiLM ViT block needs the language vector (mean prompt embedding)")
            gamma = dense(cfg.width, (None, ax.EMBED), name="scale", **kw)(language)[:, None, :]
            beta = dense(cfg.width, (None, ax.EMBED), name="shift", **kw)(language)[:, None, :]
            x = x * (1 + gamma) + beta
        y = layer_norm(cfg.norm_eps, name="norm2", **kw)(x)
        y = MlpBlock(cfg.mlp_dim, cfg.width, name="mlp", lora=self.lora, **branch, **kw)(y)
        if cfg.layerscale:
            y = LayerScale(cfg.width, cfg.layerscale_init, name="ls2", **kw)(y)
        return x + y.astype(x.dtype)


class ScannedViTBlock(ViTBlock):
    """A ViTBlock as an ``nn.scan`` body: ``(x, active) -> (x, x or None)``. Inactive layers (those after
    the feature block) are skipped with a cond at run time, so the scanned tower costs what the unrolled
    one does; at init every layer runs so all params exist. ``collect`` returns each block's output."""

    collect: bool = False

    def __call__(self, x, active, language=None):
        if self.is_initializing():
            x = ViTBlock.__call__(self, x, language)
        else:
            x = nn.cond(active, lambda block, y: ViTBlock.__call__(block, y, language), lambda block, y: y, self, x)
        return x, (x if self.collect else None)


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention-pooling head (timm ``attn_pool``). Unused by OpenVLA, whose
    features come from an inner block, but its parameters are part of the checkpoint."""

    cfg: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, d = x.shape
        h = cfg.num_heads
        lw = dict(kw, lora=self.lora)
        latent = self.param("latent", nn.with_logical_partitioning(
            nn.initializers.normal(d ** -0.5), (None, None, ax.EMBED)), (1, 1, d), self.param_dtype)
        q = dense(d, (ax.EMBED, ax.HEADS), name="q", **lw)(jnp.broadcast_to(latent.astype(self.dtype), (b, 1, d)))
        kv = dense(2 * d, (ax.EMBED, ax.QKV), name="kv", **lw)(x).reshape(b, n, 2, h, d // h)
        out = attention(q.reshape(b, 1, h, d // h), kv[:, :, 0], kv[:, :, 1]).reshape(b, 1, d)
        out = dense(d, (ax.HEADS, ax.EMBED), name="proj", **lw)(out)
        out = out + MlpBlock(cfg.mlp_dim, d, name="mlp", **lw)(layer_norm(cfg.norm_eps, name="norm", **kw)(out))
        return out[:, 0]


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv (kernel HWIO; the PyTorch OIHW layout is converted by the name map).

    Computed as one matmul of the flattened patches with the flattened kernel (fp32 accumulation): the
    demo's training steps ran ~8% faster on CPU than with XLA's convolution. Like a VALID conv, rows and
    columns past the last whole patch are ignored."""

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        return _PatchProjection(self.width, self.patch_size, self.dtype, self.param_dtype, name="proj")(images)


class _PatchProjection(nn.Module):
    """The ``proj`` params of :class:`PatchEmbed` (``kernel`` [p, p, C, D], ``bias`` [D]), as nn.Conv names them."""

    width: int
    patch_size: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, images):
        p, (b, h, w, c) = self.patch_size, images.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   (None, None, ax.PATCH, ax.EMBED)),
                            (p, p, c, self.width), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (ax.EMBED,)),
                          (self.width,), self.param_dtype)
        rows, cols = h // p, w // p
        patches = images[:, :rows * p, :cols * p].astype(self.dtype).reshape(b, rows, p, cols, p, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows, cols, p * p * c)  # (kh, kw, c) order
        out = matmul(patches, kernel.reshape(p * p * c, self.width))
        return (out + bias.astype(jnp.float32)).astype(self.dtype)


class ViT(nn.Module):
    """images float[B, H, W, 3] (already normalized for this tower) -> (features, intermediates).

    ``features`` float[B, P, D] is the output of block ``cfg.feature_block`` with prefix tokens
    dropped (upstream's ``get_intermediate_layers(n={depth - 2})``). Later blocks, the final norm and
    the pool head run only under ``full=True`` (or at init, so every checkpoint tensor exists).
    ``intermediates`` maps ``block_<i>`` (and ``encoded``/``pooled`` when full) to outputs; with
    ``scan`` only the feature block's unless ``full``.
    """

    cfg: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    remat: str = "none"  # see ovla_jax.models.remat.POLICIES
    scan: bool = False  # blocks as one nn.scan over stacked params (ovla_jax.models.scan)
    film: bool = False  # every block FiLM-modulated by a language vector (OFT+)

    @nn.compact
    def __call__(self, images, *, full: bool = False, language=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = images.shape[0]
        x = PatchEmbed(cfg.width, cfg.patch_size, name="patch_embed", **kw)(images)
        x = x.reshape(b, -1, cfg.width)
        if x.shape[1] != cfg.num_patches:
            raise ValueError(f"image of shape {images.shape[1:3]} gives {x.shape[1]} patches; the tower "
                             f"expects {cfg.image_size}px -> {cfg.num_patches}")
        # Position embedding covers the patches only and is added before prefix tokens join
        # (timm no_embed_class; SigLIP has no prefix tokens at all).
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, ax.POS, ax.EMBED)), (1, cfg.num_patches, cfg.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        prefix = []
        if cfg.class_token:
            cls = self.param("cls_token", nn.with_logical_partitioning(
                nn.initializers.normal(1e-6), (None, None, ax.EMBED)), (1, 1, cfg.width), self.param_dtype)
            prefix.append(jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.width)))
        if cfg.num_registers:
            reg = self.param("reg_token", nn.with_logical_partitioning(
                nn.initializers.normal(1e-6), (None, ax.POS, ax.EMBED)), (1, cfg.num_registers, cfg.width), self.param_dtype)
            prefix.append(jnp.broadcast_to(reg.astype(self.dtype), (b, cfg.num_registers, cfg.width)))
        if prefix:
            x = jnp.concatenate(prefix + [x], axis=1)

        run_all = full or self.is_initializing()
        last = cfg.depth - 1 if run_all else cfg.feature_block
        intermediates = {}
        if self.scan:
            blocks = scanned(ScannedViTBlock, length=cfg.depth, remat=self.remat, in_axes=(0, nn.broadcast))
            active = jnp.arange(cfg.depth) <= last
            x, outputs = blocks(cfg, name="blocks", lora=self.lora, film=self.film, collect=full, **kw)(
                x, active, language)
            if full:
                intermediates.update({f"block_{i}": outputs[i] for i in range(cfg.depth)})
            else:  # the blocks after the feature block were skipped: x is the feature block's output
                intermediates[f"block_{cfg.feature_block}"] = x
        else:
            Block = remat_module(ViTBlock, self.remat)
            for i in range(last + 1):
                x = Block(cfg, name=f"blocks_{i}", lora=self.lora, film=self.film, **kw)(x, language)
                intermediates[f"block_{i}"] = x
        features = intermediates[f"block_{cfg.feature_block}"][:, cfg.num_prefix_tokens:]
        if run_all:
            encoded = layer_norm(cfg.norm_eps, name="norm", **kw)(x)
            intermediates["encoded"] = encoded
            if cfg.pool == "map":
                intermediates["pooled"] = AttentionPoolHead(cfg, name="attn_pool", lora=self.lora, **kw)(encoded)
            elif cfg.class_token:
                intermediates["pooled"] = encoded[:, 0]
        return features, intermediates
