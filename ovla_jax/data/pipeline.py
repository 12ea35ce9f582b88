"""The assembled pipeline: per dataset read + standardize + normalize -> trajectory transforms ->
flatten -> shuffle; then mix datasets by weight; then frame transforms (decode, resize, augment, pixel
values) and batching.

Output frame schema: ``pixel_values`` float32[S, S, 3 * towers * cameras] (primary, then wrist when
``wrist``), ``image`` uint8[W, S, S, 3] (the primary camera over the window), ``image_wrist`` likewise
when ``wrist``, ``proprio`` float32[P] normalized when ``proprio``, ``action`` float32[W + F, A]
normalized (F = ``future``: OFT's chunk of K actions is the current one + K - 1 future ones),
``action_pad_mask`` (False past the trajectory end), ``pad_mask``, ``task/language_instruction``
string, ``dataset_name`` string.

Reproducibility: every random choice is seeded from ``seed`` (and the process index); augmentation is
seeded per frame by its position in the stream, so ``start_index`` (= step x host batch) resumes the
exact stream, skipping the already-seen frames before any image is decoded.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from ovla_jax import actions as A
from ovla_jax.data import frames as F
from ovla_jax.data import proprio as P
from ovla_jax.data import spec_file
from ovla_jax.data import traj as T
from ovla_jax.data import traj_transforms as TT
from ovla_jax.data.errors import DataError
from ovla_jax.data.oxe import mixtures, registry
from ovla_jax.data.stats import DEFAULT_CACHE, dataset_stats

log = logging.getLogger(__name__)
CAMERAS = ("primary", "secondary", "wrist")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how. ``mixture`` is a named mixture, a dataset name, or (name, weight) pairs."""

    data_dir: str
    mixture: Union[str, Sequence[tuple[str, float]]] = "bridge"
    image_size: int = 224
    towers: tuple = ("dinov2", "siglip")
    window: int = 1
    future: int = 0
    skip_unlabeled: bool = True
    augment: bool = False
    shuffle_buffer: int = 100_000
    subsample_length: Optional[int] = None
    max_traj_length: Optional[int] = None
    goal_relabel: bool = False
    # bounds_q99 | bounds (min/max, OFT's ALOHA) | normal | auto: what the mixture's dataset specs declare
    # (they must agree), else bounds_q99
    normalization: str = "auto"
    wrist: bool = False  # also the wrist camera (OFT's second image)
    proprio: bool = False  # also the normalized state (OFT's proprio token)
    threads: int = 16  # total read/transform threads, shared across datasets by weight
    stats_cache_dir: Optional[str] = DEFAULT_CACHE
    # Datasets declared in data (ovla_jax/data/spec_file.py): spec file paths or dicts, registered
    # before the mixture is resolved.
    dataset_specs: tuple = ()


def declare(cfg: DataConfig) -> DataConfig:
    """Register ``cfg.dataset_specs``; fill an empty mixture with the one declared dataset; resolve the
    ``auto`` normalization. Every entry point that reads data calls this first."""
    specs = spec_file.register([dict(s) if isinstance(s, Mapping) else s for s in cfg.dataset_specs or ()])
    mixture = cfg.mixture
    if not mixture:
        if len(specs) != 1:
            raise DataError("data.mixture is empty: name a dataset or mixture (or give exactly one dataset spec)")
        mixture = specs[0].name
    return dataclasses.replace(cfg, mixture=mixture, normalization=resolve_normalization(mixture, cfg.normalization))


def resolve_normalization(mixture, requested: str = "auto") -> str:
    """The run's normalization: ``requested``, checked against what the mixture's spec files declare."""
    declared = {}
    for name, _ in resolve_mixture(mixture):
        spec = registry.REGISTRY.get(name)
        if spec is not None and spec.normalization:
            declared[name] = spec.normalization
    if requested == "auto":
        kinds = set(declared.values())
        if len(kinds) > 1:
            raise DataError(f"the mixture's dataset specs declare different normalizations {declared}: one run "
                            f"normalizes every dataset alike; set data.normalization")
        return kinds.pop() if kinds else "bounds_q99"
    if requested not in A.NORMALIZATIONS:
        raise DataError(f"unknown normalization {requested!r}; choose from {A.NORMALIZATIONS + ('auto',)}")
    clash = {n: k for n, k in declared.items() if k != requested}
    if clash:
        raise DataError(f"data.normalization={requested!r} contradicts the dataset spec(s) {clash}")
    return requested


def resolve_mixture(mixture) -> list[tuple[str, float]]:
    if isinstance(mixture, str):
        if mixture in mixtures.MIXTURES:
            return mixtures.get_mixture(mixture)
        if mixture in registry.REGISTRY:
            return [(mixture, 1.0)]
        raise DataError(f"unknown mixture or dataset {mixture!r}: not a named mixture or a registered dataset "
                        f"(your own datasets are declared with --dataset-spec FILE)")
    return list(mixture)


def usable_datasets(mixture, warn: bool = False) -> list[tuple[str, float]]:
    """The (dataset, weight) entries of a mixture that the VLA trains on (EEF actions and a
    standardization transform; a lone dataset is always tried), without reading any data."""
    entries = resolve_mixture(mixture)
    usable = []
    for name, weight in entries:
        spec = registry.REGISTRY.get(name)
        if len(entries) > 1 and spec is not None and (not spec.loads_for_vla or spec.standardize is None):
            if warn:
                log.warning("skipping %s in the mixture: %s", name, "non-EEF actions" if not spec.loads_for_vla
                            else "no standardization transform yet")
            continue
        usable.append((name, weight))
    if not usable:
        raise DataError(f"no usable dataset in mixture {mixture!r}")
    return usable


def allocate_threads(total: int, weights: Sequence[float]) -> list[int]:
    """Split a thread budget across datasets proportionally to their weights, at least 1 each."""
    w = np.asarray(weights, np.float64)
    return [max(1, int(round(total * x))) for x in w / w.sum()]


def _observation_keys(builder) -> list:
    steps = builder.info.features["steps"]
    return list(steps["observation"].keys()) if "observation" in steps else []


def _check_features(builder, spec: registry.DatasetSpec, camera_keys: list[str]) -> None:
    observation = _observation_keys(builder)
    for key in camera_keys:
        if key not in observation:
            where = f" (declared in {spec.declared_in})" if spec.declared_in else ""
            raise DataError(f"dataset {spec.name!r}{where}: observation has no image key {key!r} "
                            f"(it has {sorted(observation)})")


def _normalize(action, stats: dict, kind: str):
    if kind not in A.NORMALIZATIONS:
        raise DataError(f"unknown normalization {kind!r}; choose from {A.NORMALIZATIONS}")
    return A.normalize(action, stats["action"], kind, xp=tnp)


def dataset_frames(cfg: DataConfig, name: str, split: str, *, train: bool, seed: int, threads: int = 4,
                   process_index: int = 0, process_count: int = 1) -> tuple[tf.data.Dataset, dict]:
    """One dataset as (frames with encoded images, its statistics). Train: repeated and shuffled."""
    spec = registry.get_spec(name)
    if not spec.loads_for_vla:
        raise DataError(f"dataset {name!r}: action encoding {spec.action_encoding.name} does not feed the VLA "
                        f"(needs EEF_POS or EEF_R6)")
    builder = T.open_builder(cfg.data_dir, name)
    primary = spec.cameras.get("primary")
    if primary is None:
        raise DataError(f"dataset {name!r}: the registry names no primary camera")
    cameras = {"image_primary": primary}
    if cfg.wrist:
        if spec.cameras.get("wrist") is None:
            raise DataError(f"dataset {name!r}: the registry names no wrist camera, but wrist images were asked for")
        cameras["image_wrist"] = spec.cameras["wrist"]
    where = f" (declared in {spec.declared_in})" if spec.declared_in else ""
    if cfg.proprio and not spec.state_keys:
        raise DataError(f"dataset {name!r}{where}: names no state keys, but the model reads a proprio state: "
                        f"list them under 'state' in its spec")
    if not cfg.proprio and spec.state_keys and spec.declared_in:
        log.warning("dataset %s declares a state (%s), but this model reads none (model.proprio_dim = 0): the "
                    "state is not used. OFT models read it (model.proprio_dim, an L1 or parallel head).",
                    name, ", ".join(map(str, spec.state_keys)))
    _check_features(builder, spec, list(cameras.values()))
    if spec.declared_in and not spec.state_keys:
        recorded = [k for k in _observation_keys(builder) if k in ("state", "proprio", "qpos", "joint_state")]
        if recorded:
            log.warning("dataset %s records %s, but its spec (%s) names no state: the model will not see it "
                        "(add `state: [%s]` to use it as proprio)", name, recorded, spec.declared_in, recorded[0])
    stats = dataset_stats(builder, spec, cfg.stats_cache_dir)
    ds = T.from_rlds(builder, split, shuffle=train, seed=seed, num_parallel_reads=threads,
                     process_index=process_index, process_count=process_count)

    @tf.autograph.experimental.do_not_convert  # plain Python: errors propagate unwrapped at build time
    def restructure(traj):
        traj = spec.standardize(traj)
        if spec.language_key not in traj:
            raise DataError(f"dataset {name!r}: no {spec.language_key!r} after standardization "
                            f"(fields: {sorted(traj)})")
        length = tf.shape(traj["action"])[0]
        observation = {k: traj["observation"][key] for k, key in cameras.items()}
        if cfg.proprio:
            observation["proprio"] = P.normalize(P.proprio_of(traj, spec), stats["proprio"], cfg.normalization, xp=tnp)
        return {
            "observation": observation,
            "task": {"language_instruction": traj[spec.language_key]},
            "action": _normalize(tf.cast(traj["action"], tf.float32), stats, cfg.normalization),
            "dataset_name": tf.repeat(tf.constant(name), length),
        }

    ds = T.traj_map(ds, restructure, threads)
    ds = ds.filter(lambda traj: tf.shape(traj["action"])[0] > 0)
    if cfg.skip_unlabeled:
        ds = ds.filter(TT.has_language)
    if not any(True for _ in ds.take(1)):  # reads at most until the first usable trajectory
        raise DataError(f"dataset {name!r}: empty: no trajectory with actions"
                        f"{' and a language instruction' if cfg.skip_unlabeled else ''} in split {split!r}")
    if train:
        # Repeated before the per-trajectory draws are numbered: each epoch's subsample and goal draws
        # differ, and a resumed stream (the same count of frames skipped) replays them exactly.
        ds = ds.repeat()
    if cfg.max_traj_length:
        ds = T.traj_map(ds, lambda t: TT.truncate(t, cfg.max_traj_length), threads)
    if cfg.goal_relabel or cfg.subsample_length:
        ds = ds.enumerate().map(lambda i, t: _seeded_traj_transforms(cfg, t, seed, i), num_parallel_calls=threads,
                                deterministic=True)
    ds = T.traj_map(ds, lambda t: TT.chunk(t, cfg.window, cfg.future), threads)
    ds = T.flatten(ds)
    if spec.drop_zero_motion:
        zero = _normalize(tf.zeros([7]), stats, cfg.normalization)[:6]
        ds = ds.filter(lambda f: tf.reduce_any(tf.abs(f["action"][cfg.window - 1, :6] - zero) > 1e-5))
    if train:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed)
    return ds, stats


def _seeded_traj_transforms(cfg: DataConfig, traj, seed: int, index):
    key = tf.stack([tf.cast(seed, tf.int64), index])
    if cfg.goal_relabel:
        traj = TT.uniform_goal_relabel(traj, key)
    if cfg.subsample_length:
        traj = TT.subsample(traj, cfg.subsample_length, key + 1)
    return traj


def make_frames(cfg: DataConfig, split: str = "train", *, train: bool = True, seed: int = 0, start_index: int = 0,
                process_index: int = 0, process_count: int = 1) -> tuple[tf.data.Dataset, dict]:
    """The mixed, decoded frame stream and {dataset: statistics}. ``start_index`` resumes mid-stream."""
    cfg = declare(cfg)
    host_seed = seed * 1_000_003 + process_index
    datasets, stats, weights = [], {}, []
    usable = usable_datasets(cfg.mixture, warn=True)
    threads = allocate_threads(cfg.threads, [w for _, w in usable])
    for (name, weight), n_threads in zip(usable, threads):
        ds, st = dataset_frames(cfg, name, split, train=train, seed=host_seed, threads=n_threads,
                                process_index=process_index, process_count=process_count)
        datasets.append(ds)
        stats[name] = st
        weights.append(weight * st["num_transitions"])
    if len(datasets) == 1:
        mixed = datasets[0]
    else:
        probs = np.asarray(weights, np.float64) / np.sum(weights)
        mixed = tf.data.Dataset.sample_from_datasets(datasets, weights=probs.tolist(), seed=host_seed,
                                                     stop_on_empty_dataset=train)
    if start_index:
        mixed = mixed.skip(start_index)  # before decoding: resuming costs no image work
    mixed = mixed.enumerate(start=start_index)
    return mixed.map(lambda i, frame: _frame_transform(cfg, frame, i, host_seed, train),
                     num_parallel_calls=cfg.threads, deterministic=True), stats


def _frame_transform(cfg: DataConfig, frame, index, seed: int, train: bool):
    size = cfg.image_size

    def load(encoded):
        image = F.resize(F.decode(encoded), size)
        if cfg.augment and train:
            image = F.augment(image, tf.stack([tf.cast(seed % (2**31), tf.int64), index]))
        return image

    spec = tf.TensorSpec([size, size, 3], tf.uint8)
    images = tf.map_fn(load, frame["observation"]["image_primary"], fn_output_signature=spec)
    out = {k: v for k, v in frame.items() if k != "observation"}
    out["image"] = images
    pixels = [F.pixel_values(images[-1], cfg.towers)]
    if cfg.wrist:
        wrist = tf.map_fn(load, frame["observation"]["image_wrist"], fn_output_signature=spec)
        out["image_wrist"] = wrist
        pixels.append(F.pixel_values(wrist[-1], cfg.towers))
    if cfg.proprio:
        out["proprio"] = tf.cast(frame["observation"]["proprio"][-1], tf.float32)
    out["pixel_values"] = tf.concat(pixels, axis=-1) if len(pixels) > 1 else pixels[0]
    return out


def numpy_batches(frames: tf.data.Dataset, batch_size: int, drop_remainder: bool = True) -> Iterator[dict]:
    """Host-local numpy batches of frames (prefetched)."""
    return frames.batch(batch_size, drop_remainder=drop_remainder).prefetch(2).as_numpy_iterator()
