"""Trajectory transforms: operate on whole trajectories, never on decoded images.

Input/output: dicts with a leading time axis T. ``chunk`` adds a window axis W to the observation
(``observation/*`` [T, W, ...], ``pad_mask`` [T, W]) and an action chunk axis (``action`` [T, W + F, A],
``action_pad_mask``); OpenVLA uses W = 1, F = 0.
"""
from __future__ import annotations

import tensorflow as tf


def has_language(traj) -> tf.Tensor:
    """Filter predicate: the trajectory has a non-empty instruction (upstream's skip-unlabeled)."""
    return tf.strings.length(traj["task"]["language_instruction"][0]) > 0


def chunk(traj, window: int = 1, future: int = 0):
    """Window the observation (past ``window`` frames, clamped at the start, with a pad mask) and chunk
    the actions (the window's actions plus ``future`` more, clamped at the end, with a pad mask)."""
    length = tf.shape(traj["action"])[0]
    t = tf.range(length)[:, None]
    obs_index = t + tf.range(-window + 1, 1)[None]  # [T, W]
    act_index = t + tf.range(-window + 1, future + 1)[None]  # [T, W + F]
    traj = dict(traj)
    traj["observation"] = tf.nest.map_structure(lambda x: tf.gather(x, tf.maximum(obs_index, 0)), traj["observation"])
    traj["pad_mask"] = obs_index >= 0
    traj["action"] = tf.gather(traj["action"], tf.clip_by_value(act_index, 0, length - 1))
    traj["action_pad_mask"] = (act_index >= 0) & (act_index < length)
    return traj


def subsample(traj, max_length: int, seed):
    """Keep at most ``max_length`` frames, chosen uniformly without replacement (in time order)."""
    length = tf.shape(traj["action"])[0]
    keys = tf.random.stateless_uniform([length], seed=seed)
    keep = tf.sort(tf.math.top_k(keys, k=tf.minimum(length, max_length)).indices)
    return tf.nest.map_structure(lambda x: tf.gather(x, keep), traj)


def truncate(traj, max_length: int):
    """Drop frames past ``max_length``."""
    return tf.nest.map_structure(lambda x: x[:max_length], traj)


def uniform_goal_relabel(traj, seed):
    """Goal images drawn uniformly from each frame's future (t' in [t, T)), as ``task/<image key>``."""
    length = tf.shape(traj["action"])[0]
    u = tf.random.stateless_uniform([length], seed=seed)
    start = tf.range(length)
    goal = start + tf.cast(u * tf.cast(length - start, tf.float32), tf.int32)
    goal = tf.minimum(goal, length - 1)
    traj = dict(traj)
    traj["task"] = dict(traj["task"])
    for key, value in traj["observation"].items():
        if key.startswith("image_"):
            traj["task"][key] = tf.gather(value, goal)
    return traj
