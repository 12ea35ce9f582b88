"""Load a converted checkpoint (HF or ovla-jax layout) straight into device shards.

Tensors are read one at a time; each process keeps only the slices its devices own
(``jax.make_array_from_callback``), so the full parameter tree never sits on one host. A model with
scanned layers takes the per-layer tensors of the checkpoint into its stacked params (layer ``i`` of
``blocks_i`` / ``layers_i`` -> row ``i`` of ``blocks`` / ``layers``), still one tensor at a time.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.jax_format import is_jax_checkpoint
from ovla_jax.models.scan import layer_of


def checkpoint_layout(path: str) -> hf.Layout:
    return hf.JAX if is_jax_checkpoint(path) else hf.HF


def _slice_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _stacked_array(target, layers: dict, read) -> jax.Array:
    """A global array for a stacked param: ``layers`` maps layer -> Entry; ``read(entry)`` gives the host
    tensor in Flax layout. Only this process's distinct shards are held, filled one layer at a time."""
    shape, dtype = tuple(target.shape), np.dtype(target.dtype)
    if sorted(layers) != list(range(shape[0])):
        raise CheckpointError(f"the checkpoint has layers {sorted(layers)} for a stack of {shape[0]}")
    indices = {_slice_key(i): i for i in target.sharding.addressable_devices_indices_map(shape).values()}
    buffers = {k: np.empty([len(range(*s.indices(n))) for s, n in zip(i, shape)], dtype) for k, i in indices.items()}
    for layer, entry in layers.items():
        host = read(entry)
        if tuple(host.shape) != shape[1:]:
            raise CheckpointError(f"tensor of layer {layer} has shape {host.shape}; the model expects {shape[1:]}")
        for key, index in indices.items():
            rows = range(*index[0].indices(shape[0]))
            if layer in rows:
                buffers[key][rows.index(layer)] = host[index[1:]]
    return jax.make_array_from_callback(shape, target.sharding, lambda index: buffers[_slice_key(index)])


def load_sharded_params(path: str, abstract_params, progress: bool = False) -> dict:
    """Checkpoint dir -> params as global ``jax.Array``s shaped, typed and sharded like ``abstract_params``
    (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``; extra paths there, e.g. LoRA adapters, are
    not read). ``abstract_params`` may be per-layer or scanned (stacked layers). The checkpoint must
    match the architecture of its own config.json."""
    layout = checkpoint_layout(path)
    config, _ = hf.read_config(path)
    entries = hf.name_map(config)
    source = hf.Source(path, layout, entries)
    targets = traverse_util.flatten_dict(abstract_params)
    direct, stacks = [], {}
    for entry in entries:
        stacked = layer_of(entry.path) if entry.path not in targets else None
        if entry.path in targets:
            direct.append(entry)
        elif stacked is not None and stacked[0] in targets:
            stacks.setdefault(stacked[0], {})[stacked[1]] = entry
        else:
            raise CheckpointError(f"{path}: tensor {'/'.join(entry.path)} has no place in the model being trained; "
                                  f"is the model config the checkpoint's?")

    def read(entry):
        host = layout.to_flax(entry, source.read(entry))
        if bar:
            bar.update()
        return host

    out = {}
    bar = hf._progress(len(entries), f"loading {path}", progress)
    for entry in direct:
        target = targets[entry.path]
        host = read(entry)
        if tuple(host.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {layout.key(entry)!r} has shape {host.shape}; the model "
                                  f"expects {tuple(target.shape)}")
        dtype = np.dtype(target.dtype)
        out[entry.path] = jax.make_array_from_callback(
            tuple(target.shape), target.sharding, lambda index, h=host: np.asarray(h[index], dtype))
    for stacked, layers in stacks.items():
        try:
            out[stacked] = _stacked_array(targets[stacked], layers, read)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {'/'.join(stacked)}: {e}") from None
    if bar:
        bar.close()
    return traverse_util.unflatten_dict(out)
