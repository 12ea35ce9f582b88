"""Load a converted checkpoint (HF or ovla-jax layout) straight into device shards.

Tensors are read one at a time; each process keeps only the slices its devices own
(``jax.make_array_from_callback``), so the full parameter tree never sits on one host.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.jax_format import is_jax_checkpoint


def checkpoint_layout(path: str) -> hf.Layout:
    return hf.JAX if is_jax_checkpoint(path) else hf.HF


def load_sharded_params(path: str, abstract_params, progress: bool = False) -> dict:
    """Checkpoint dir -> params as global ``jax.Array``s shaped, typed and sharded like ``abstract_params``
    (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``; extra paths there, e.g. LoRA adapters, are
    not read). The checkpoint must match the architecture of its own config.json."""
    layout = checkpoint_layout(path)
    config, _ = hf.read_config(path)
    entries = hf.name_map(config)
    tensors = hf.open_checked(path, layout, entries)
    targets = traverse_util.flatten_dict(abstract_params)
    missing = [e for e in entries if e.path not in targets]
    if missing:
        raise CheckpointError(f"{path}: tensor {'/'.join(missing[0].path)} (and {len(missing) - 1} more) has no "
                              f"place in the model being trained; is the model config the checkpoint's?")
    out = {}
    bar = hf._progress(len(entries), f"loading {path}", progress)
    for entry in entries:
        target = targets[entry.path]
        host = layout.to_flax(entry, tensors.read(layout.key(entry)))
        if tuple(host.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {layout.key(entry)!r} has shape {host.shape}; the model "
                                  f"expects {tuple(target.shape)}")
        dtype = np.dtype(target.dtype)
        out[entry.path] = jax.make_array_from_callback(
            tuple(target.shape), target.sharding, lambda index, h=host: np.asarray(h[index], dtype))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return traverse_util.unflatten_dict(out)

