"""Write episodes as a real RLDS tfds dataset (the structure of OXE datasets): ``steps`` with
``observation/<image keys>`` (JPEG), ``language_instruction``, ``action`` float32[A],
``is_first``/``is_last``/``is_terminal``. Used by the demo dataset builder and by tests.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from ovla_jax.data.errors import DataError


def rlds_features(image_keys: Sequence[str], image_shape: tuple[int, int, int], action_dim: int = 7,
                  state_dim: int = 0, image_encoding: str = "jpeg"):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    shapes = image_shape if isinstance(image_shape, Mapping) else {k: image_shape for k in image_keys}
    observation = {k: tfds.features.Image(shape=tuple(shapes[k]), dtype=np.uint8, encoding_format=image_encoding)
                   for k in image_keys}
    if state_dim:
        observation["state"] = tfds.features.Tensor(shape=(state_dim,), dtype=np.float32)
    step = {
        "observation": tfds.features.FeaturesDict(observation),
        "action": tfds.features.Tensor(shape=(action_dim,), dtype=np.float32),
        "language_instruction": tfds.features.Text(),
        "is_first": tfds.features.Scalar(dtype=np.bool_),
        "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
    }
    del tf
    return tfds.features.FeaturesDict({"steps": tfds.features.Dataset(step)})


def episode(images: Mapping[str, np.ndarray], actions: np.ndarray, instruction: str | Sequence[str],
            state: np.ndarray | None = None) -> dict:
    """One episode from per-key image arrays uint8[T, H, W, 3] and actions float[T, A]; one instruction
    for the episode or one per step."""
    length = len(actions)
    steps = []
    for t in range(length):
        observation = {k: v[t] for k, v in images.items()}
        if state is not None:
            observation["state"] = np.asarray(state[t], np.float32)
        steps.append({"observation": observation, "action": np.asarray(actions[t], np.float32),
                      "language_instruction": instruction if isinstance(instruction, str) else instruction[t],
                      "is_first": t == 0, "is_last": t == length - 1,
                      "is_terminal": t == length - 1})
    return {"steps": steps}


def write_rlds(data_dir: str, name: str, splits: Mapping[str, Iterable[dict]], image_keys: Sequence[str],
               image_shape: tuple[int, int, int], action_dim: int = 7, state_dim: int = 0,
               version: str = "1.0.0", image_encoding: str = "jpeg", keep_order: bool = False) -> str:
    """Write ``splits`` ({"train": episodes, ...}; any iterables, consumed one episode at a time) under
    ``data_dir/name/version``; returns that dir. tfds writes into a temporary directory and renames it
    into place when every split is done. ``keep_order``: episodes stay in the given order (tfds otherwise
    orders them by a hash of their index)."""
    import tensorflow_datasets as tfds

    target = os.path.join(data_dir, name, version)
    if os.path.exists(target):
        raise DataError(f"dataset {name!r}: {target} already exists")
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds narrates "downloading and preparing" a local write
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tfds.dataset_builders.store_as_tfds_dataset(
                name=name, version=version,
                features=rlds_features(image_keys, image_shape, action_dim, state_dim, image_encoding),
                split_datasets={k: _numbered(v) for k, v in splits.items()}, data_dir=data_dir,
                disable_shuffling=keep_order)
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(True)
    return target


def _numbered(episodes: Iterable[dict]):
    for i, ep in enumerate(episodes):
        yield i, ep
