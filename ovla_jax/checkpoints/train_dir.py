"""A training run's checkpoints, read without any training code: find a step, its meta (the model's
official config.json with norm_stats, LoRA settings, training config, the base checkpoint), its tensors
one at a time (:class:`TrainSource`: LoRA merged, scanned layers cut back into per-layer names, a frozen
base read back from the checkpoint the run started from) and the streaming export to HF / ovla-jax.

Inference (``ovla_jax.policy``, through ``ovla_jax.checkpoints.loader``) and conversion load train
checkpoints through this module; the writer, ``ovla_jax.train.checkpoint.Checkpointer``, lives with the
training loop. Layout of a step directory: items ``params`` (what the run trained, plus any frozen
params its init_checkpoint does not hold), ``train`` (step, optimizer state, RNG) and ``meta`` (JSON),
written by orbax.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from ovla_jax import fileio
from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.hf_config import config_from_hf
from ovla_jax.models.lora import LORA_PARAMS, lora_from_config, merged_kernel
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


def restore_leaves(step_dir: str, paths: list[tuple]) -> dict:
    """Just ``paths`` of the params item, as host numpy arrays (orbax partial restore)."""
    item = traverse_util.unflatten_dict({p: np.zeros(0) for p in paths})
    restore_args = traverse_util.unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
    with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(fileio.join(step_dir, "params"),
                            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    return traverse_util.flatten_dict(out)


def _source(path: tuple, stored: dict) -> tuple[tuple, Optional[int]]:
    """Where a per-layer param lives in a stored params item: (stored path, layer) for a scanned run's
    stacks, (path, None) otherwise. KeyError when the run did not store it (a frozen base tensor)."""
    if path in stored:
        return path, None
    found = layer_of(path)
    if found is not None and found[0] in stored:
        return found
    raise KeyError(path)


def _stored_or_none(path: tuple, stored: dict):
    try:
        return _source(path, stored)
    except KeyError:
        return None


def read_order(entries, scanned: bool) -> list:
    """``entries`` reordered so the layers of one stacked param come together (each stack, and its LoRA
    adapters, is then restored once); unchanged for a run without scanned layers."""
    if not scanned:
        return list(entries)
    rank, keyed = {}, []
    for i, e in enumerate(entries):
        found = layer_of(e.path)
        group, layer = found if found is not None else (e.path, 0)
        keyed.append((rank.setdefault(group, i), layer, e))
    return [e for _, _, e in sorted(keyed, key=lambda t: t[:2])]


def base_fingerprint(path: str, sample: int = 1 << 20) -> str:
    """A cheap identity of a checkpoint dir's weights: names, sizes and the first and last ``sample``
    bytes of every safetensors file (copies match; another checkpoint of the same shapes does not)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(f for f in fileio.listdir(path) if f.endswith(".safetensors")):
        file = fileio.join(path, name)
        size = fileio.size(file)
        digest.update(f"{name}:{size};".encode())
        with fileio.open_file(file, "rb") as f:
            digest.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]


def base_record(path: str) -> dict:
    """What a run's meta records of the checkpoint its frozen base is read back from."""
    return {"path": fileio.absolute(path), "fingerprint": base_fingerprint(path)}


class TrainSource:
    """A train checkpoint as a weight source (see ``ovla_jax.checkpoints.loader``): every per-layer tensor
    of the model in Flax layout, with LoRA adapters merged into their kernels (``merged_kernel``: fp32,
    cast back to the kernel's dtype). A run with a frozen base stores only what it trained (adapters,
    heads); the base tensors are read back from the checkpoint it started from (meta ``base``: the run's
    ``init_checkpoint``), in their original precision, whatever precision or quantization the run kept
    them in. Stored params are restored about ``group_bytes`` at a time (a whole stack at least)."""

    def __init__(self, path: str, step: Optional[int] = None, base: Optional[str] = None,
                 group_bytes: int = 1 << 30):
        self.step_dir = self.path = resolve(path, step)
        meta = read_meta(self.step_dir)
        if "config" not in meta:
            raise CheckpointError(f"{self.step_dir}/meta: has no model 'config' (not an ovla-jax train checkpoint?)")
        self.meta = meta
        self.config, self.norm_stats = config_from_hf(meta["config"], f"{self.step_dir}/meta")
        self.lora = lora_from_config(meta.get("lora"))
        self.stored = param_metadata(self.step_dir)
        entries = hf.name_map(self.config)
        from_base = [e for e in entries if _stored_or_none(e.path, self.stored) is None]
        self._check_stored([e for e in entries if e not in from_base])
        self._base = self._open_base(base, from_base) if from_base else None
        self.entries = read_order(entries, bool(meta.get("scan_layers", False)))
        train_config = meta.get("train_config", {})
        self.trained = {"max_length": train_config.get("max_length"),
                        "normalization": (train_config.get("data") or {}).get("normalization")}
        self.tokenizer = train_config.get("tokenizer")
        self._groups = self._plan(group_bytes)
        self._cache: dict = {}
        self._cached_group = None

    def _check_stored(self, entries) -> None:
        for e in entries:
            src, layer = _source(e.path, self.stored)
            shape = self.stored[src][0] if layer is None else self.stored[src][0][1:]
            if shape != e.jax_shape:
                raise CheckpointError(f"{self.step_dir}/params: {'/'.join(e.path)} has shape {shape}, "
                                      f"the model in its meta config expects {e.jax_shape}")

    def _open_base(self, override: Optional[str], from_base: list):
        from ovla_jax.checkpoints.loader import DirSource

        record = self.meta.get("base") or {}
        path = override or record.get("path")
        missing = "/".join(from_base[0].path)
        if not path:
            raise CheckpointError(f"{self.step_dir}/params: lacks {missing} of the model in its meta config "
                                  f"(and the run records no base checkpoint to read it from)")
        if not fileio.isdir(path):
            raise CheckpointError(f"{self.step_dir}: the run's frozen base weights ({len(from_base)} tensors, e.g. "
                                  f"{missing}) come from its init_checkpoint {path}, which is not there; pass its new "
                                  f"location (--base DIR / base=...)")
        if record.get("fingerprint") and base_fingerprint(path) != record["fingerprint"]:
            raise CheckpointError(f"{path} is not the checkpoint this run was trained from (fingerprint "
                                  f"{base_fingerprint(path)}, the run recorded {record['fingerprint']} for "
                                  f"{record.get('path')}): its frozen base must be read back from that one")
        source = DirSource(path)
        theirs = {e.path: e.jax_shape for e in source.entries}
        for e in from_base:
            if theirs.get(e.path) != e.jax_shape:
                raise CheckpointError(f"{path}: the base checkpoint has {'/'.join(e.path)} with shape "
                                      f"{theirs.get(e.path)}; the run's model expects {e.jax_shape}")
        return source

    def _needs(self, entry) -> list[tuple]:
        """Stored paths reading ``entry`` restores: its own (unless from the base) and its adapters'."""
        paths = []
        own = _stored_or_none(entry.path, self.stored)
        if own is not None:
            paths.append(own[0])
        if self.lora is not None and entry.path[-1] == "kernel":
            for name in LORA_PARAMS:
                found = _stored_or_none(entry.path[:-1] + (name,), self.stored)
                if found is not None:
                    paths.append(found[0])
        return paths

    def _plan(self, group_bytes: int) -> dict:
        """stored path -> index of the group restored with it (consecutive in read order, ~group_bytes)."""
        groups, index, size = {}, 0, 0
        for entry in self.entries:
            for src in self._needs(entry):
                if src in groups:
                    continue
                if size >= group_bytes:
                    index, size = index + 1, 0
                groups[src] = index
                shape, dtype = self.stored[src]
                size += int(np.prod(shape)) * dtype.itemsize
        return groups

    def _stored(self, src: tuple) -> np.ndarray:
        group = self._groups[src]
        if self._cached_group != group:
            self._cache = {}  # free the previous group before restoring the next
            self._cache = restore_leaves(self.step_dir, [p for p, g in self._groups.items() if g == group])
            self._cached_group = group
        return self._cache[src]

    def _at(self, path: tuple) -> np.ndarray:
        src, layer = _source(path, self.stored)
        value = self._stored(src)
        return value if layer is None else value[layer]

    def read(self, entry: hf.Entry) -> np.ndarray:
        if _stored_or_none(entry.path, self.stored) is not None:
            value = self._at(entry.path)
        else:
            value = self._base.read(entry)
        adapter = entry.path[:-1] + ("lora_a",)
        if self.lora is not None and entry.path[-1] == "kernel" and _stored_or_none(adapter, self.stored) is not None:
            value = merged_kernel(value, self._at(adapter), self._at(entry.path[:-1] + ("lora_b",)), self.lora)
        return value

    def dtype(self, entry: hf.Entry) -> np.dtype:
        found = _stored_or_none(entry.path, self.stored)
        return self.stored[found[0]][1] if found is not None else self._base.dtype(entry)


def export_checkpoint(path: str, dst: str, layout: hf.Layout, *, step: Optional[int] = None,
                      dtype: Optional[str] = None, base: Optional[str] = None, **kwargs) -> int:
    """Train checkpoint -> converted checkpoint dir (HF or ovla-jax layout), LoRA merged (into the frozen
    base read back in its original precision, never into a quantized copy), written atomically, one
    tensor at a time. Returns the step exported."""
    source = TrainSource(path, step, base=base)
    dtypes = {e.path: hf.DTYPES[dtype] if dtype else source.dtype(e) for e in source.entries}
    run = dict(source.trained)
    if source.tokenizer in ("char", "words"):  # the built-in ones; a tokenizer dir is carried by the user
        run["tokenizer"] = source.tokenizer
    hf.write_checkpoint(dst, layout, source.config, source.norm_stats, source.entries, dtypes, source.read, run=run,
                        **kwargs)
    return int(source.meta.get("step", os.path.basename(source.step_dir)))


def load_params(path: str, step: Optional[int] = None, base: Optional[str] = None):
    """A train checkpoint's params on the host, LoRA merged -> (config, params, norm_stats, meta)."""
    source = TrainSource(path, step, base=base)
    flat = {e.path: source.read(e) for e in source.entries}
    return source.config, traverse_util.unflatten_dict(flat), source.norm_stats, source.meta
