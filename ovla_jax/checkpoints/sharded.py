"""Stream a checkpoint's tensors straight into device arrays in their final form: dtype, quantized
(``ovla_jax.quantize``) and sharded as the target says.

Tensors are read one at a time; each is cast or quantized and placed before the next is read, so the
peak is the final weights + one tensor, at 7B too. Each process keeps only the slices its devices own
(``jax.make_array_from_callback``), so the full parameter tree never sits on one host. A model with
scanned layers takes the per-layer tensors of the checkpoint into its stacked params (layer ``i`` of
``blocks_i`` / ``layers_i`` -> row ``i`` of ``blocks`` / ``layers``): the stack is allocated on the
devices once and filled a layer at a time by a donated in-place update, never staged on the host.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from ovla_jax import quantize as Q
from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.memory import check_fits
from ovla_jax.models.scan import layer_of


def _shardings(leaf):
    """The tree of shardings of an abstract leaf (a ShapeDtypeStruct or a quantized one)."""
    return jax.tree.map(lambda x: x.sharding, leaf)


def _without_layer_axis(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _replicated(sharding):
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding


def _kernel_sharding(leaf):
    """Where a quantized leaf's dense kernel would live (its values / packed rows carry the kernel's spec)."""
    return (leaf.values if isinstance(leaf, Q.Int8Weight) else leaf.packed).sharding


def _zeros(leaf):
    """A zero-filled array (or quantized leaf) shaped and sharded like abstract ``leaf``, made on the devices."""
    leaves, treedef = jax.tree.flatten(leaf)
    return _zeros_fn(treedef, tuple((tuple(x.shape), np.dtype(x.dtype), x.sharding) for x in leaves))()


@functools.lru_cache(maxsize=None)
def _zeros_fn(treedef, specs):
    shardings = jax.tree.unflatten(treedef, [sharding for _, _, sharding in specs])
    return jax.jit(lambda: jax.tree.unflatten(treedef, [jnp.zeros(shape, dtype) for shape, dtype, _ in specs]),
                   out_shardings=shardings)


def _quantize(kernel, mode: str, shardings):
    leaves, treedef = jax.tree.flatten(shardings)
    return _quantizer(mode, treedef, tuple(leaves))(kernel)


@functools.lru_cache(maxsize=None)
def _quantizer(mode: str, treedef, shardings):
    return jax.jit(functools.partial(Q.quantize_leaf, mode=mode), out_shardings=jax.tree.unflatten(treedef, shardings))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, layer, index):
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), index, 0),
                        stack, layer)


@functools.partial(jax.jit, donate_argnums=0)
def _set_columns(leaf, block, start):
    """Write ``block`` (a quantized kernel's output columns ``start:``) into ``leaf`` in place."""
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_slice_in_dim(s, x, start, axis=s.ndim - 1), leaf, block)


QUANTIZE_BLOCK = 1 << 24  # elements quantized at once: a 7B LM head (131M) goes in column blocks of ~16M


def _host_to_device(host: np.ndarray, sharding, dtype) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index], dtype))


def _final(host: np.ndarray, leaf, stacked: bool):
    """One host tensor (Flax layout, stored dtype) -> ``leaf``'s final form (one layer of it if ``stacked``)."""
    if Q.is_quantized(leaf):
        kernel_sharding = _kernel_sharding(leaf)
        if stacked:
            kernel_sharding = _without_layer_axis(kernel_sharding)
            leaf = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_without_layer_axis(
                x.sharding)), leaf)
        mode = "int8" if isinstance(leaf, Q.Int8Weight) else "int4"
        shardings = _shardings(leaf)
        columns = host.shape[-1]
        width = max(1, QUANTIZE_BLOCK // max(1, host.size // columns))
        if width >= columns:
            return _quantize(_host_to_device(host, kernel_sharding, host.dtype), mode, shardings)
        # Output channels quantize independently (int8: one scale each; int4: per group of rows in each), so a
        # large kernel goes a block of columns at a time into its final buffer: never a whole fp32 copy.
        replicated = _replicated(kernel_sharding)  # blocks are small: every device (every process) holds one whole
        out = _zeros(leaf)
        for start in range(0, columns, width):
            block = np.ascontiguousarray(host[..., start:start + width])
            quantized = _quantize(_host_to_device(block, replicated, block.dtype), mode,
                                  jax.tree.map(lambda _: replicated, shardings))
            out = _set_columns(out, quantized, start)
        return out
    sharding = _without_layer_axis(leaf.sharding) if stacked else leaf.sharding
    return _host_to_device(host, sharding, np.dtype(leaf.dtype))


def _check_shape(host_shape, leaf, stacked: bool, where: str) -> None:
    want = tuple(leaf.kernel_shape if Q.is_quantized(leaf) else leaf.shape)[1 if stacked else 0:]
    if tuple(host_shape) != want:
        raise CheckpointError(f"{where} has shape {tuple(host_shape)}; the model expects {want}")


def _device_bytes(targets: dict) -> dict:
    """{device: bytes} the leaves take on each addressable device."""
    out: dict = {}
    for leaf in targets.values():
        for x in jax.tree.leaves(leaf):
            shard = x.sharding.shard_shape(tuple(x.shape))
            for device in x.sharding.addressable_devices:
                out[device] = out.get(device, 0) + int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return out


def _plan(source, targets: dict):
    """-> (entries placed as they are, {stacked path: {layer: entry}}, entries with no place in ``targets``)."""
    direct, stacks, unknown = [], {}, []
    for entry in source.entries:
        found = layer_of(entry.path) if entry.path not in targets else None
        if entry.path in targets:
            direct.append(entry)
        elif found is not None and found[0] in targets:
            stacks.setdefault(found[0], {})[found[1]] = entry
        else:
            unknown.append(entry)
    return direct, stacks, unknown


def covered_paths(source, abstract) -> set:
    """Paths of ``abstract`` (per-layer or scanned) that ``source``'s tensors fill."""
    direct, stacks, _ = _plan(source, traverse_util.flatten_dict(abstract))
    return {e.path for e in direct} | set(stacks)


def place(source, abstract, *, progress: bool = False, skip_unknown: bool = False,
          check_memory: bool = True) -> dict:
    """``source``'s tensors (a checkpoint opened by ``ovla_jax.checkpoints.loader.open_source``) -> params
    shaped, typed, quantized and sharded like ``abstract``: a tree whose leaves are ``ShapeDtypeStruct``s
    with a ``sharding``, or quantized leaves (``Int8Weight`` / ``Int4Weight``) of them. ``abstract`` may be
    per-layer or scanned. Paths of ``abstract`` the checkpoint lacks (LoRA adapters, fresh heads) are not
    in the result; a checkpoint tensor with no place in ``abstract`` is an error unless ``skip_unknown``."""
    targets = traverse_util.flatten_dict(abstract)
    direct, stacks, unknown = _plan(source, targets)
    if unknown and not skip_unknown:
        raise CheckpointError(f"{source.path}: tensor {'/'.join(unknown[0].path)} has no place in the model being "
                              f"loaded; is the model config the checkpoint's?")
    for path, layers in stacks.items():
        depth = (targets[path].kernel_shape if Q.is_quantized(targets[path]) else targets[path].shape)[0]
        if sorted(layers) != list(range(depth)):
            raise CheckpointError(f"{source.path}: {'/'.join(path)}: the checkpoint has layers {sorted(layers)} for "
                                  f"a stack of {depth}")
    filled = {e.path: targets[e.path] for e in direct}
    filled.update({p: targets[p] for p in stacks})
    if check_memory:
        largest = max((int(np.prod(e.jax_shape)) * 4 for e in direct + [e for s in stacks.values() for e in s.values()]),
                      default=0)
        check_fits(_device_bytes(filled), 2 * largest, f"the weights of {source.path}",
                   hint="; a smaller form (bfloat16, or quantize int8 / int4) may fit")
    out: dict = {}
    bar = hf._progress(len(direct) + sum(len(s) for s in stacks.values()), f"loading {source.path}", progress)
    by_entry = {e.path: (p, i) for p, layers in stacks.items() for i, e in layers.items()}
    for entry in source.entries:  # the source's order: it reads sequentially (a train checkpoint a group at a time)
        if entry.path in filled:
            host = source.read(entry)
            _check_shape(host.shape, targets[entry.path], False, f"{source.path}: tensor {'/'.join(entry.path)}")
            out[entry.path] = _final(host, targets[entry.path], stacked=False)
        elif entry.path in by_entry:
            path, layer = by_entry[entry.path]
            leaf = targets[path]
            host = source.read(entry)
            _check_shape(host.shape, leaf, True, f"{source.path}: tensor {'/'.join(entry.path)} (layer {layer})")
            if path not in out:
                out[path] = _zeros(leaf)
            out[path] = _set_layer(out[path], _final(host, leaf, stacked=True), layer)
        else:
            continue
        del host
        if bar:
            bar.update()
    if bar:
        bar.close()
    _return_freed_host_memory()
    return traverse_util.unflatten_dict(out)


def _return_freed_host_memory() -> None:
    """Hand the host memory freed while loading back to the OS: glibc keeps freed blocks below its mmap
    threshold (up to 32 MiB each) in the process heap, and a load frees thousands of them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_sharded_params(path: str, abstract_params, progress: bool = False, step: Optional[int] = None) -> dict:
    """Checkpoint dir (HF / ovla-jax / OFT dir or train checkpoint) -> params as global ``jax.Array``s
    shaped, typed (or quantized) and sharded like ``abstract_params`` (see :func:`place`). The checkpoint
    must match the architecture of its own config.json."""
    from ovla_jax.checkpoints.loader import open_source

    return place(open_source(path, step), abstract_params, progress=progress)
