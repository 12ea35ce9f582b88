"""OpenVLA = fused vision backbone -> projector -> Llama, composed like PaliGemma.

Sequence layout (as the official forward): ``[BOS] + [P projected patches] + input_ids[1:]``; the
patches are always attended (mask ones) and take no loss. Logits come back for all T + P positions.

OpenVLA-OFT (``config.parallel``): ``[BOS] + patches of each image + [proprio token] + prompt[1:] +
K * D action slots + stop``; the slots' input embeddings are zeroed, attention is bidirectional
(the mask only removes padding), and the states ONE POSITION BEFORE each slot (the last prompt token
and all slots but the last, as a causal LM would predict them) feed the head: argmax of the LM head
(``parallel-tokens``) or the L1 regression head (``l1``). One forward pass, no cache.

Pixels are NHWC float[B, H, W, 3 * towers]: channels [0:3] normalized for DINOv2 (ImageNet mean/std),
[3:6] for SigLIP (mean 0.5, std 0.5); the PyTorch layout is the same tensor in NCHW.

Axis letters: B batch, T text tokens, P patches, D LLM width, V vocab.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovla_jax import sharding as ax
from ovla_jax.models.config import OpenVLAConfig
from ovla_jax.models.heads import L1ActionHead, ProprioProjector
from ovla_jax.models.layers import constrain
from ovla_jax.models.llama import KVCache, LlamaForCausalLM
from ovla_jax.models.lora import LoRA
from ovla_jax.models.projector import Projector
from ovla_jax.models.vit import ViT

Dtype = Any


class VisionBackbone(nn.Module):
    """One or two ViT towers on the same image; features concatenated on the channel axis."""

    towers: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    remat: str = "none"
    scan: bool = False
    film: bool = False

    @nn.compact
    def __call__(self, pixel_values, language=None):
        """float[B, H, W, 3 * towers] (and, with FiLM, language float[B, L]) -> float[B, P, sum(widths)]."""
        expected = 3 * len(self.towers)
        if pixel_values.shape[-1] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[-1]} channels; {len(self.towers)} "
                             f"tower(s) need {expected} (NHWC, 3 per tower)")
        names = ("featurizer", "fused_featurizer")
        features = []
        for i, cfg in enumerate(self.towers):
            tower = ViT(cfg, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, remat=self.remat,
                        scan=self.scan, film=self.film, name=names[i])
            features.append(tower(pixel_values[..., 3 * i:3 * i + 3], language=language)[0])
        return jnp.concatenate(features, axis=-1) if len(features) > 1 else features[0]


class OpenVLA(nn.Module):
    """``apply({"params": p}, pixel_values, input_ids, attention_mask)`` -> float32[B, T + P, V].

    ``dtype`` is the compute dtype (bf16 for training), ``param_dtype`` the storage dtype; ``lora``
    adds adapters to every linear layer but the LM head; ``remat`` names a policy in
    ``ovla_jax.models.remat``; ``scan_layers`` runs each tower's blocks and the LLM's layers as one
    ``nn.scan`` each, over params stacked on a leading layer axis (``ovla_jax.models.scan`` maps them
    to and from the per-layer names checkpoints use). The numerics are the same either way."""

    config: OpenVLAConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[LoRA] = None
    remat: str = "none"
    scan_layers: bool = False

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if len(cfg.vision) > 2:
            raise ValueError(f"at most two vision towers are supported, got {len(cfg.vision)}")
        self.vision_backbone = VisionBackbone(tuple(cfg.vision), lora=self.lora, remat=self.remat,
                                              scan=self.scan_layers, film=cfg.film, **kw)
        self.projector = Projector(cfg.projector, cfg.llm.hidden_size, lora=self.lora, **kw)
        self.language_model = LlamaForCausalLM(cfg.llm, lora=self.lora, remat=self.remat, scan=self.scan_layers, **kw)
        if cfg.proprio_dim:
            self.proprio_projector = ProprioProjector(cfg.llm.hidden_size, **kw)
        if cfg.action_head == "l1":
            self.action_head = L1ActionHead(cfg.chunk, cfg.action_dim, cfg.head_hidden or cfg.llm.hidden_size, **kw)

    def embed_images(self, pixel_values, language=None):
        """float[B, H, W, C * num_images] -> float[B, num_images * P, D] projected patch embeddings: every
        image goes through every tower (as one batch), patches concatenated image by image. ``language``
        float[B, D]: FiLM's language vector (FiLM models only)."""
        n, per_image = self.config.num_images, 3 * len(self.config.vision)
        if pixel_values.shape[-1] != n * per_image:
            raise ValueError(f"pixel_values has {pixel_values.shape[-1]} channels; {n} image(s) x "
                             f"{len(self.config.vision)} tower(s) need {n * per_image} (NHWC, 3 per tower per image)")
        if n == 1:
            return self.projector(self.vision_backbone(pixel_values, language))
        b, h, w, _ = pixel_values.shape
        images = jnp.moveaxis(pixel_values.reshape(b, h, w, n, per_image), 3, 0).reshape(n * b, h, w, per_image)
        if language is not None:
            language = jnp.tile(language, (n, 1))  # image-major, like the stacked images
        patches = self.projector(self.vision_backbone(images, language))
        return jnp.moveaxis(patches.reshape(n, b, *patches.shape[1:]), 0, 1).reshape(b, -1, patches.shape[-1])

    def embed_inputs(self, pixel_values, input_ids, attention_mask=None, proprio=None, action_slots=None):
        """-> (embeds float[B, E + T, D], mask bool[B, E + T]) with the E prefix embeddings (patches, then
        the proprio token) inserted after BOS; ``action_slots`` bool[B, T] zeroes those text embeddings."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        text = self.language_model.embed(input_ids)
        language = film_language(text, attention_mask, action_slots) if cfg.film else None
        prefix = self.embed_images(pixel_values, language)
        text = text.astype(prefix.dtype)
        if cfg.proprio_dim:
            if proprio is None:
                if not self.is_initializing():
                    raise ValueError(f"this model reads proprio (float[B, {cfg.proprio_dim}] normalized state); "
                                     f"none was given")
                proprio = jnp.zeros((input_ids.shape[0], cfg.proprio_dim), jnp.float32)
            if proprio.shape[-1] != cfg.proprio_dim:
                raise ValueError(f"proprio has {proprio.shape[-1]} dims; the model was built for {cfg.proprio_dim}")
            prefix = jnp.concatenate([prefix, self.proprio_projector(proprio).astype(prefix.dtype)], axis=1)
        if action_slots is not None:
            text = jnp.where(action_slots[..., None], jnp.zeros((), text.dtype), text)
        embeds = jnp.concatenate([text[:, :1], prefix, text[:, 1:]], axis=1)
        embeds = constrain(embeds, ax.BATCH, ax.LENGTH, ax.ACT_EMBED)
        prefix_mask = jnp.ones(prefix.shape[:2], bool)
        attention_mask = attention_mask.astype(bool)
        mask = jnp.concatenate([attention_mask[:, :1], prefix_mask, attention_mask[:, 1:]], axis=1)
        return embeds, mask

    def __call__(self, pixel_values, input_ids, attention_mask=None, proprio=None, action_slots=None):
        embeds, mask = self.embed_inputs(pixel_values, input_ids, attention_mask, proprio, action_slots)
        logits, _ = self.language_model(embeds, mask, causal=not self.config.parallel)
        if self.config.action_head == "l1" and self.is_initializing():  # create the head's params
            self.action_head(jnp.zeros((input_ids.shape[0], self.config.num_action_slots, self.config.llm.hidden_size)))
        return logits

    def hidden_states(self, pixel_values, input_ids, attention_mask=None, proprio=None, action_slots=None):
        """Final-norm hidden states float[B, E + T, D] (training gathers the labelled positions and
        applies ``logits`` only there). Bidirectional for parallel (OFT) models."""
        embeds, mask = self.embed_inputs(pixel_values, input_ids, attention_mask, proprio, action_slots)
        return self.language_model.hidden(embeds, mask, causal=not self.config.parallel)[0]

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def regress(self, slot_hidden):
        """L1 head: slot states float[B, K * D, H] -> normalized actions float32[B, K, D]."""
        return self.action_head(slot_hidden).astype(jnp.float32)

    def prefill(self, pixel_values, input_ids, attention_mask, cache: KVCache):
        """Run the prompt through the LLM into ``cache``; return logits float32[B, V] of each row's
        last real token (rows may be padded anywhere after BOS)."""
        embeds, mask = self.embed_inputs(pixel_values, input_ids, attention_mask)
        hidden, cache = self.language_model.hidden(embeds, mask, cache)
        last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.language_model.logits(last_hidden), cache

    def extend(self, token_ids, cache: KVCache):
        """Append token_ids int[B, t] to the cache; return logits float32[B, t, V]."""
        embeds = self.language_model.embed(token_ids)
        hidden, cache = self.language_model.hidden(embeds, jnp.ones(token_ids.shape, bool), cache)
        return self.language_model.logits(hidden), cache


def film_language(text, attention_mask, action_slots=None):
    """FiLM's language vector: the mean input embedding of the real tokens that are not action slots
    (OFT averages the non-action part of its unpadded sequence) -> float32[B, D]."""
    keep = attention_mask.astype(bool)
    if action_slots is not None:
        keep = keep & ~action_slots.astype(bool)
    weights = keep.astype(jnp.float32)[..., None]
    return (text.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def slot_positions(action_slots, num_prefix: int, num_slots: int):
    """action_slots bool[B, T] (text layout) -> int[B, K * D]: positions, in the multimodal sequence, of
    the hidden states that read each slot (one before it: causal-LM alignment, as OFT)."""
    first = jnp.argmax(action_slots, axis=1)  # text index of the first slot (>= 1: BOS comes first)
    return (first + num_prefix - 1)[:, None] + jnp.arange(num_slots)[None, :]


def gather_slots(hidden, action_slots, config: OpenVLAConfig):
    """hidden float[B, E + T, H] -> the slot-reading states float[B, K * D, H]."""
    index = slot_positions(action_slots, config.num_prefix_embeddings, config.num_action_slots)
    return jnp.take_along_axis(hidden, index[..., None], axis=1)


@partial(jax.jit, static_argnames=("model",))
def parallel_decode(model: OpenVLA, params, pixel_values, input_ids, attention_mask, action_slots, proprio=None):
    """OFT's one-pass action prediction -> (float32[B, K, D] normalized actions, int32[B, K * D] tokens or
    None). ``parallel-tokens``: argmax over the full vocabulary at each slot, decoded from the bins;
    ``l1``: the regression head."""
    from ovla_jax import actions as A

    cfg = model.config
    variables = {"params": params}
    hidden = model.apply(variables, pixel_values, input_ids, attention_mask, proprio, action_slots,
                         method=OpenVLA.hidden_states)
    slots = gather_slots(hidden, action_slots, cfg)
    b = input_ids.shape[0]
    if cfg.action_head == "l1":
        return model.apply(variables, slots, method=OpenVLA.regress), None
    tokens = jnp.argmax(model.apply(variables, slots, method=OpenVLA.logits), axis=-1).astype(jnp.int32)
    actions = A.decode_action_tokens(tokens, cfg.tokenizer_vocab_size, cfg.n_action_bins, xp=jnp)
    return actions.reshape(b, cfg.chunk, cfg.action_dim).astype(jnp.float32), tokens


def init_cache(config: OpenVLAConfig, batch: int, prompt_len: int, new_tokens: int, dtype=jnp.float32,
               stacked: bool = False) -> KVCache:
    """An empty cache long enough for the prompt (text + patches) and ``new_tokens`` more (``stacked``
    for a model with scanned layers)."""
    return KVCache.zeros(config.llm, batch, prompt_len + config.num_prefix_embeddings + new_tokens, dtype, stacked)


@partial(jax.jit, static_argnames=("model", "num_tokens"))
def greedy_decode(model: OpenVLA, params, pixel_values, input_ids, attention_mask=None, *, num_tokens: int = 7):
    """Greedy decoding with the KV cache: -> (tokens int32[B, num_tokens], logits float32[B, num_tokens, V]).

    argmax runs over the full (padded) vocabulary, as upstream's ``generate``.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    batch, prompt_len = input_ids.shape
    cache = init_cache(model.config, batch, prompt_len, num_tokens, dtype=model.dtype, stacked=model.scan_layers)
    variables = {"params": params}
    logits, cache = model.apply(variables, pixel_values, input_ids, attention_mask, cache, method=OpenVLA.prefill)

    def step(carry, _):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_logits, cache = model.apply(variables, token[:, None], cache, method=OpenVLA.extend)
        return (next_logits[:, 0], cache), (token, logits)

    (_, _), (tokens, step_logits) = jax.lax.scan(step, (logits, cache), None, length=num_tokens)
    return tokens.T, jnp.swapaxes(step_logits, 0, 1)
