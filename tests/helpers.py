"""Shared test helpers: random params for a config (by name map), fixed inputs."""
import numpy as np
from flax import traverse_util

from ovla_jax.checkpoints import hf


def random_params(config, seed: int = 0, dtype=np.float32, scale: float = 0.1) -> dict:
    """Non-trivial random params (no zero biases, no unit norms) so every tensor matters."""
    rng = np.random.default_rng(seed)
    flat = {}
    for e in hf.name_map(config):
        value = rng.standard_normal(e.jax_shape) * scale
        if e.path[-1] in ("scale",) or e.hf_name.endswith("norm.weight") or "norm1" in e.path or "norm2" in e.path:
            value = 1.0 + value if e.path[-1] == "scale" else value
        flat[e.path] = value.astype(dtype)
    return traverse_util.unflatten_dict(flat)


def random_pixels(config, batch: int, seed: int = 1) -> np.ndarray:
    size = config.vision[0].image_size
    return np.random.default_rng(seed).uniform(-2, 2, (batch, size, size, 3 * len(config.vision))).astype(np.float32)
