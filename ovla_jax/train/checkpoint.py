"""Train-state checkpoints with orbax: async save every K steps, keep N, exact resume. Reading a run's
checkpoints back (params, meta, export) is ``ovla_jax.checkpoints.train_dir``, which needs no training code.

A step directory holds three items: ``params`` (the model params), ``train`` (step, optimizer state,
RNG) and ``meta`` (JSON: the official config.json of the model with norm_stats, the LoRA settings,
the data position, the training config and the base checkpoint). Params are their own item so an
export reads them alone, a group of tensors at a time (orbax partial restore), never the optimizer
state. A run with scanned layers stores its params stacked (``layers`` [L, ...]); export and
``load_params`` cut them back into the per-layer names every converted checkpoint uses.

Frozen params that the run's ``init_checkpoint`` holds (``skip_params``: a LoRA run's whole base) are not
saved: they never change, the base is read back from that checkpoint on resume and export (its meta
``base`` records where, and a fingerprint), and a 7B LoRA checkpoint is then the adapters' megabytes
instead of the base's 15 GB, whatever precision or quantization the run kept the base in.
"""
from __future__ import annotations

from typing import Optional

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from ovla_jax import fileio
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.train_dir import ITEMS
from ovla_jax.train.step import TrainState


class Checkpointer:
    """One run's checkpoint directory (``<workdir>/checkpoints``)."""

    def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = fileio.absolute(directory)  # a local path or a URL (gs://...)
        self.save_every = save_every
        self.skip_params: frozenset = frozenset()  # param paths not saved (read back from the base checkpoint)
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
            params=ocp.args.StandardSave(self._saved(state.params)), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)), force=True)

    def _saved(self, params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in self.skip_params})

    def restore(self, abstract: TrainState, shardings: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
        """Restore into the given shardings -> (state, meta). ``step`` defaults to the latest. The state's
        params lack ``skip_params`` (the caller loads those from the base checkpoint)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        train = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(self._saved(target.params)), train=ocp.args.StandardRestore(train),
            meta=ocp.args.JsonRestore()))
        t = out["train"]
        return TrainState(step=t["step"], params=out["params"], opt_state=t["opt_state"], rng=t["rng"]), out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


