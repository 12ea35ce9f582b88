"""Action recipes: most OXE datasets standardize by concatenating pieces of their raw action (or of a
dict of action fields) with a gripper signal converted to 1 = open / 0 = closed. A recipe is a list
of ``Part``s; its description is part of the statistics cache key, so editing a recipe recomputes them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Part:
    """A function (raw action, trajectory) -> float32[T, k], with a readable description."""

    fn: Callable
    desc: str
    needs: tuple = ()  # observation keys it reads (checked up front, so a missing one is a named error)

    def __call__(self, action, traj):
        return tf.cast(self.fn(action, traj), tf.float32)

    def __repr__(self):  # the description, not the function's address: it is part of the stats cache key
        return self.desc


def cols(start: Optional[int] = None, stop: Optional[int] = None, key: Optional[str] = None) -> Part:
    """Columns [start:stop] of the action (or of the action field ``key``)."""
    def fn(a, _):
        a = tf.convert_to_tensor(a[key] if key else a)
        a = a[:, None] if a.shape.rank == 1 else a
        return a[:, start:stop]
    return Part(fn, f"{key or 'action'}[{start}:{stop}]")


def field(path: str, start: Optional[int] = None, stop: Optional[int] = None) -> Part:
    """Columns of another trajectory field, by slash path (DROID keeps its actions in ``action_dict``)."""
    def fn(_, traj):
        value = traj
        for key in path.split("/"):
            value = value[key]
        value = tf.convert_to_tensor(value)
        return (value[:, None] if value.shape.rank == 1 else value)[:, start:stop]
    return Part(fn, f"{path}[{start}:{stop}]")


def obs(key: str, start: Optional[int] = None, stop: Optional[int] = None) -> Part:
    """Columns of one observation field by its exact key (OXE keys may hold slashes: ``present/xyz``);
    a piece of a dataset's proprio state."""
    def fn(_, traj):
        value = tf.convert_to_tensor(traj["observation"][key])
        return (value[:, None] if value.shape.rank == 1 else value)[:, start:stop]
    return Part(fn, f"observation/{key}[{start}:{stop}]", needs=(key,))


def zlib_floats(key: str, width: int) -> Part:
    """An observation field stored as zlib-compressed float32 bytes per step (Kuka's state)."""
    def fn(_, traj):
        raw = tf.io.decode_raw(tf.io.decode_compressed(traj["observation"][key], compression_type="ZLIB"), tf.float32)
        return tf.reshape(raw, [-1, width])
    return Part(fn, f"zlib(observation/{key})[{width}]", needs=(key,))


def zeros(n: int) -> Part:
    return Part(lambda a, t: tf.zeros([_length(t), n]), f"zeros({n})")


def ones(n: int) -> Part:
    return Part(lambda a, t: tf.ones([_length(t), n]), f"ones({n})")


def state(start: int, stop: int) -> Part:
    """Observation state columns (for datasets that store no gripper action)."""
    return Part(lambda a, t: t["observation"]["state"][:, start:stop], f"state[{start}:{stop}]")


def inverted(part: Part) -> Part:
    """1 - x: datasets whose gripper reads 1 = closed."""
    return Part(lambda a, t: 1.0 - part(a, t), f"invert({part.desc})")


def clipped(part: Part) -> Part:
    """Clip to [0, 1] (gripper commands stored in [-1, 1])."""
    return Part(lambda a, t: tf.clip_by_value(part(a, t), 0.0, 1.0), f"clip01({part.desc})")


def binarized(part: Part) -> Part:
    return Part(lambda a, t: binarize_gripper(part(a, t)[:, 0])[:, None], f"binarize({part.desc})")


def absolute(part: Part) -> Part:
    """Relative gripper commands (+1 close, -1 open, 0 hold) -> absolute state (1 open, 0 closed)."""
    return Part(lambda a, t: relative_to_absolute_gripper(part(a, t)[:, 0])[:, None], f"rel2abs({part.desc})")


def euler_from_quat(start: int) -> Part:
    """Quaternion (x, y, z, w) at columns [start:start+4] -> roll, pitch, yaw."""
    return Part(lambda a, t: quaternion_to_euler(a[:, start:start + 4]), f"euler(action[{start}:{start + 4}])")


def _length(traj):
    return tf.shape(tf.nest.flatten(traj["observation"])[0])[0]


def binarize_gripper(gripper, open_above: float = 0.95, closed_below: float = 0.05):
    """Continuous gripper float[T] -> {0, 1}: values between the thresholds take the state of the next
    decided step (scanning back from the end), so a closing motion is labelled closed from its start."""
    gripper = tf.cast(gripper, tf.float32)
    is_open = tf.cast(gripper > open_above, tf.float32)
    undecided = tf.logical_not((gripper > open_above) | (gripper < closed_below))
    return tf.scan(lambda later, t: tf.where(undecided[t], later, is_open[t]), tf.range(tf.shape(gripper)[0]),
                   initializer=gripper[-1], reverse=True)


def relative_to_absolute_gripper(relative):
    """float[T] relative commands -> float[T] absolute: each step holds the last nonzero command; before
    the first command the gripper is in the opposite state (open if no command at all)."""
    relative = tf.cast(relative, tf.float32)
    command = tf.where(relative < -0.1, 1, tf.where(relative > 0.1, -1, 0))  # +1 open, -1 close
    first = command[tf.argmax(tf.cast(command != 0, tf.int32))]
    start = tf.where(first == 0, 1, -first)
    held = tf.scan(lambda prev, c: tf.where(c == 0, prev, c), command, initializer=start)
    return tf.cast(held, tf.float32) / 2.0 + 0.5


def quaternion_to_euler(q):
    """float[T, 4] quaternions (x, y, z, w) -> float[T, 3] extrinsic xyz Euler angles (roll, pitch, yaw)."""
    x, y, z, w = tf.unstack(tf.cast(q, tf.float32), axis=-1)
    roll = tf.atan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    pitch = tf.asin(tf.clip_by_value(2.0 * (w * y - z * x), -1.0, 1.0))
    yaw = tf.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return tf.stack([roll, pitch, yaw], axis=-1)


def recipe(*parts: Part, language_from_observation: bool = False, drop_first: bool = False) -> Callable:
    """A standardization transform: action = concat(parts); optionally the instruction lives in
    ``observation/natural_language_instruction``."""
    def standardize(traj):
        traj = dict(traj)
        traj["action"] = tf.concat([p(traj["action"], traj) for p in parts], axis=-1)
        if language_from_observation:
            traj["language_instruction"] = traj["observation"]["natural_language_instruction"]
        return traj

    standardize.recipe = " + ".join(p.desc for p in parts) + (" ; language from observation" if language_from_observation else "")
    return standardize


def language_table_instruction(traj):
    """Language Table stores the instruction as zero-padded unicode code points."""
    text = tf.strings.unicode_encode(tf.cast(traj["observation"]["instruction"], tf.int32), output_encoding="UTF-8")
    traj = dict(traj)
    traj["language_instruction"] = tf.strings.split(text, "\x00")[:, :1].to_tensor()[:, 0]
    return traj
