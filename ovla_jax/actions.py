"""Continuous actions <-> discrete action tokens, and per-dataset action normalization.

OpenVLA discretizes each normalized action dimension into 256 uniform bins over [-1, 1] and maps bin
``k`` to token ``vocab_size - k``: the action tokens are the LAST 256 ids of the tokenizer's vocabulary
(for Llama-2, ids 31744..31999, which overwrite rarely used word pieces). ``vocab_size`` is the
tokenizer's size (32000 for Llama-2), not the padded embedding size (32064).

Works on numpy and jax.numpy arrays alike (pass ``xp=jnp`` for traced code).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

N_ACTION_BINS = 256
ACTION_DIM = 7  # 6-D end-effector delta + gripper
LLAMA2_VOCAB_SIZE = 32000
NORM_EPS = 1e-8


def bin_edges(n_bins: int = N_ACTION_BINS) -> np.ndarray:
    """float[n_bins] uniform edges over [-1, 1] (the official ``np.linspace(-1, 1, n_bins)``)."""
    return np.linspace(-1.0, 1.0, n_bins)


def bin_centers(n_bins: int = N_ACTION_BINS) -> np.ndarray:
    """float[n_bins - 1] midpoints of adjacent edges: what a token decodes to."""
    edges = bin_edges(n_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def encode_actions(actions, vocab_size: int = LLAMA2_VOCAB_SIZE, n_bins: int = N_ACTION_BINS, xp=np):
    """float[..., A] normalized actions -> int32[..., A] token ids (``vocab_size - digitize``)."""
    # numpy keeps upstream's float64 edges (bit-identical bins); jax uses its default float width.
    precise = xp.float64 if xp is np else xp.float32
    edges = xp.asarray(bin_edges(n_bins), dtype=precise)
    clipped = xp.clip(xp.asarray(actions), -1.0, 1.0).astype(precise)
    # np.digitize(x, edges) == searchsorted(edges, x, side="right") for increasing edges.
    digitized = xp.searchsorted(edges, clipped, side="right")
    return (vocab_size - digitized).astype(xp.int32)


def decode_action_tokens(tokens, vocab_size: int = LLAMA2_VOCAB_SIZE, n_bins: int = N_ACTION_BINS, xp=np):
    """int[..., A] token ids -> float32[..., A] normalized actions (bin centers)."""
    centers = xp.asarray(bin_centers(n_bins), dtype=xp.float32)
    index = xp.clip(vocab_size - xp.asarray(tokens).astype(xp.int32) - 1, 0, n_bins - 2)
    return centers[index]


def is_action_token(tokens, vocab_size: int = LLAMA2_VOCAB_SIZE, n_bins: int = N_ACTION_BINS, xp=np):
    """bool[...]: the id lies in the action-token range [vocab_size - n_bins, vocab_size)."""
    tokens = xp.asarray(tokens)
    return (tokens >= vocab_size - n_bins) & (tokens < vocab_size)


def _stats_arrays(stats: Mapping[str, Any], keys, xp):
    missing = [k for k in keys if k not in stats]
    if missing:
        raise KeyError(f"action statistics lack {missing}; they have {sorted(stats)}")
    return [xp.asarray(stats[k], dtype=xp.float32) for k in keys]


def _mask(stats: Mapping[str, Any], like, xp):
    mask = stats.get("mask")
    if mask is None:
        return xp.ones(like.shape[-1], dtype=bool)
    return xp.asarray(mask, dtype=bool)


def normalize_bounds_q99(actions, stats: Mapping[str, Any], xp=np):
    """BOUNDS_Q99: ``clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)`` where ``stats["mask"]``."""
    q01, q99 = _stats_arrays(stats, ("q01", "q99"), xp)
    actions = xp.asarray(actions, dtype=xp.float32)
    normalized = xp.clip(2.0 * (actions - q01) / (q99 - q01 + NORM_EPS) - 1.0, -1.0, 1.0)
    return xp.where(_mask(stats, actions, xp), normalized, actions)


def unnormalize_bounds_q99(actions, stats: Mapping[str, Any], xp=np):
    """Inverse of :func:`normalize_bounds_q99` (unmasked dims, e.g. the gripper, pass through)."""
    q01, q99 = _stats_arrays(stats, ("q01", "q99"), xp)
    actions = xp.asarray(actions, dtype=xp.float32)
    restored = 0.5 * (actions + 1.0) * (q99 - q01) + q01
    return xp.where(_mask(stats, actions, xp), restored, actions)


def normalize_normal(actions, stats: Mapping[str, Any], xp=np):
    """NORMAL: ``(a - mean) / (std + 1e-8)`` where ``stats["mask"]``."""
    mean, std = _stats_arrays(stats, ("mean", "std"), xp)
    actions = xp.asarray(actions, dtype=xp.float32)
    return xp.where(_mask(stats, actions, xp), (actions - mean) / (std + NORM_EPS), actions)


def unnormalize_normal(actions, stats: Mapping[str, Any], xp=np):
    """Inverse of :func:`normalize_normal`."""
    mean, std = _stats_arrays(stats, ("mean", "std"), xp)
    actions = xp.asarray(actions, dtype=xp.float32)
    return xp.where(_mask(stats, actions, xp), actions * (std + NORM_EPS) + mean, actions)


NORMALIZATIONS = ("bounds_q99", "bounds", "normal")


def _as_bounds(stats: Mapping[str, Any]) -> dict:
    """BOUNDS (ALOHA in OFT) is BOUNDS_Q99 with min/max in place of the 1st/99th percentiles."""
    return dict(stats, q01=stats["min"], q99=stats["max"])


def _bounds_pair(fn):
    return lambda actions, stats, xp=np: fn(actions, _as_bounds(stats), xp=xp)


# kind -> (normalize, unnormalize)
_NORMALIZERS = {
    "bounds_q99": (normalize_bounds_q99, unnormalize_bounds_q99),
    "bounds": (_bounds_pair(normalize_bounds_q99), _bounds_pair(unnormalize_bounds_q99)),
    "normal": (normalize_normal, unnormalize_normal),
}


def _normalizer(kind: str, inverse: bool):
    if kind not in _NORMALIZERS:
        raise ValueError(f"unknown normalization {kind!r}; choose from {NORMALIZATIONS}")
    return _NORMALIZERS[kind][int(inverse)]


def normalize(actions, stats: Mapping[str, Any], kind: str = "bounds_q99", xp=np):
    """Normalize by name: ``bounds_q99`` (OpenVLA), ``bounds`` (min/max), ``normal`` (mean/std)."""
    return _normalizer(kind, False)(actions, stats, xp=xp)


def unnormalize(actions, stats: Mapping[str, Any], kind: str = "bounds_q99", xp=np):
    """Inverse of :func:`normalize`."""
    return _normalizer(kind, True)(actions, stats, xp=xp)
