"""Train-state checkpoints with orbax: async save every K steps, keep N, exact resume, HF export.

A step directory holds three items: ``params`` (the model params), ``train`` (step, optimizer state,
RNG) and ``meta`` (JSON: the official config.json of the model with norm_stats, the LoRA settings,
the data position and the training config). Params are their own item so an export reads them alone,
a group of tensors at a time (orbax partial restore), never the optimizer state.
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

from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.hf_config import config_from_hf
from ovla_jax.models.lora import LORA_PARAMS, lora_from_config, merge_lora
from ovla_jax.train.step import TrainState

ITEMS = ("params", "train", "meta")


class Checkpointer:
    """One run's checkpoint directory (``<workdir>/checkpoints``)."""

    def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
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
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()
                   and os.path.isdir(os.path.join(directory, d, "params")))
    if not steps:
        raise CheckpointError(f"{directory}: holds no train checkpoint (expected <step>/params, <step>/meta)")
    return steps


def resolve(path: str, step: Optional[int] = None) -> str:
    """A run's workdir, its ``checkpoints`` dir, or one step dir -> that step's dir (latest by default)."""
    if os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "meta")):
        return path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = _steps(path)
    if step is not None and step not in steps:
        raise CheckpointError(f"{path}: no checkpoint at step {step} (have {steps})")
    return os.path.join(path, str(steps[-1] if step is None else step))


def is_train_checkpoint(path: str) -> bool:
    try:
        resolve(path)
        return True
    except CheckpointError:
        return False


def read_meta(step_dir: str) -> dict:
    return hf.read_json(os.path.join(step_dir, "meta", "metadata"))


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
        tree = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "params")).item_metadata.tree
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in traverse_util.flatten_dict(tree).items()}


def _restore_leaves(step_dir: str, paths: list[tuple]) -> dict:
    """Just ``paths`` of the params item, as host numpy arrays (orbax partial restore)."""
    item = traverse_util.unflatten_dict({p: np.zeros(0) for p in paths})
    restore_args = traverse_util.unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
    with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(os.path.join(step_dir, "params"),
                            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    return traverse_util.flatten_dict(out)


def iter_export_tensors(step_dir: str, entries, lora, stored: dict,
                        group_bytes: int = 1 << 30) -> Iterator[tuple[tuple, np.ndarray]]:
    """(Flax path, host array) for every base param, in ``entries`` order, reading about ``group_bytes``
    at a time; LoRA adapters are merged into their kernels (W + A @ B * scale, in fp32)."""
    group, size = [], 0
    for i, entry in enumerate(entries):
        group.append(entry)
        size += int(np.prod(entry.jax_shape)) * stored[entry.path][1].itemsize
        if size < group_bytes and i + 1 < len(entries):
            continue
        paths = [g.path for g in group]
        if lora is not None:
            paths += [g.path[:-1] + (n,) for g in group for n in LORA_PARAMS if g.path[:-1] + (n,) in stored]
        flat = _restore_leaves(step_dir, paths)
        if lora is not None:
            flat = traverse_util.flatten_dict(merge_lora(traverse_util.unflatten_dict(flat), lora))
        for g in group:
            yield g.path, flat[g.path]
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
    entries = hf.name_map(config)
    stored = param_metadata(step_dir)
    for e in entries:
        if e.path not in stored:
            raise CheckpointError(f"{step_dir}/params: lacks {'/'.join(e.path)} of the model in its meta config")
        if stored[e.path][0] != e.jax_shape:
            raise CheckpointError(f"{step_dir}/params: {'/'.join(e.path)} has shape {stored[e.path][0]}, "
                                  f"the model in its meta config expects {e.jax_shape}")
    tensors = iter_export_tensors(step_dir, entries, lora, stored)
    pending: dict[tuple, Any] = {}

    def produce(entry):
        while entry.path not in pending:
            p, v = next(tensors)
            pending[p] = v
        return pending.pop(entry.path)

    dtypes = {e.path: hf.DTYPES[dtype] if dtype else stored[e.path][1] for e in entries}
    hf.write_checkpoint(dst, layout, config, norm_stats, entries, dtypes, produce, **kwargs)
    return int(meta.get("step", os.path.basename(step_dir)))


def load_params(path: str, step: Optional[int] = None):
    """A train checkpoint's params on the host, LoRA merged -> (config, params, norm_stats, meta)."""
    step_dir = resolve(path, step)
    meta = read_meta(step_dir)
    config, norm_stats = config_from_hf(meta["config"], f"{step_dir}/meta")
    entries = hf.name_map(config)
    flat = dict(iter_export_tensors(step_dir, entries, lora_from_config(meta.get("lora")), param_metadata(step_dir)))
    return config, traverse_util.unflatten_dict(flat), norm_stats, meta
