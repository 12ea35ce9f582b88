"""Proprioception: the state vector a dataset gives the model (OFT's proprio token), from the observation
keys its registry entry names, and its normalization (the action's kind, every dim, clipped as OFT)."""
from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from ovla_jax import actions as A
from ovla_jax.data.errors import DataError


def proprio_of(traj, spec) -> tf.Tensor:
    """Standardized trajectory -> float32[T, P]: ``spec.state_keys`` concatenated (None = a zero column)."""
    if not spec.state_keys:
        raise DataError(f"dataset {spec.name!r}: the registry names no state keys, so it gives no proprio "
                        f"(set state_keys in ovla_jax/data/oxe/registry.py, or train without proprio)")
    observation = traj["observation"]
    length = tf.shape(traj["action"])[0]
    parts = []
    for key in spec.state_keys:
        if key is None:
            parts.append(tf.zeros([length, 1], tf.float32))
            continue
        if key not in observation:
            raise DataError(f"dataset {spec.name!r}: observation has no state key {key!r} "
                            f"(it has {sorted(observation)})")
        value = tf.cast(observation[key], tf.float32)
        parts.append(value[:, None] if value.shape.rank == 1 else value)
    return tf.concat(parts, axis=-1)


def normalize(proprio, stats: Mapping, kind: str = "bounds_q99", xp=None):
    """Normalized like the actions of the same dataset, on every dim (no gripper exemption), and clipped
    to [-1, 1] as OFT does at train and test time. ``stats`` is the dataset's ``proprio`` entry."""
    import numpy as np

    xp = xp or np
    if kind not in A.NORMALIZATIONS:
        raise DataError(f"unknown normalization {kind!r}; choose from {A.NORMALIZATIONS}")
    full = dict(stats, mask=[True] * len(stats["q01"]))
    return xp.clip(A.normalize(proprio, full, kind, xp=xp), -1.0, 1.0)
