"""HDF5 episodes in the two common layouts:

- **robomimic** (also LIBERO's demos): one file, ``data/demo_<i>/actions`` [T, A] and
  ``data/demo_<i>/obs/<key>``; cameras are the uint8 [T, H, W, 3] observations (``agentview_image``, ...),
  the state the low-dimensional keys named by ``--state-keys`` (concatenated). The instruction comes from
  ``--instruction``, a demo's ``language_instruction`` attribute, or LIBERO's ``problem_info``.
- **ACT / ALOHA**: a directory of ``episode_<i>.hdf5`` files, each with ``/action`` [T, A],
  ``/observations/qpos`` (the state) and ``/observations/images/<camera>`` [T, H, W, 3] (or JPEG bytes
  per row when the recorder compressed them).

Needs h5py (installed with TensorFlow; also in the ``[import]`` extra).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from ovla_jax.data.errors import DataError
from ovla_jax.data.importers import Episode, Layout, Reader


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("reading HDF5 needs h5py: pip install 'ovla-jax[import]'") from None
    return h5py


def _number(name: str) -> int:
    digits = re.findall(r"\d+", os.path.splitext(os.path.basename(name))[0])  # not the 5 of ".hdf5"
    return int(digits[-1]) if digits else -1


def _is_image(dataset) -> bool:
    return dataset.dtype == np.uint8 and dataset.ndim == 4 and dataset.shape[-1] == 3


def _is_jpeg_rows(dataset) -> bool:
    return dataset.dtype == np.uint8 and dataset.ndim == 2


def open_hdf5(source: str, **options) -> Reader:
    """A robomimic file, or an ACT episode file / directory of them."""
    h5py = _h5py()
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.hdf5")) + glob.glob(os.path.join(source, "*.h5")), key=_number)
        if not files:
            raise DataError(f"HDF5 source {source}: no .hdf5 / .h5 files in this directory")
        return ACTReader(files, source, **options)
    if not os.path.isfile(source):
        raise DataError(f"HDF5 source {source}: not found")
    with h5py.File(source, "r") as f:
        robomimic = "data" in f and any(k.startswith("demo") for k in f["data"])
    return RobomimicReader(source, **options) if robomimic else ACTReader([source], source, **options)


def _instruction(explicit: Optional[str], attrs: Sequence, where: str) -> str:
    if explicit is not None:
        return explicit
    for a in attrs:
        if "language_instruction" in a:
            value = a["language_instruction"]
            return value.decode() if isinstance(value, bytes) else str(value)
        if "problem_info" in a:  # LIBERO
            info = a["problem_info"]
            info = json.loads(info.decode() if isinstance(info, bytes) else info)
            if "language_instruction" in info:
                return info["language_instruction"]
    raise DataError(f"{where}: no instruction recorded (no language_instruction / problem_info attribute): "
                    f"pass --instruction TEXT")


class RobomimicReader(Reader):
    def __init__(self, path: str, instruction: Optional[str] = None, state_keys: Optional[Sequence[str]] = None,
                 cameras: Optional[Sequence[str]] = None):
        h5py = _h5py()
        self.path, self.instruction, self.state_keys = path, instruction, list(state_keys or [])
        source = f"robomimic HDF5 {path}"
        with h5py.File(path, "r") as f:
            self.demos = sorted((k for k in f["data"] if k.startswith("demo")), key=_number)
            first = f["data"][self.demos[0]]
            if "actions" not in first:
                raise DataError(f"{source}: data/{self.demos[0]} has no 'actions'")
            obs = first["obs"]
            images = {k: obs[k].shape[1:] for k in obs if _is_image(obs[k])}
            if cameras:
                missing = [c for c in cameras if c not in images]
                if missing:
                    raise DataError(f"{source}: no camera {missing[0]!r} (image observations: {sorted(images)})")
                images = {c: images[c] for c in cameras}
            if not images:
                raise DataError(f"{source}: no image observations (uint8 [T, H, W, 3]) in data/{self.demos[0]}/obs")
            low_dim = sorted(k for k in obs if not _is_image(obs[k]))
            for key in self.state_keys:
                if key not in obs:
                    raise DataError(f"{source}: no state key {key!r} (low-dimensional observations: {low_dim})")
            state_dim = sum(int(np.prod(obs[k].shape[1:])) for k in self.state_keys)
            self.layout = Layout(cameras={k: tuple(v) for k, v in images.items()},
                                 action_dim=int(np.prod(first["actions"].shape[1:])), state_dim=state_dim,
                                 num_episodes=len(self.demos), source=source)
            self.low_dim = low_dim

    def episode(self, index: int) -> Episode:
        h5py = _h5py()
        with h5py.File(self.path, "r") as f:
            demo = f["data"][self.demos[index]]
            where = f"{self.layout.source}: data/{self.demos[index]}"
            actions = np.asarray(demo["actions"], np.float32).reshape(len(demo["actions"]), -1)
            obs = demo["obs"]
            for cam in self.layout.cameras:
                if cam not in obs:
                    raise DataError(f"{where}: no camera {cam!r}")
            images = {cam: np.asarray(obs[cam]) for cam in self.layout.cameras}
            state = (np.concatenate([np.asarray(obs[k], np.float32).reshape(len(actions), -1) for k in self.state_keys], 1)
                     if self.state_keys else None)
            text = _instruction(self.instruction, [demo.attrs, f["data"].attrs], where)
        return Episode(images=images, actions=actions, instructions=[text] * len(actions), state=state)


class ACTReader(Reader):
    def __init__(self, files: Sequence[str], source: str, instruction: Optional[str] = None,
                 state_keys: Optional[Sequence[str]] = None, cameras: Optional[Sequence[str]] = None):
        h5py = _h5py()
        self.files, self.instruction = list(files), instruction
        self.state_keys = list(state_keys) if state_keys else ["observations/qpos"]
        label = f"ACT HDF5 {source}"
        with h5py.File(self.files[0], "r") as f:
            where = f"{label}: {os.path.basename(self.files[0])}"
            if "action" not in f or "observations" not in f or "images" not in f["observations"]:
                raise DataError(f"{where}: expected /action and /observations/images/<camera> (the ACT layout)")
            group = f["observations"]["images"]
            cams = list(cameras) if cameras else sorted(group)
            shapes = {}
            for cam in cams:
                if cam not in group:
                    raise DataError(f"{where}: no camera {cam!r} (cameras: {sorted(group)})")
                data = group[cam]
                if _is_image(data):
                    shapes[cam] = tuple(data.shape[1:])
                elif _is_jpeg_rows(data):
                    shapes[cam] = tuple(_decode_jpeg(data[0], where).shape)
                else:
                    raise DataError(f"{where}: camera {cam!r} is {data.dtype}{data.shape}, expected uint8 "
                                    f"[T, H, W, 3] or JPEG bytes per row")
            for key in self.state_keys:
                if key not in f:
                    raise DataError(f"{where}: no state dataset {key!r}")
            self.layout = Layout(cameras=shapes, action_dim=int(np.prod(f["action"].shape[1:])),
                                 state_dim=sum(int(np.prod(f[k].shape[1:])) for k in self.state_keys),
                                 num_episodes=len(self.files), source=label)

    def episode(self, index: int) -> Episode:
        h5py = _h5py()
        path = self.files[index]
        with h5py.File(path, "r") as f:
            actions = np.asarray(f["action"], np.float32).reshape(len(f["action"]), -1)
            images = {}
            for cam in self.layout.cameras:
                data = f["observations"]["images"][cam]
                images[cam] = (np.stack([_decode_jpeg(row, path) for row in data]) if _is_jpeg_rows(data)
                               else np.asarray(data))
            state = np.concatenate([np.asarray(f[k], np.float32).reshape(len(actions), -1) for k in self.state_keys], 1)
            text = _instruction(self.instruction, [f.attrs], path)
        return Episode(images=images, actions=actions, instructions=[text] * len(actions), state=state)


def _decode_jpeg(row: np.ndarray, where: str) -> np.ndarray:
    import tensorflow as tf

    try:
        return tf.io.decode_jpeg(np.asarray(row).tobytes(), channels=3).numpy()
    except tf.errors.InvalidArgumentError as e:
        raise DataError(f"{where}: an image row is not a JPEG ({e.message})") from None
