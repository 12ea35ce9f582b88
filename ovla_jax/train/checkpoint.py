"""Train-state checkpoints with orbax: async save every K steps, keep N, exact resume, HF export.

A step directory holds three items: ``params`` (the model params), ``train`` (step, optimizer state,
RNG) and ``meta`` (JSON: the official config.json of the model with norm_stats, the LoRA settings,
the data position and the training config). Params are their own item so an export reads them alone,
a group of tensors at a time (orbax partial restore), never the optimizer state. A run with scanned
layers stores its params stacked (``layers`` [L, ...]); export and ``load_params`` cut them back into
the per-layer names every converted checkpoint uses.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from ovla_jax import fileio
from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.hf_config import config_from_hf
from ovla_jax.models.lora import LORA_PARAMS, lora_from_config, merge_lora
from ovla_jax.models.scan import layer_of
from ovla_jax.train.step import TrainState

ITEMS = ("params", "train", "meta")


class Checkpointer:
    """One run's checkpoint directory (``<workdir>/checkpoints``)."""

    def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = fileio.absolute(directory)  # a local path or a URL (gs://...)
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: TrainState, meta: dict, force: bool = False) -> bool:
        """Start saving ``state`` at ``step`` if due (every ``save_every`` steps) or ``force``; returns
        whether a save started. Async: training continues while the arrays are written."""
        if not (force or self.due(step)):
            return False
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract: TrainState, shardings: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
        """Restore into the given shardings -> (state, meta). ``step`` defaults to the latest."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        train = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params), train=ocp.args.StandardRestore(train),
            meta=ocp.args.JsonRestore()))
        t = out["train"]
        return TrainState(step=t["step"], params=out["params"], opt_state=t["opt_state"], rng=t["rng"]), out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _steps(directory: str) -> list[int]:
    if not fileio.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    steps = sorted(int(d) for d in fileio.listdir(directory) if d.isdigit()
                   and fileio.isdir(fileio.join(directory, d, "params")))
    if not steps:
        raise CheckpointError(f"{directory}: holds no train checkpoint (expected <step>/params, <step>/meta)")
    return steps


def resolve(path: str, step: Optional[int] = None) -> str:
    """A run's workdir, its ``checkpoints`` dir, or one step dir -> that step's dir (latest by default)."""
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
