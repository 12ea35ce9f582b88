"""Per-dataset action statistics in the official ``norm_stats`` format, computed once and cached.

Computed over ALL splits after standardization (as upstream), from actions only (no image is decoded).
The cache key hashes the dataset's tfds metadata, its location, the registry entry and the source of
its standardization transform, so editing the transform or the data recomputes them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from ovla_jax import fileio
from ovla_jax.data import traj as T
from ovla_jax.data.errors import DataError
from ovla_jax.data.oxe.registry import DatasetSpec

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ovla_jax", "stats")


def stats_key(builder, spec: DatasetSpec) -> str:
    info = tf.io.gfile.GFile(os.path.join(builder.data_dir, "dataset_info.json")).read()
    parts = [builder.data_dir, info, spec.name, repr(spec.cameras), repr(spec.action_normalization_mask),
             repr(spec.state_keys),
             getattr(spec.standardize, "recipe", None) or inspect.getsource(spec.standardize)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _moments(x: np.ndarray) -> dict:
    a = x.astype(np.float64)
    return {"mean": a.mean(0).astype(np.float32).tolist(), "std": a.std(0).astype(np.float32).tolist(),
            "max": a.max(0).astype(np.float32).tolist(), "min": a.min(0).astype(np.float32).tolist(),
            "q01": np.quantile(a, 0.01, axis=0).astype(np.float32).tolist(),
            "q99": np.quantile(a, 0.99, axis=0).astype(np.float32).tolist()}


def compute_stats(actions: np.ndarray, num_trajectories: int, mask, proprio: Optional[np.ndarray] = None) -> dict:
    """float[N, A] actions (and float[N, P] proprio states, when the dataset has them) -> the official
    stats dict (action: mean/std/max/min/q01/q99/mask; proprio: the same but mask; counts)."""
    if actions.shape[0] == 0:
        raise DataError("no transitions to compute statistics over")
    out = {"action": {**_moments(actions), "mask": [bool(m) for m in mask]}}
    if proprio is not None:
        out["proprio"] = _moments(proprio)
    out.update(num_transitions=int(actions.shape[0]), num_trajectories=int(num_trajectories))
    return out


def dataset_stats(builder, spec: DatasetSpec, cache_dir: Optional[str] = DEFAULT_CACHE, progress: bool = False) -> dict:
    """Statistics of one dataset (all splits, after standardization); read from the cache when present."""
    key = stats_key(builder, spec)
    path = fileio.join(cache_dir, f"{spec.name}-{key}.json") if cache_dir else None
    if path and fileio.exists(path):
        return json.loads(fileio.read_text(path))
    ds = T.from_rlds(builder, "all")
    from ovla_jax.data.proprio import missing_state_keys, proprio_of

    def fields(traj):
        traj = spec.standardize(traj)
        out = {"action": traj["action"]}
        # A dataset version without the registered state keys still gets its action statistics; asking it
        # for proprio is then the named error of proprio_of.
        if spec.state_keys and not missing_state_keys(traj, spec):
            out["proprio"] = proprio_of(traj, spec)
        return out

    ds = T.traj_map(ds, fields)
    chunks, states, n_traj = [], [], 0
    iterator = ds.as_numpy_iterator()
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"statistics of {spec.name}", unit="traj")
    for traj in iterator:
        chunks.append(traj["action"])
        if "proprio" in traj:
            states.append(traj["proprio"])
        n_traj += 1
    if not n_traj:
        raise DataError(f"dataset {spec.name!r}: empty (no trajectories in {builder.data_dir})")
    actions = np.concatenate(chunks)
    stats = compute_stats(actions, n_traj, spec.normalization_mask(actions.shape[1]),
                          np.concatenate(states) if states else None)
    if path:  # a local dir or a URL (gs://): one cache shared by every host of a pod
        fileio.makedirs(cache_dir)
        fileio.write_text(path, json.dumps(stats))
    return stats
