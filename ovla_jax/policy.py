"""A trained OpenVLA as a batched policy: (images, instructions) -> unnormalized 7-D actions.

Preprocessing is the training pipeline's own (lanczos3 resize, per-tower pixel normalization, the
OpenVLA prompt), prompts are right-padded to one fixed length so one compiled decode serves every
batch, and the 7 action tokens come from the KV-cached greedy decoder. Checkpoints of any kind load
here: an ``ovla-jax train`` workdir (LoRA merged), an ovla-jax dir, or an HF PyTorch dir.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovla_jax import actions as A
from ovla_jax.models.config import OpenVLAConfig, pixel_normalizations
from ovla_jax.models.openvla import OpenVLA, greedy_decode
from ovla_jax.data.batch import prompt_ids


class OpenVLAPolicy:
    """``OpenVLAPolicy.from_pretrained(path)``, then ``predict_action(images, instructions)``."""

    def __init__(self, config: OpenVLAConfig, params, tokenizer, norm_stats: dict, max_length: int = 160):
        self.config, self.tokenizer, self.max_length = config, tokenizer, max_length
        self.model = OpenVLA(config)
        self.params = jax.device_put(params)
        self.norm_stats = norm_stats
        self.towers = pixel_normalizations(config)
        self.image_size = config.vision[0].image_size

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, step: Optional[int] = None,
                        max_length: Optional[int] = None) -> "OpenVLAPolicy":
        """A train workdir / checkpoint, an ovla-jax dir or an HF dir. ``tokenizer``: a Tokenizer, a
        spec ("char", "words", a tokenizer dir), or None = the training run's, else the checkpoint dir
        itself when it holds tokenizer files, else "char"."""
        from ovla_jax.train.loop import make_tokenizer

        config, params, norm_stats, trained_length, trained_tokenizer = load_checkpoint_any(path, step)
        if tokenizer is None or isinstance(tokenizer, str):
            spec = tokenizer or trained_tokenizer
            if spec is None:
                spec = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else "char"
            tokenizer = make_tokenizer(spec, config)
        return cls(config, params, tokenizer, norm_stats, max_length or trained_length or 160)

    def action_stats(self, unnorm_key: Optional[str] = None) -> dict:
        return pick_stats(self.norm_stats, unnorm_key)

    def pixel_values(self, images: np.ndarray) -> np.ndarray:
        """uint8[B, H, W, 3] -> float32[B, S, S, 3 * towers], exactly as the data pipeline makes them."""
        import tensorflow as tf

        from ovla_jax.data import frames as F

        batch = tf.convert_to_tensor(np.asarray(images, np.uint8))
        resized = tf.map_fn(lambda im: F.resize(im, self.image_size), batch)
        return tf.map_fn(lambda im: F.pixel_values(im, self.towers), resized, fn_output_signature=tf.float32).numpy()

    def prompts(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(instructions), self.max_length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros(ids.shape, bool)
        for i, text in enumerate(instructions):
            row = prompt_ids(self.tokenizer, text)
            if len(row) > self.max_length:
                raise ValueError(f"prompt for {text!r} needs {len(row)} tokens; max_length is {self.max_length}")
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        return ids, mask

    def predict_action_tokens(self, pixel_values, input_ids, attention_mask=None) -> np.ndarray:
        """Low level: model inputs -> int32[B, 7] greedy action tokens (KV-cached decode)."""
        if attention_mask is None:
            attention_mask = np.ones(np.shape(input_ids), bool)
        tokens, _ = greedy_decode(self.model, self.params, jnp.asarray(pixel_values), jnp.asarray(input_ids),
                                  jnp.asarray(attention_mask), num_tokens=7)
        return np.asarray(tokens)

    def predict_action(self, images, instructions, unnorm_key: Optional[str] = None) -> np.ndarray:
        """uint8[H, W, 3] + one instruction -> float32[7], or uint8[B, H, W, 3] + B instructions ->
        float32[B, 7]: actions in the units of dataset ``unnorm_key`` (optional when it knows one)."""
        single = isinstance(instructions, str)
        images = np.asarray(images)
        if single:
            images, instructions = images[None], [instructions]
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(instructions):
            raise ValueError(f"images must be uint8[B, H, W, 3] with one instruction each; got {images.shape} "
                             f"and {len(instructions)} instruction(s)")
        ids, mask = self.prompts(instructions)
        tokens = self.predict_action_tokens(self.pixel_values(images), ids, mask)
        normalized = A.decode_action_tokens(tokens, self.config.tokenizer_vocab_size, self.config.n_action_bins)
        actions = A.unnormalize_bounds_q99(normalized, self.action_stats(unnorm_key))
        return actions[0] if single else actions


def load_checkpoint_any(path: str, step: Optional[int] = None):
    """-> (config, host params, norm_stats, max_length, tokenizer spec) from a train workdir / checkpoint
    (which records its prompt length and tokenizer), an ovla-jax dir or an HF dir (None for both)."""
    from ovla_jax.checkpoints.errors import CheckpointError
    from ovla_jax.checkpoints.hf import load_hf_checkpoint
    from ovla_jax.checkpoints.jax_format import is_jax_checkpoint, load_jax_checkpoint
    from ovla_jax.train import checkpoint as TC

    if TC.is_train_checkpoint(path):
        config, params, norm_stats, meta = TC.load_params(path, step)
        train_config = meta.get("train_config", {})
        return config, params, norm_stats, train_config.get("max_length"), train_config.get("tokenizer")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if is_jax_checkpoint(path):
        return (*load_jax_checkpoint(path), None, None)
    return (*load_hf_checkpoint(path, dtype="float32"), None, None)


def pick_stats(norm_stats: dict, key: Optional[str], path: str = "the checkpoint") -> dict:
    """The action statistics to unnormalize with: ``key``, or the only dataset the model knows."""
    if key is None:
        if len(norm_stats) != 1:
            raise ValueError(f"{path} knows {len(norm_stats)} datasets {sorted(norm_stats)}: name one to unnormalize with")
        key = next(iter(norm_stats))
    if key not in norm_stats:
        raise ValueError(f"{path} has no statistics for {key!r}; it has {sorted(norm_stats)}")
    return norm_stats[key]["action"]
