"""The one weight loader: any checkpoint -> params in their final form, one tensor at a time.

Every path that loads weights comes here: ``OpenVLAPolicy.from_pretrained`` (and so ``ovla-jax serve``
and ``ovla-jax eval``), training's ``init_checkpoint`` and resume, and ``load_sharded_params``. A
checkpoint is opened as a *source* (:func:`open_source`: an HF dir, an ovla-jax dir, an OpenVLA-OFT dir
or an ``ovla-jax train`` checkpoint, whose LoRA adapters are merged into the base as each tensor is
read), and :func:`ovla_jax.checkpoints.sharded.place` streams its tensors into the target form: a dtype,
int8 / int4 quantized Dense kernels, device shards, per-layer or scanned. Each tensor reaches its final
form before the next is read, so the peak is the final weights + the largest tensor, never a float32
copy of the whole model; a target that cannot fit fails before the first read, naming what it needs.

A source has ``path``, ``config``, ``norm_stats``, ``entries`` (every tensor of the model, in the order
it reads them best), ``read(entry)`` (a host array in Flax layout and the stored dtype) and
``dtype(entry)``; a train checkpoint's also has ``trained`` (the run's settings) and ``tokenizer``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
from flax import traverse_util

from ovla_jax import fileio
from ovla_jax import quantize as Q
from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.models.config import OpenVLAConfig

FLOAT_DTYPES = ("float32", "bfloat16")
SCAN_ABOVE_PARAMS = 200_000_000  # models larger than this load (and run) with scanned layers by default


class DirSource:
    """An HF, ovla-jax or OpenVLA-OFT checkpoint dir, checked against its config.json's architecture."""

    trained = None
    tokenizer = None

    def __init__(self, path: str):
        from ovla_jax.checkpoints.jax_format import is_jax_checkpoint

        self.path = path
        self.layout = hf.JAX if is_jax_checkpoint(path) else hf.HF
        self.config, self.norm_stats = hf.read_config(path)
        run = hf.read_run(path) or {}  # an ovla-jax export: the run's normalization, max_length, tokenizer
        self.trained = {k: run[k] for k in ("max_length", "normalization") if k in run} or None
        self.tokenizer = run.get("tokenizer")
        self.entries = hf.name_map(self.config)
        self._source = hf.Source(path, self.layout, self.entries)

    def read(self, entry: hf.Entry) -> np.ndarray:
        return self.layout.to_flax(entry, self._source.read(entry))

    def dtype(self, entry: hf.Entry) -> np.dtype:
        return self._source.dtype(entry)


def open_source(path: str, step: Optional[int] = None, base: Optional[str] = None):
    """A checkpoint dir of any kind -> its source. ``step`` picks a train checkpoint's step (default the
    latest); ``base`` overrides where a train checkpoint's frozen base is read from (the run's
    ``init_checkpoint``, recorded in its meta), e.g. after moving it."""
    from ovla_jax.checkpoints import train_dir

    weights = fileio.isdir(path) and any(f.endswith(".safetensors") for f in fileio.listdir(path))
    if not weights and train_dir.is_train_checkpoint(path):
        return train_dir.TrainSource(path, step, base=base)
    if not fileio.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if step is not None:
        raise CheckpointError(f"{path}: a step was given, but this is not a train checkpoint")
    return DirSource(path)


def num_params(config: OpenVLAConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(hf.abstract_params(config))))


def model_target(config: OpenVLAConfig, *, dtype: str = "float32", quantize: str = "none", scan: bool = False,
                 sharding=None) -> dict:
    """Abstract params of ``config``'s model in a final form: floats in ``dtype``, Dense kernels quantized
    (``ovla_jax.quantize``), per-layer or scanned, every leaf on ``sharding`` (default: the first local
    device)."""
    from ovla_jax.models.scan import stack_layers

    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {FLOAT_DTYPES}")
    if quantize not in Q.MODES:
        raise ValueError(f"quantize {quantize!r}: choose from {Q.MODES}")
    abstract = hf.abstract_params(config)
    if scan:
        abstract = jax.eval_shape(stack_layers, abstract)
    floats = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if np.issubdtype(x.dtype, np.floating)
                                                         else x.dtype), abstract)
    final = jax.eval_shape(lambda p: Q.quantize_params(p, quantize), floats)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), final)


@dataclasses.dataclass
class Loaded:
    config: OpenVLAConfig
    params: dict  # device arrays (and quantized leaves) in the requested form
    norm_stats: dict
    trained: Optional[dict]  # a train checkpoint's settings {max_length, normalization}, else None
    tokenizer: Optional[str]  # the tokenizer spec a train checkpoint records, else None
    scan: bool


def load(path: str, *, step: Optional[int] = None, dtype: str = "float32", quantize: str = "none",
         scan: Optional[bool] = None, sharding=None, progress: bool = False, base: Optional[str] = None) -> Loaded:
    """Any checkpoint -> :class:`Loaded` with params in ``dtype`` / ``quantize`` form on one device (or
    ``sharding``). ``scan`` None: scanned layers for models over 200M parameters (one compiled layer body,
    and quantized kernels dequantized one layer at a time), per-layer below."""
    source = open_source(path, step, base=base)
    if scan is None:
        scan = num_params(source.config) > SCAN_ABOVE_PARAMS
    target = model_target(source.config, dtype=dtype, quantize=quantize, scan=scan, sharding=sharding)
    from ovla_jax.checkpoints.sharded import place

    params = place(source, target, progress=progress)
    missing = sorted("/".join(p) for p in set(traverse_util.flatten_dict(target)) - set(traverse_util.flatten_dict(params)))
    if missing:  # cannot happen for a checked source; a guard against a name-map bug
        raise CheckpointError(f"{path}: no tensor for {missing[:5]}")
    return Loaded(source.config, params, source.norm_stats, source.trained, source.tokenizer, scan)
