"""Per-dataset standardization: raw RLDS trajectory -> ``action`` float32[T, 7] = EEF delta xyz (3) +
delta roll-pitch-yaw (3) + gripper (1 = open, 0 = closed), keeping the observation keys the registry
names and ``language_instruction``. One function per dataset family, written from each dataset's
documented raw schema; trajectories keep their time axis.
"""
from __future__ import annotations

from typing import Any, Dict

import tensorflow as tf

Trajectory = Dict[str, Any]


def binarize_gripper(gripper: tf.Tensor, open_above: float = 0.95, closed_below: float = 0.05) -> tf.Tensor:
    """Continuous gripper commands float[T] -> {0, 1}: values between the thresholds take the state of the
    next decided step (scanning back from the end), so a closing motion is labelled closed from its start."""
    gripper = tf.cast(gripper, tf.float32)
    is_open = tf.cast(gripper > open_above, tf.float32)
    undecided = tf.logical_not((gripper > open_above) | (gripper < closed_below))

    def step(later, t):
        return tf.where(undecided[t], later, is_open[t])

    return tf.scan(step, tf.range(tf.shape(gripper)[0]), initializer=gripper[-1], reverse=True)


def _drop_first_step(traj: Trajectory) -> Trajectory:
    """Bridge's first step has an all-zero action: drop it from every per-step field."""
    return {k: (v if k == "traj_metadata" else tf.nest.map_structure(lambda x: x[1:], v)) for k, v in traj.items()}


def _relabel_with_achieved_motion(traj: Trajectory) -> Trajectory:
    """Replace Bridge's commanded motion by the achieved EEF motion state[t+1] - state[t] (the commands
    do not match what the robot did); the last step, without a successor, is dropped."""
    state = traj["observation"]["state"]
    motion = state[1:, :6] - state[:-1, :6]
    out = tf.nest.map_structure(lambda x: x[:-1], traj)
    out["action"] = tf.concat([motion, traj["action"][:-1, -1:]], axis=1)
    return out


def bridge_orig(traj: Trajectory) -> Trajectory:
    """Bridge V2 as released on the project site (``bridge_orig`` / ``bridge_dataset``): action [T, 7]
    with a continuous gripper; state [T, 7] = EEF xyz + rpy + gripper."""
    traj = _drop_first_step(traj)
    traj["action"] = tf.concat([traj["action"][:, :6], binarize_gripper(traj["action"][:, -1])[:, None]], axis=1)
    traj = _relabel_with_achieved_motion(traj)
    traj["observation"]["EEF_state"] = traj["observation"]["state"][:, :6]
    traj["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return traj


def bridge_oxe(traj: Trajectory) -> Trajectory:
    """Bridge V2 as stored in the OXE bucket: action is a dict (world_vector, rotation_delta, open_gripper)
    and the instruction sits in the observation."""
    traj = {k: (v if k == "traj_metadata" else tf.nest.map_structure(lambda x: x[1:], v)) for k, v in traj.items()}
    action = traj["action"]
    traj["action"] = tf.concat([action["world_vector"], action["rotation_delta"],
                                tf.cast(action["open_gripper"][:, None], tf.float32)], axis=-1)
    traj["language_instruction"] = traj["observation"]["natural_language_instruction"]
    traj = _relabel_with_achieved_motion(traj)
    traj["observation"]["EEF_state"] = traj["observation"]["state"][:, :6]
    traj["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return traj


def identity(traj: Trajectory) -> Trajectory:
    """Datasets already in the standard form (e.g. the built-in demo dataset)."""
    return traj
