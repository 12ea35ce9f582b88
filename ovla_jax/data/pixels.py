"""Inference's pixels, exactly as the data pipeline (``frames.py``) makes them, without importing
TensorFlow unless an image needs resizing: TensorFlow takes ~0.5 GB of a process's memory, which a
policy fed images at the model's size (or a 7B model on a 24 GB machine) should not pay.
"""
from __future__ import annotations

import functools

import numpy as np

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TOWER_NORMS = {"dinov2": (DINO_MEAN, DINO_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


@functools.lru_cache(maxsize=None)
def _batch_resizer(size: int):
    import tensorflow as tf

    from ovla_jax.data.frames import resize

    return tf.function(lambda images: resize(images, size),
                       input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """uint8[B, H, W, 3] -> uint8[B, size, size, 3], the pixels ``frames.resize`` gives each image (resizing
    acts on each image alone; one traced graph instead of a dozen eager ops per call). Images already of
    that size come back as they are: lanczos3 at scale 1 samples each pixel's own center, weight 1."""
    images = np.asarray(images, np.uint8)
    if images.shape[1:3] == (size, size):
        return images
    return _batch_resizer(size)(images).numpy()


def pixel_table(towers=("dinov2", "siglip")) -> np.ndarray:
    """float32[256, 3 * towers]: row v holds :func:`pixel_values_np` of the uint8 level v in every channel,
    so ``table[image[..., c], t * 3 + c]`` is the pixel value of channel c for tower t, bit for bit.
    Inference looks the values up inside its jitted call instead of sending 4-byte floats (a lookup is
    exact on any backend; arithmetic there could be reassociated)."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    return pixel_values_np(levels, towers)


def pixel_values_np(images: np.ndarray, towers=("dinov2", "siglip")) -> np.ndarray:
    """uint8[..., 3] -> float32[..., 3 * towers], bit-identical to ``frames.pixel_values``: the same float32
    operations in the same order, each correctly rounded (numpy instead of TF ops for speed)."""
    x = np.asarray(images).astype(np.float32) / np.float32(255.0)
    return np.concatenate([(x - np.asarray(TOWER_NORMS[t][0], np.float32)) / np.asarray(TOWER_NORMS[t][1], np.float32)
                           for t in towers], axis=-1)
