"""ovla-jax's checkpoint dir: the official ``config.json`` (model + norm_stats, the same file an HF
export writes), ``params*.safetensors`` keyed by Flax path in Flax layout, and the carried files
(tokenizer, ...). Safetensors rather than orbax so conversion streams tensor by tensor and a sharded
restore can read just each device's slice; orbax holds training state (params + optimizer + step).
"""
from __future__ import annotations

from typing import Optional

from ovla_jax import fileio
from ovla_jax.checkpoints import hf
from ovla_jax.models.config import OpenVLAConfig


def is_jax_checkpoint(path: str) -> bool:
    return fileio.isfile(fileio.join(path, hf.CONFIG_FILE)) and any(
        f.startswith(hf.JAX.stem) and f.endswith(".safetensors") for f in fileio.listdir(path))


def save_jax_checkpoint(path: str, config: OpenVLAConfig, params: dict, norm_stats: Optional[dict] = None,
                        **kwargs) -> None:
    """params -> ovla-jax checkpoint dir, atomically (temp dir, then rename)."""
    hf.save_checkpoint(path, hf.JAX, config, params, norm_stats, **kwargs)


def load_jax_checkpoint(path: str, dtype: Optional[str] = None, progress: bool = False) -> tuple[OpenVLAConfig, dict, dict]:
    """ovla-jax checkpoint dir -> (config, params as numpy, norm_stats); strictly checked against config.json."""
    return hf.load_checkpoint(path, hf.JAX, dtype, progress)
