"""Frame transforms: decode, resize, augment, and the pixel values each vision tower expects.

Images: decoded to uint8, resized with ``tf.image.resize(method="lanczos3", antialias=True)``, rounded
and clipped to uint8 (inference must do the same). Augmentation (training only, seeded per frame so
it is reproducible): random resized crop (scale 0.9, ratio 1.0) -> brightness 0.2 -> contrast
[0.8, 1.2] -> saturation [0.8, 1.2] -> hue 0.05, in that order (the official order and parameters).
"""
from __future__ import annotations

import math

import tensorflow as tf

# Inference's pixels (no TensorFlow needed to import them) are the pipeline's own; re-exported here.
from ovla_jax.data.pixels import (TOWER_NORMS, pixel_table, pixel_values_np, resize_batch)  # noqa: F401

CROP_SCALE = 0.9


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG bytes (scalar) -> uint8[H, W, 3]; an empty string (missing camera) -> all-zero 1x1."""
    return tf.cond(tf.strings.length(encoded) > 0,
                   lambda: tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False), [None, None, 3]),
                   lambda: tf.zeros([1, 1, 3], tf.uint8))


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8[H, W, 3] -> uint8[size, size, 3] (lanczos3 + antialias, round, clip)."""
    out = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """uint8[S, S, 3] -> uint8[S, S, 3]; ``seed`` int32[2]. Deterministic per seed."""
    size = tf.shape(image)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    x = tf.cast(image, tf.float32) / 255.0
    # Random resized crop with fixed scale 0.9 and aspect ratio 1: a square of side sqrt(0.9) at a random offset.
    side = math.sqrt(CROP_SCALE)
    offset = tf.random.stateless_uniform([2], seed=seeds[0], maxval=1.0 - side)
    box = tf.concat([offset, offset + side], axis=0)[None]
    x = tf.image.crop_and_resize(x[None], box, [0], tf.stack([size, size]))[0]
    x = tf.clip_by_value(tf.image.stateless_random_brightness(x, 0.2, seed=seeds[1]), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.stateless_random_contrast(x, 0.8, 1.2, seed=seeds[2]), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.stateless_random_saturation(x, 0.8, 1.2, seed=seeds[3]), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.stateless_random_hue(x, 0.05, seed=seeds[4]), 0.0, 1.0)
    return tf.cast(tf.clip_by_value(tf.round(x * 255.0), 0, 255), tf.uint8)


def center_crop(image: tf.Tensor, scale: float = CROP_SCALE) -> tf.Tensor:
    """Evaluation counterpart of the crop augmentation: the centered sqrt(scale) square, resized back."""
    size = tf.shape(image)[0]
    side = math.sqrt(scale)
    lo = (1.0 - side) / 2.0
    x = tf.image.crop_and_resize(tf.cast(image, tf.float32)[None], [[lo, lo, lo + side, lo + side]], [0],
                                 tf.stack([size, size]))[0]
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def pixel_values(image: tf.Tensor, towers=("dinov2", "siglip")) -> tf.Tensor:
    """uint8[S, S, 3] -> float32[S, S, 3 * towers]: the image normalized once per tower, concatenated."""
    x = tf.cast(image, tf.float32) / 255.0
    parts = [(x - tf.constant(TOWER_NORMS[t][0])) / tf.constant(TOWER_NORMS[t][1]) for t in towers]
    return tf.concat(parts, axis=-1)
