"""Proprioception: the state vector a dataset gives the model (OFT's proprio token), from the observation
keys its registry entry names, and its normalization (the action's kind, every dim; bounds kinds clipped as OFT)."""
from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from ovla_jax import actions as A
from ovla_jax.data.errors import DataError


def missing_state_keys(traj, spec) -> list:
    """The observation keys ``spec.state_keys`` reads that this (standardized) trajectory lacks."""
    observation = traj["observation"]
    needed = []
    for piece in spec.state_keys:
        needed += [piece] if isinstance(piece, str) else list(getattr(piece, "needs", ()))
    return [k for k in dict.fromkeys(needed) if k not in observation]


def proprio_of(traj, spec) -> tf.Tensor:
    """Standardized trajectory -> float32[T, P]: the pieces of ``spec.state_keys`` concatenated (an
    observation key, a recipe Part, or None = one zero column)."""
    if not spec.state_keys:
        raise DataError(f"dataset {spec.name!r}: the registry names no state keys, so it gives no proprio "
                        f"(set its entry in _STATE_KEYS in ovla_jax/data/oxe/registry.py, or train without proprio)")
    missing = missing_state_keys(traj, spec)
    if missing:
        where = f" (declared in {spec.declared_in})" if spec.declared_in else ""
        raise DataError(f"dataset {spec.name!r}{where}: observation has no state key {missing[0]!r} "
                        f"(it has {sorted(traj['observation'])})")
    observation = traj["observation"]
    length = tf.shape(traj["action"])[0]
    parts = []
    for piece in spec.state_keys:
        if piece is None:
            parts.append(tf.zeros([length, 1], tf.float32))
        elif isinstance(piece, str):
            value = tf.cast(observation[piece], tf.float32)
            parts.append(value[:, None] if value.shape.rank == 1 else value)
        else:
            try:
                parts.append(piece(None, traj))
            except KeyError as e:
                raise DataError(f"dataset {spec.name!r}: state piece {piece!r} reads a field the trajectory "
                                f"lacks: {e}") from None
    return tf.concat(parts, axis=-1)


def normalize(proprio, stats: Mapping, kind: str = "bounds_q99", xp=None):
    """Normalized like the actions of the same dataset, on every dim (no gripper exemption). The bounds
    kinds are clipped to [-1, 1] as OFT does at train and test time; ``normal`` (z-scores) is not clipped,
    as upstream. ``stats`` is the dataset's ``proprio`` entry."""
    import numpy as np

    xp = xp or np
    if kind not in A.NORMALIZATIONS:
        raise DataError(f"unknown normalization {kind!r}; choose from {A.NORMALIZATIONS}")
    full = dict(stats, mask=[True] * len(stats["q01"]))
    normalized = A.normalize(proprio, full, kind, xp=xp)
    return xp.clip(normalized, -1.0, 1.0) if kind.startswith("bounds") else normalized
