"""ovla-jax's own checkpoint dir: the official ``config.json`` (model + norm_stats, the same file an
HF export writes), ``params/`` as an orbax PyTree checkpoint, and the carried files (tokenizer, ...).

Training restores ``params/`` straight into device shards (orbax + target shardings); the converter
reads it onto the host as numpy.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np
from flax import traverse_util
from flax.linen import meta

from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.hf_config import REMOTE_CODE_FILES, config_to_hf
from ovla_jax.models.config import OpenVLAConfig

PARAMS_DIR = "params"


def is_jax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, hf.CONFIG_FILE))


def save_jax_checkpoint(path: str, config: OpenVLAConfig, params: dict, norm_stats: Optional[dict] = None, *,
                        dtype: Optional[str] = None, carry_from: Optional[str] = None, overwrite: bool = False) -> None:
    """Write config.json + params/ (orbax) + carried files; atomically (temp dir, then rename)."""
    import orbax.checkpoint as ocp

    hf.check_params(config, params)
    target = hf.DTYPES[dtype] if dtype else None
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=target), meta.unbox(params))
    dtypes = {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree)}
    carried = hf.carried_files(carry_from) if carry_from else []
    with hf.atomic_dir(path, overwrite) as tmp:
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, PARAMS_DIR), tree)
        has_code = all(f in carried for f in REMOTE_CODE_FILES)
        with open(os.path.join(tmp, hf.CONFIG_FILE), "w") as f:
            json.dump(config_to_hf(config, norm_stats, hf._dtype_label(dtypes), has_code), f, indent=2)
            f.write("\n")
        for file in carried:
            shutil.copy2(os.path.join(carry_from, file), os.path.join(tmp, file))


def load_jax_checkpoint(path: str, dtype: Optional[str] = None) -> tuple[OpenVLAConfig, dict, dict]:
    """ovla-jax checkpoint dir -> (config, params as numpy, norm_stats); checked against config.json."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path}: no '{PARAMS_DIR}/' orbax directory (is this an HF checkpoint? use --from hf)")
    config, norm_stats = hf.read_config(path)
    entries = hf.name_map(config)
    abstract = traverse_util.unflatten_dict({e.path: np.zeros(0) for e in entries})
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        stored = checkpointer.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises several types for unreadable dirs
        raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint ({type(e).__name__}: {e})") from None
    stored_flat = traverse_util.flatten_dict(stored)
    expected = {e.path: e for e in entries}
    missing = sorted("/".join(p) for p in set(expected) - set(stored_flat))
    extra = sorted("/".join(p) for p in set(stored_flat) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{params_dir}: params do not match config.json: missing {missing[:10]}, "
                              f"unexpected {extra[:10]}")
    for p, entry in expected.items():
        if tuple(stored_flat[p].shape) != entry.jax_shape:
            raise CheckpointError(f"{params_dir}: param {'/'.join(p)} has shape {tuple(stored_flat[p].shape)}, "
                                  f"expected {entry.jax_shape}")
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    params = checkpointer.restore(params_dir, restore_args=restore_args)
    if dtype:
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=hf.DTYPES[dtype]), params)
    return config, params, norm_stats
