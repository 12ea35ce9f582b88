"""A trained OpenVLA as a batched policy: (images, instructions) -> unnormalized 7-D actions.

Preprocessing is the training pipeline's own (lanczos3 resize, per-tower pixel normalization, the
OpenVLA prompt), prompts are right-padded to one fixed length so one compiled decode serves every
batch, and the 7 action tokens come from the KV-cached greedy decoder. OpenVLA-OFT models (parallel
heads) predict a chunk of K actions in one forward pass, from the third-person image, the wrist image
and the proprio state when they read them. Checkpoints of any kind load
here: an ``ovla-jax train`` workdir (LoRA merged), an ovla-jax dir, or an HF PyTorch dir.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovla_jax import actions as A
from ovla_jax import quantize as Q
from ovla_jax.compile_options import weight_loop_options
from ovla_jax.models.config import OpenVLAConfig, pixel_normalizations
from ovla_jax.models.scan import is_scanned
from ovla_jax.models.openvla import OpenVLA, greedy_decode, parallel_decode
from ovla_jax.data import pixels as F
from ovla_jax.data.batch import prompt_ids


DTYPES = ("float32", "bfloat16")


def final_form(params, dtype: str, quantize: str):
    """Params (host or device; loaded ones are already final) -> floats in ``dtype``, Dense kernels
    quantized, on the device. Leaves already in that form are passed through without a copy."""
    target = jnp.dtype(dtype)

    def cast(a):
        if Q.is_quantized(a) or not jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == target:
            return a
        return a.astype(target)

    params = jax.tree.map(cast, params, is_leaf=Q.is_quantized)
    return jax.device_put(Q.quantize_params(params, quantize))


def _lookup_pixels(table, cameras):
    """uint8[..., 3 * cameras] -> float32[..., 3 * towers * cameras]: :func:`frames.pixel_table` looked up
    per channel; camera by camera, towers in order within each, as the data pipeline concatenates them."""
    table, towers = jnp.asarray(table), table.shape[1] // 3
    out = []
    for first in range(0, cameras.shape[-1], 3):
        levels = cameras[..., first:first + 3].astype(jnp.int32)
        per_channel = jnp.stack([table[:, c::3][levels[..., c]] for c in range(3)], axis=-1)  # [..., T, 3]
        out.append(per_channel.reshape(per_channel.shape[:-2] + (3 * towers,)))
    return jnp.concatenate(out, axis=-1)


class OpenVLAPolicy:
    """``OpenVLAPolicy.from_pretrained(path)``, then ``predict_action(images, instructions)``."""

    def __init__(self, config: OpenVLAConfig, params, tokenizer, norm_stats: dict, max_length: int = 160,
                 normalization: str = "bounds_q99", dtype: str = "float32", quantize: str = "none"):
        if normalization not in A.NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; choose from {A.NORMALIZATIONS}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose from {DTYPES}")
        self.config, self.tokenizer, self.max_length = config, tokenizer, max_length
        self.normalization, self.dtype = normalization, dtype
        # bf16: weights stored in bf16 (half the memory traffic), every product accumulated in fp32.
        # int8 / int4: Dense kernels stored quantized with their scales, each dequantized next to its matmul
        # (inside the layer body when the layers are scanned: one layer's kernels in full precision at a time).
        self.quantize = quantize
        self.params = final_form(params, dtype, quantize)
        self.model = OpenVLA(config, dtype=jnp.dtype(dtype), scan_layers=is_scanned(self.params))
        self.norm_stats = norm_stats
        self.towers = pixel_normalizations(config)
        self.image_size = config.vision[0].image_size
        # predict_action sends resized uint8 images; the pixel values are looked up inside the call
        # (a quarter of the bytes, and no per-call host arithmetic, which dominated small models).
        self._pixels = pixels = partial(_lookup_pixels, jnp.asarray(F.pixel_table(self.towers)))
        jit = partial(jax.jit, compiler_options=weight_loop_options())  # one layer's weights dequantized at a time
        self._greedy = jit(lambda p, *a: greedy_decode(self.model, p, *a, num_tokens=7))
        self._greedy_images = jit(lambda p, images, *a: greedy_decode(self.model, p, pixels(images), *a, num_tokens=7))
        self._parallel_images = jit(lambda p, images, *a: parallel_decode(self.model, p, pixels(images), *a))

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, step: Optional[int] = None,
                        max_length: Optional[int] = None, normalization: Optional[str] = None,
                        action_head: Optional[str] = None, dtype: str = "float32",
                        quantize: str = "none", scan_layers: Optional[bool] = None,
                        progress: bool = False) -> "OpenVLAPolicy":
        """A train workdir / checkpoint, an ovla-jax dir or an HF dir (an OFT one too: its head files
        beside it). ``tokenizer``: a Tokenizer, a spec ("char", "words", a tokenizer dir), or None = the
        training run's, else the checkpoint dir itself when it holds tokenizer files, else "char".
        ``normalization``: how actions (and proprio) were normalized, default the run's or bounds_q99.
        ``action_head``: what the caller expects; a mismatch with the checkpoint is an error.
        ``dtype``: ``float32`` or ``bfloat16`` (bf16 weights and operands, fp32 accumulation: ~2x on CPU).
        ``quantize``: ``none``, ``int8`` (weight-only, per output channel) or ``int4`` (per group of 128
        input rows, two weights a byte); see ``ovla_jax.quantize``. Weights stream from the checkpoint
        straight into that form (``ovla_jax.checkpoints.loader``): peak memory is the final weights + one
        tensor. ``scan_layers``: None = scanned for models over 200M parameters (the 7B), else per-layer."""
        from ovla_jax.checkpoints.loader import load
        from ovla_jax.tokenizer import make_tokenizer

        loaded = load(path, step=step, dtype=dtype, quantize=quantize, scan=scan_layers, progress=progress)
        config, params, norm_stats = loaded.config, loaded.params, loaded.norm_stats
        trained, trained_tokenizer = loaded.trained, loaded.tokenizer
        if action_head is not None and action_head != config.action_head:
            raise ValueError(f"{path}: the checkpoint's action_head is {config.action_head!r} (chunk {config.chunk}), "
                             f"not {action_head!r}")
        if tokenizer is None or isinstance(tokenizer, str):
            spec = tokenizer or trained_tokenizer
            if spec is None:
                spec = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else "char"
            tokenizer = make_tokenizer(spec, config.tokenizer_vocab_size, config.n_action_bins)
        trained = trained or {}
        return cls(config, params, tokenizer, norm_stats, max_length or trained.get("max_length") or 160,
                   normalization or trained.get("normalization") or "bounds_q99", dtype=dtype, quantize=quantize)

    def action_stats(self, unnorm_key: Optional[str] = None) -> dict:
        return pick_stats(self.norm_stats, unnorm_key)

    def resized(self, images: np.ndarray) -> np.ndarray:
        """uint8[B, H, W, 3] -> uint8[B, S, S, 3], resized exactly as the data pipeline resizes each image
        (one traced call for the batch: per-image eager TF ops cost milliseconds of dispatch on a CPU)."""
        return F.resize_batch(images, self.image_size)

    def pixel_values(self, images: np.ndarray) -> np.ndarray:
        """uint8[B, H, W, 3] -> float32[B, S, S, 3 * towers], exactly as the data pipeline makes them."""
        return F.pixel_values_np(self.resized(images), self.towers)

    def prompts(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids, attention_mask) right-padded to ``max_length``. Parallel (OFT) models: the
        prompt, then K * D placeholder slots and the stop token (see :meth:`action_slots`)."""
        slots = self.config.num_action_slots
        ids = np.full((len(instructions), self.max_length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros(ids.shape, bool)
        for i, text in enumerate(instructions):
            row = prompt_ids(self.tokenizer, text)
            if slots:
                row = row + [self.tokenizer.pad_id] * slots + [self.tokenizer.eos_id]
            if len(row) > self.max_length:
                raise ValueError(f"prompt for {text!r} needs {len(row)} tokens; max_length is {self.max_length}")
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        return ids, mask

    def action_slots(self, attention_mask: np.ndarray) -> np.ndarray:
        """bool[B, L]: the K * D slots, which end one token (the stop) before each row's last real token."""
        end = attention_mask.sum(1) - 1  # index of the stop token
        index = np.arange(attention_mask.shape[1])[None]
        return (index >= (end - self.config.num_action_slots)[:, None]) & (index < end[:, None])

    def predict_action_tokens(self, pixel_values, input_ids, attention_mask=None) -> np.ndarray:
        """Low level: model inputs -> int32[B, 7] greedy action tokens (KV-cached decode)."""
        if attention_mask is None:
            attention_mask = np.ones(np.shape(input_ids), bool)
        tokens, _ = self._greedy(self.params, jnp.asarray(pixel_values), jnp.asarray(input_ids),
                                 jnp.asarray(attention_mask))
        return np.asarray(tokens)

    def proprio_values(self, proprio, batch: int, unnorm_key: Optional[str] = None) -> Optional[np.ndarray]:
        """Raw states float[B, P] -> normalized float32[B, P] (as in training), or None for a model without
        proprio; a missing or misshaped state is an error naming the field."""
        from ovla_jax.data.proprio import normalize

        cfg = self.config
        if not cfg.proprio_dim:
            if proprio is not None:
                raise ValueError("proprio was given, but this model reads no proprio state (proprio_dim 0)")
            return None
        if proprio is None:
            raise ValueError(f"proprio: this model reads a {cfg.proprio_dim}-D proprio state; pass proprio=float[B, "
                             f"{cfg.proprio_dim}] (raw, it is normalized here)")
        proprio = np.asarray(proprio, np.float32)
        if proprio.shape != (batch, cfg.proprio_dim):
            raise ValueError(f"proprio must be float[{batch}, {cfg.proprio_dim}], got shape {proprio.shape}")
        stats = pick_stats(self.norm_stats, unnorm_key, field="proprio")
        return np.asarray(normalize(proprio, stats, self.normalization), np.float32)

    def model_pixels(self, images: np.ndarray, wrist_images=None) -> np.ndarray:
        """Every camera the model reads -> pixel_values with the images on the channel axis."""
        return np.asarray(self._pixels(self.model_images(images, wrist_images)))

    def model_images(self, images: np.ndarray, wrist_images=None) -> np.ndarray:
        """Every camera the model reads, resized -> uint8[B, S, S, 3 * cameras] (third-person, then wrist)."""
        cfg = self.config
        if cfg.num_images == 1:
            if wrist_images is not None:
                raise ValueError("wrist_images were given, but this model reads 1 image (num_images 1)")
            return self.resized(images)
        if wrist_images is None:
            raise ValueError(f"wrist_images: this model reads {cfg.num_images} images (third-person, then wrist); "
                             f"pass wrist_images=uint8[B, H, W, 3]")
        wrist_images = np.asarray(wrist_images)
        if wrist_images.shape != images.shape:
            raise ValueError(f"wrist_images has shape {wrist_images.shape}; the images have {images.shape} "
                             f"(one wrist image per example)")
        both = self.resized(np.concatenate([images, wrist_images]))  # one call for both cameras
        return np.concatenate(np.split(both, 2), axis=-1)

    def predict_action(self, images, instructions, unnorm_key: Optional[str] = None, *, wrist_images=None,
                       proprio=None) -> np.ndarray:
        """uint8[H, W, 3] + one instruction -> float32[7], or uint8[B, H, W, 3] + B instructions ->
        float32[B, 7]: actions in the units of dataset ``unnorm_key`` (optional when it knows one).
        Chunked (OFT) models return float32[K, D] / float32[B, K, D], from one forward pass; they may
        also read ``wrist_images`` (like ``images``) and ``proprio`` (raw state float[P] / float[B, P])."""
        single = isinstance(instructions, str)
        images = np.asarray(images)
        if single:
            images, instructions = images[None], [instructions]
            wrist_images = None if wrist_images is None else np.asarray(wrist_images)[None]
            proprio = None if proprio is None else np.asarray(proprio)[None]
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(instructions):
            raise ValueError(f"images must be uint8[B, H, W, 3] with one instruction each; got {images.shape} "
                             f"and {len(instructions)} instruction(s)")
        cameras = self.model_images(images, wrist_images)
        state = self.proprio_values(proprio, len(images), unnorm_key)
        stats = self.action_stats(unnorm_key)
        actions = A.unnormalize(self.predict_normalized(cameras, instructions, state), stats, self.normalization)
        return actions[0] if single else actions

    def predict_normalized(self, cameras: np.ndarray, instructions: Sequence[str], state=None) -> np.ndarray:
        """Low level, in the model's own units: resized images uint8[B, S, S, 3 * cameras] (as the data
        pipeline gives them), B instructions and the normalized state -> normalized actions float32[B, 7]
        (token heads) or float32[B, K, D] (chunked heads). Offline evaluation feeds pipeline frames here."""
        cfg = self.config
        cameras = jnp.asarray(cameras)
        ids, mask = self.prompts(instructions)
        if cfg.parallel:
            normalized, _ = self._parallel_images(self.params, cameras, jnp.asarray(ids), jnp.asarray(mask),
                                                  jnp.asarray(self.action_slots(mask)),
                                                  None if state is None else jnp.asarray(state))
            return np.asarray(normalized)
        tokens, _ = self._greedy_images(self.params, cameras, jnp.asarray(ids), jnp.asarray(mask))
        return A.decode_action_tokens(np.asarray(tokens), cfg.tokenizer_vocab_size, cfg.n_action_bins)


def pick_stats(norm_stats: dict, key: Optional[str], path: str = "the checkpoint", field: str = "action") -> dict:
    """The ``field`` (action / proprio) statistics of dataset ``key``, or of the only dataset the model knows."""
    if key is None:
        if len(norm_stats) != 1:
            raise ValueError(f"{path} knows {len(norm_stats)} datasets {sorted(norm_stats)}: name one to unnormalize with")
        key = next(iter(norm_stats))
    if key not in norm_stats:
        raise ValueError(f"{path} has no statistics for {key!r}; it has {sorted(norm_stats)}")
    if field not in norm_stats[key]:
        raise ValueError(f"{path}: the statistics of {key!r} have no {field!r} entry")
    return norm_stats[key][field]
