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


def max_scaled_diff(a, b) -> float:
    """Largest |a - b| of two pytrees, each leaf's difference divided by that leaf's scale (max |b|; 1 if
    zero). fp32 results that differ only by reduction order (sharding, remat, fusion, another CPU) agree
    to ~1e-6 of their leaf's scale; compare against a tolerance like 1e-4 (a 100x margin)."""
    import jax

    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = np.abs(y).max() if y.size else 0.0
        return float(np.abs(x - y).max() / (scale if scale > 0 else 1.0)) if y.size else 0.0

    return max(jax.tree.leaves(jax.tree.map(one, a, b)), default=0.0)
