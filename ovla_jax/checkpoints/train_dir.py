"""A training run's checkpoints, read without any training code: find a step, its meta (the model's
official config.json with norm_stats, LoRA settings, training config), its params on the host (LoRA
merged, scanned layers cut back into per-layer names) and the streaming export to HF / ovla-jax.

Inference (``ovla_jax.policy``) and conversion load train checkpoints through this module; the writer,
``ovla_jax.train.checkpoint.Checkpointer``, lives with the training loop. Layout of a step directory:
items ``params``, ``train`` (step, optimizer state, RNG) and ``meta`` (JSON), written by orbax.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Optional

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from ovla_jax import fileio
from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.hf_config import config_from_hf
from ovla_jax.models.lora import LORA_PARAMS, lora_from_config, merge_lora
from ovla_jax.models.scan import layer_of

ITEMS = ("params", "train", "meta")  # the orbax items of one step directory


def _steps(directory: str) -> list[int]:
    if not fileio.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    steps = sorted(int(d) for d in fileio.listdir(directory) if d.isdigit()
                   and fileio.isdir(fileio.join(directory, d, "params")))
    if not steps:
        raise CheckpointError(f"{directory}: holds no train checkpoint (expected <step>/params, <step>/meta)")
    return steps


def resolve(path: str, step: Optional[int] = None) -> str:
    """A run's workdir, its ``checkpoints`` dir, or one step dir -> that step's dir (latest by default),
    as an absolute path (orbax reads no metadata through a relative one)."""
    path = fileio.absolute(path)
    if fileio.isdir(fileio.join(path, "params")) and fileio.isdir(fileio.join(path, "meta")):
        return path
    if fileio.isdir(fileio.join(path, "checkpoints")):
        path = fileio.join(path, "checkpoints")
    steps = _steps(path)
    if step is not None and step not in steps:
        raise CheckpointError(f"{path}: no checkpoint at step {step} (have {steps})")
    return fileio.join(path, str(steps[-1] if step is None else step))


def is_train_checkpoint(path: str) -> bool:
    try:
        resolve(path)
        return True
    except CheckpointError:
        return False


def read_meta(step_dir: str) -> dict:
    return hf.read_json(fileio.join(step_dir, "meta", "metadata"))


@contextlib.contextmanager
def _quiet_absl():
    """Orbax warns that a sub-item lacks step metadata when read on its own; that is expected here."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def param_metadata(step_dir: str) -> dict:
    """{Flax path: (shape, numpy dtype)} of the params item, from orbax metadata (no array read)."""
    with _quiet_absl():
        tree = ocp.PyTreeCheckpointer().metadata(fileio.join(step_dir, "params")).item_metadata.tree
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in traverse_util.flatten_dict(tree).items()}


def _restore_leaves(step_dir: str, paths: list[tuple]) -> dict:
    """Just ``paths`` of the params item, as host numpy arrays (orbax partial restore)."""
    item = traverse_util.unflatten_dict({p: np.zeros(0) for p in paths})
    restore_args = traverse_util.unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
    with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(fileio.join(step_dir, "params"),
                            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    return traverse_util.flatten_dict(out)


def _source(path: tuple, stored: dict) -> tuple[tuple, Optional[int]]:
    """Where a per-layer param lives in a stored params item: (stored path, layer) for a scanned run's
    stacks, (path, None) otherwise."""
    if path in stored:
        return path, None
    found = layer_of(path)
    if found is not None and found[0] in stored:
        return found
    raise KeyError(path)


def check_stored(step_dir: str, entries, stored: dict) -> None:
    """Every per-layer param of the model is in the params item (directly or as a row of a stack),
    with its shape."""
    for e in entries:
        try:
            src, layer = _source(e.path, stored)
        except KeyError:
            raise CheckpointError(f"{step_dir}/params: lacks {'/'.join(e.path)} of the model in its meta config") from None
        shape = stored[src][0] if layer is None else stored[src][0][1:]
        if shape != e.jax_shape:
            raise CheckpointError(f"{step_dir}/params: {'/'.join(e.path)} has shape {shape}, "
                                  f"the model in its meta config expects {e.jax_shape}")


def export_order(entries, stored: dict) -> list:
    """``entries`` reordered so the layers of one stacked param come together (each stack is then read
    once); unchanged for a run without scanned layers."""
    rank, keyed = {}, []
    for i, e in enumerate(entries):
        src, layer = _source(e.path, stored)
        keyed.append((rank.setdefault(src, i), layer or 0, e))
    return [e for _, _, e in sorted(keyed, key=lambda t: t[:2])]


def iter_export_tensors(step_dir: str, entries, lora, stored: dict,
                        group_bytes: int = 1 << 30) -> Iterator[tuple[tuple, np.ndarray]]:
    """(Flax path, host array) for every base param, in ``entries`` order (use :func:`export_order` for a
    scanned run), reading about ``group_bytes`` of stored params at a time (a whole stack at least); LoRA
    adapters are merged into their kernels (W + A @ B * scale, in fp32); stacks are cut into layers."""
    sources = [_source(e.path, stored) for e in entries]
    group, size = [], 0
    for i, (entry, (src, layer)) in enumerate(zip(entries, sources)):
        if not group or group[-1][1][0] != src:
            size += int(np.prod(stored[src][0])) * stored[src][1].itemsize
        group.append((entry, (src, layer)))
        if i + 1 < len(entries) and (size < group_bytes or sources[i + 1][0] == src):
            continue
        paths = list(dict.fromkeys(s for _, (s, _) in group))
        if lora is not None:
            paths += [p[:-1] + (n,) for p in paths for n in LORA_PARAMS if p[:-1] + (n,) in stored]
        flat = _restore_leaves(step_dir, paths)
        if lora is not None:
            flat = traverse_util.flatten_dict(merge_lora(traverse_util.unflatten_dict(flat), lora))
        for g, (s, layer) in group:
            yield g.path, flat[s] if layer is None else flat[s][layer]
        group, size = [], 0


def export_checkpoint(path: str, dst: str, layout: hf.Layout, *, step: Optional[int] = None,
                      dtype: Optional[str] = None, **kwargs) -> int:
    """Train checkpoint -> converted checkpoint dir (HF or ovla-jax layout), LoRA merged, written
    atomically, params streamed a group at a time. Returns the step exported."""
    step_dir = resolve(path, step)
    meta = read_meta(step_dir)
    if "config" not in meta:
        raise CheckpointError(f"{step_dir}/meta: has no model 'config' (not an ovla-jax train checkpoint?)")
    config, norm_stats = config_from_hf(meta["config"], f"{step_dir}/meta")
    lora = lora_from_config(meta.get("lora"))
    stored = param_metadata(step_dir)
    check_stored(step_dir, hf.name_map(config), stored)
    entries = export_order(hf.name_map(config), stored)
    tensors = iter_export_tensors(step_dir, entries, lora, stored)
    pending: dict[tuple, Any] = {}

    def produce(entry):
        while entry.path not in pending:
            p, v = next(tensors)
            pending[p] = v
        return pending.pop(entry.path)

    dtypes = {e.path: hf.DTYPES[dtype] if dtype else stored[_source(e.path, stored)[0]][1] for e in entries}
    hf.write_checkpoint(dst, layout, config, norm_stats, entries, dtypes, produce, **kwargs)
    return int(meta.get("step", os.path.basename(step_dir)))


def load_params(path: str, step: Optional[int] = None):
    """A train checkpoint's params on the host, LoRA merged -> (config, params, norm_stats, meta)."""
    step_dir = resolve(path, step)
    meta = read_meta(step_dir)
    config, norm_stats = config_from_hf(meta["config"], f"{step_dir}/meta")
    stored = param_metadata(step_dir)
    check_stored(step_dir, hf.name_map(config), stored)
    entries = export_order(hf.name_map(config), stored)
    flat = dict(iter_export_tensors(step_dir, entries, lora_from_config(meta.get("lora")), stored))
    return config, traverse_util.unflatten_dict(flat), norm_stats, meta
