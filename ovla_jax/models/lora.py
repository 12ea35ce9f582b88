"""LoRA adapters (Hu et al. 2021) on every linear layer, as upstream's PEFT ``target_modules="all-linear"``.

An adapted Dense computes ``x @ W + b + (dropout(x) @ A) @ B * alpha / rank`` with ``A`` [in, rank]
Gaussian (std 1 / rank, PEFT's "gaussian" init) and ``B`` [rank, out] zeros, so a fresh adapter leaves
the model unchanged. The adapter runs as its own two matmuls (never merged during training), which is
what makes :func:`merge_lora` (``W + A @ B * alpha / rank``, for export and fast inference) a real
identity to test. The LM head is not adapted (PEFT's all-linear skips the output layer).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LORA_PARAMS = ("lora_a", "lora_b")
# Trainable-parameter pattern of the "lora" fine-tuning mode.
LORA_PATTERN = r"/lora_[ab]$"


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int = 32
    alpha: float = 16.0  # upstream: min(rank, 16) (lora_from_config applies it when alpha is None)
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_from_config(cfg) -> Optional[LoRA]:
    """A LoRA from a config mapping with ``rank`` (0 or missing = no adapters), ``alpha`` (None or missing =
    upstream's ``min(rank, 16)``), ``dropout``."""
    if cfg is None or not cfg.get("rank", 0):
        return None
    alpha = cfg.get("alpha")
    return LoRA(rank=int(cfg["rank"]), alpha=float(default_alpha(int(cfg["rank"])) if alpha is None else alpha),
                dropout=float(cfg.get("dropout", 0.0) or 0.0))


def default_alpha(rank: int) -> float:
    """Upstream's rule (``vla-scripts/finetune.py``): alpha = min(rank, 16), i.e. scale 1 up to rank 16."""
    return float(min(rank, 16))


def has_lora(params) -> bool:
    return any(k[-1] in LORA_PARAMS for k in traverse_util.flatten_dict(params))


def merged_kernel(kernel, a, b, lora: LoRA):
    """``W + A @ B * scale`` computed in fp32 and cast back to W's dtype (numpy or jax arrays; leading
    stacked-layer axes allowed)."""
    xp = jnp if not isinstance(kernel, np.ndarray) else np
    delta = xp.asarray(a, np.float32) @ xp.asarray(b, np.float32) * np.float32(lora.scale)
    return (xp.asarray(kernel, np.float32) + delta).astype(kernel.dtype)


def merge_lora(params, lora: LoRA):
    """Params of an adapted model -> params of the plain model (same tree minus the adapters), with
    every adapted kernel replaced by :func:`merged_kernel`. Works on numpy or jax arrays."""
    flat = traverse_util.flatten_dict(params)
    merged = {}
    for path, value in flat.items():
        if path[-1] in LORA_PARAMS:
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            value = merged_kernel(value, flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)], lora)
        merged[path] = value
    return traverse_util.unflatten_dict(merged)
