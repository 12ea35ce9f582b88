"""The trajectory-dataset layer on tf.data (the role dlimp plays upstream).

A *trajectory* is a dict of tensors sharing a leading time axis T (``observation/...``, ``action``,
``language_instruction``, ...) plus scalar fields broadcast to T, so that ``flatten`` can turn a
dataset of trajectories into a dataset of *frames* (the same dict without the time axis). Images stay
encoded (JPEG/PNG bytes) until the frame stage.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import tensorflow as tf

from ovla_jax.data.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE


def _silence_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:  # tf.data must never take the accelerator away from JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass


def open_builder(data_dir: str, name: str):
    """The tfds builder of ``data_dir/name[/version]`` (local path or any tf.io.gfile URL)."""
    import tensorflow_datasets as tfds

    _silence_tf()
    base = os.path.join(data_dir, name)
    if not tf.io.gfile.exists(base):
        raise DataError(f"dataset {name!r}: directory {base} not found")
    candidates = [base] if tf.io.gfile.exists(os.path.join(base, "dataset_info.json")) else sorted(
        os.path.join(base, v.rstrip("/")) for v in tf.io.gfile.listdir(base)
        if tf.io.gfile.exists(os.path.join(base, v.rstrip("/"), "dataset_info.json")))
    if not candidates:
        raise DataError(f"dataset {name!r}: no tfds version dir with dataset_info.json under {base}")
    try:
        return tfds.builder_from_directory(candidates[-1])
    except Exception as e:  # tfds raises many types for unreadable metadata
        raise DataError(f"dataset {name!r}: cannot open tfds builder at {candidates[-1]} ({e})") from None


HELD_OUT_FRACTION = 0.05  # of the episodes, when a dataset has no ``val`` split


def held_out_episodes(num_episodes: int) -> int:
    """Episodes held out for validation from a dataset without a ``val`` split: 5%, at least one, and
    none when that would leave nothing to train on."""
    if num_episodes < 2:
        return 0
    return max(1, round(HELD_OUT_FRACTION * num_episodes))


def split_names(builder, split: str) -> str:
    """``train``/``val`` -> a tfds split spec. A dataset without ``val`` holds out its last
    ``held_out_episodes`` training episodes, by index (deterministic; 8 episodes -> 7 + 1)."""
    splits = builder.info.splits
    if "val" in splits:
        return "train+val" if split == "all" else split
    if split == "all":
        return "train"
    if split not in ("train", "val"):
        return split
    if "train" not in splits:
        raise DataError(f"dataset {builder.name!r}: no 'train' split (it has {sorted(splits)})")
    total = splits["train"].num_examples
    held = held_out_episodes(total)
    if split == "val":
        if not held:
            raise DataError(f"dataset {builder.name!r}: no 'val' split, and {total} episode(s) are too few to "
                            f"hold one out")
        return f"train[{total - held}:]"
    return f"train[:{total - held}]"


def from_rlds(builder, split: str, *, shuffle: bool = False, seed: int = 0, num_parallel_reads: int = AUTOTUNE,
              process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """Episodes of an RLDS builder as trajectories. Each JAX process reads a disjoint, even share of the
    records (``tfds.even_splits``), so it works with any number of files."""
    import tensorflow_datasets as tfds

    spec = split_names(builder, split)
    if process_count > 1:
        spec = tfds.even_splits(spec, n=process_count)[process_index]
    # Unshuffled reads go file by file in order (a full pass sees every episode once, in order).
    reads = num_parallel_reads if shuffle else 1
    read_config = tfds.ReadConfig(shuffle_seed=seed if shuffle else None, skip_prefetch=True,
                                  interleave_cycle_length=reads, num_parallel_calls_for_interleave_files=reads)
    try:
        ds = builder.as_dataset(split=spec, shuffle_files=shuffle, read_config=read_config,
                                decoders={"steps": tfds.decode.SkipDecoding()})
    except (ValueError, AssertionError) as e:  # tfds: an empty or unknown split
        raise DataError(f"dataset {builder.name!r}: cannot read split {spec!r} ({e})") from None

    def to_trajectory(episode):
        traj = dict(episode["steps"])
        length = tf.shape(traj["action"])[0] if "action" in traj else tf.shape(tf.nest.flatten(traj)[0])[0]
        if "episode_metadata" in episode:
            traj["traj_metadata"] = {"episode_metadata": tf.nest.map_structure(
                lambda x: tf.repeat(x[None], length, axis=0), episode["episode_metadata"])}
        return traj

    return ds.map(to_trajectory, num_parallel_calls=num_parallel_reads, deterministic=True)


def traj_map(ds: tf.data.Dataset, fn: Callable, num_parallel_calls=AUTOTUNE) -> tf.data.Dataset:
    """Map over whole trajectories (deterministic order)."""
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)


def frame_map(ds: tf.data.Dataset, fn: Callable, num_parallel_calls=AUTOTUNE) -> tf.data.Dataset:
    """Map over single frames (deterministic order)."""
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)


def flatten(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Trajectories -> frames, in order (every frame of trajectory 0, then trajectory 1, ...)."""
    return ds.flat_map(tf.data.Dataset.from_tensor_slices)


def traj_length(traj) -> tf.Tensor:
    return tf.shape(traj["action"])[0]


def count(ds: tf.data.Dataset, limit: Optional[int] = None) -> int:
    n = 0
    for _ in ds:
        n += 1
        if limit and n >= limit:
            break
    return n
