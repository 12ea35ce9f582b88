"""The training loop behind ``ovla-jax train``: config -> data, model, sharded state -> steps, with
metrics, validation, checkpoints, exact resume, preemption and NaN handling.

Resume: a run whose workdir holds checkpoints continues from the latest one (params, optimizer state,
step, RNG and the data position: the pipeline skips the frames already consumed). A SIGTERM saves a
checkpoint at the next step boundary and exits cleanly.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util as flax_traverse
from flax.linen import meta as flax_meta

from ovla_jax import fileio, sharding
from ovla_jax.checkpoints.hf import read_config
from ovla_jax.checkpoints.hf_config import config_to_hf
from ovla_jax.checkpoints.sharded import covered_paths, place
from ovla_jax.checkpoints.train_dir import base_record, read_meta, resolve
from ovla_jax.data.batch import BatchTransform, batch_spec, to_global_arrays
from ovla_jax.data.errors import DataError
from ovla_jax.data.pipeline import DataConfig, declare, make_frames, numpy_batches
from ovla_jax.models.config import OFT_FIELDS, OpenVLAConfig, from_config_dict, pixel_normalizations
from ovla_jax.models.lora import lora_from_config
from ovla_jax.models.openvla import OpenVLA
from ovla_jax.models.param_init import SCHEMES as PARAM_INIT_SCHEMES
from ovla_jax.tokenizer import make_tokenizer
from ovla_jax.train import optimizer as O
from ovla_jax.train.checkpoint import Checkpointer
from ovla_jax.train.frozen import FrozenForm, combine, frozen_paths
from ovla_jax.train.preemption import PreemptionWatch
from ovla_jax.train.report import Reporter, summarize
from ovla_jax.train.step import Trainer

log = logging.getLogger(__name__)

SUM_KEYS = ("loss_sum", "tokens_sum", "correct_sum", "action_tokens_sum", "l1_sum")


def _sums(metrics: dict) -> dict:
    """The summable step metrics (``*_sum``: overall, per dataset, per action dim / chunk step)."""
    return {k: v for k, v in metrics.items() if k.endswith("_sum")}


class ConfigError(ValueError):
    """A training config that cannot run, with the field that is wrong."""


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted" | "nan"
    step: int
    history: list
    message: str = ""
    state: Any = None  # the final TrainState (device arrays)


def model_config(config) -> tuple[OpenVLAConfig, dict]:
    """The model: the init checkpoint's own config.json when one is given, else ``config.model``."""
    if config.get("init_checkpoint"):
        # The backbone from the checkpoint; OFT settings given in config.model (e.g. fine-tuning OpenVLA
        # into an OFT policy with fresh heads) override the checkpoint's own.
        cfg, stats = read_config(config.init_checkpoint)
        model = config.get("model") or {}
        overrides = {k: model[k] for k in OFT_FIELDS if k in model and model[k] is not None}
        try:
            return dataclasses.replace(cfg, **overrides), stats
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    try:
        return from_config_dict(config.model), {}
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def data_config(config, model_cfg: OpenVLAConfig) -> DataConfig:
    fields = dict(config.data)
    fields["image_size"] = model_cfg.vision[0].image_size
    try:
        fields["towers"] = pixel_normalizations(model_cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if isinstance(fields.get("mixture"), (list, tuple)):
        fields["mixture"] = [tuple(x) for x in fields["mixture"]]
    specs = fields.get("dataset_specs") or ()
    fields["dataset_specs"] = tuple(specs) if isinstance(specs, (list, tuple)) else (specs,)
    # What the model reads decides what the data gives: the chunk's future actions, the wrist camera and
    # the proprio state (an explicit contradicting setting is an error, not silently overridden).
    needs = {"wrist": model_cfg.num_images > 1, "proprio": model_cfg.proprio_dim > 0}
    if model_cfg.num_images > 2:
        raise ConfigError(f"model.num_images {model_cfg.num_images}: the data gives at most 2 cameras (primary, wrist)")
    for name, needed in needs.items():
        if name in fields and bool(fields[name]) != needed:
            raise ConfigError(f"data.{name}={fields[name]} contradicts the model (num_images "
                              f"{model_cfg.num_images}, proprio_dim {model_cfg.proprio_dim})")
        fields[name] = needed
    if model_cfg.parallel:
        fields["future"] = max(int(fields.get("future", 0)), model_cfg.chunk - 1)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"data: unknown field(s) {unknown}; DataConfig has {sorted(known)}")
    return DataConfig(**fields)


@dataclasses.dataclass
class TrainSetup:
    """What ``ovla-jax train`` and ``ovla-jax compile`` share: one model, optimizer, mesh and Trainer."""

    model_cfg: OpenVLAConfig
    model: OpenVLA
    lora: Any
    tx: Any
    lr: Callable
    mesh: Any
    trainer: Trainer
    example: dict  # a one-example batch of the model's inputs (shapes for init)

    def batch_spec(self, batch_size: int, max_length: int) -> dict:
        """ShapeDtypeStructs of a global training batch, sharded on the batch axis."""
        cfg = self.model_cfg
        return batch_spec(batch_size, max_length, cfg.vision[0].image_size, 3 * len(cfg.vision) * cfg.num_images,
                          action_dim=cfg.action_dim, sharding=sharding.batch_sharding(self.mesh),
                          chunk=cfg.chunk if cfg.parallel else 0, proprio_dim=cfg.proprio_dim)


def build(config, model_cfg: OpenVLAConfig, num_datasets: int, devices=None) -> TrainSetup:
    """Model, optimizer, mesh (over ``devices``, default all) and Trainer for a training config: the one
    place both the train loop and ahead-of-time compilation build them, so they compile the same step."""
    try:
        mesh = sharding.make_mesh(dict(config.mesh), devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % replicas:
        raise ConfigError(f"batch_size {config.batch_size} is not a multiple of data x fsdp = {replicas} "
                          f"(mesh {dict(mesh.shape)})")
    if config.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype {config.dtype!r}: use float32 or bfloat16 (params stay float32)")
    lora = lora_from_config(config.get("lora"))
    if config.mode == "lora" and lora is None:
        raise ConfigError("mode 'lora' needs lora.rank > 0")
    scan = bool(config.get("scan_layers", False))
    model = OpenVLA(model_cfg, dtype=jnp.dtype(config.dtype), lora=lora, remat=config.remat, scan_layers=scan)
    size = model_cfg.vision[0].image_size
    example = {"pixel_values": np.zeros((1, size, size, 3 * len(model_cfg.vision) * model_cfg.num_images), np.float32),
               "input_ids": np.zeros((1, config.max_length), np.int32)}
    abstract_params = flax_meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), example["pixel_values"], example["input_ids"])["params"]))
    opt = config.optimizer
    try:
        lr = O.schedule(opt.schedule, opt.lr, total_steps=config.num_steps, warmup_steps=opt.warmup_steps,
                        decay_steps=int(opt.get("decay_steps", 0) or 0))
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None
    try:
        patterns = O.trainable_patterns(config.mode, model_cfg.llm.num_layers, scan)
        tx = O.make_optimizer(lr_schedule=lr, weight_decay=opt.weight_decay, clip_norm=opt.clip_norm,
                              accumulate_steps=opt.accumulate_steps)
        mask = O.trainable_mask(abstract_params, patterns)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    all_train = all(jax.tree.leaves(mask))
    init_scheme = config.get("param_init", "hf")
    if init_scheme not in PARAM_INIT_SCHEMES:
        raise ConfigError(f"param_init {init_scheme!r}: choose from {PARAM_INIT_SCHEMES}")
    trainer = Trainer(model, tx, mesh, num_datasets=num_datasets, trainable=None if all_train else mask,
                      init_scheme=init_scheme, frozen_form=frozen_form(config, all_train))
    return TrainSetup(model_cfg, model, lora, tx, lr, mesh, trainer, example)


def frozen_form(config, all_train: bool) -> FrozenForm:
    """``frozen_dtype`` / ``frozen_quantize`` of a config, checked against its mode. ``frozen_dtype`` "auto"
    is the compute dtype: a frozen weight is only read as a matmul operand in that dtype, so a wider copy
    would be memory spent for nothing (bf16 for the 7B configs, as upstream's LoRA on a bf16 base)."""
    dtype = config.get("frozen_dtype", "auto") or "auto"
    quantize = config.get("frozen_quantize", "none") or "none"
    if dtype == "auto":
        dtype = config.dtype
    if all_train and quantize != "none":
        raise ConfigError(f"frozen_quantize={quantize!r} with mode={config.mode!r}: that mode trains every "
                          f"parameter, so nothing is frozen to quantize (QLoRA: mode=lora, or a frozen_* mode)")
    try:
        return FrozenForm(dtype, quantize)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _subtree(tree, paths) -> dict:
    flat = flax_traverse.flatten_dict(tree)
    return flax_traverse.unflatten_dict({p: v for p, v in flat.items() if p in paths})


def _base_checkpoint(config, trainer, target):
    """(the init checkpoint as a weight source or None, the frozen param paths it holds). Those are read
    from it in their frozen form and never saved: resume and export read them back from it."""
    from ovla_jax.checkpoints.loader import open_source

    init = config.get("init_checkpoint")
    quantize = trainer.frozen_form.quantize
    if not init:
        if quantize != "none":
            raise ConfigError(f"frozen_quantize={quantize!r} needs init_checkpoint: the base is quantized as it is "
                              f"read from a checkpoint, and export merges the adapters into that checkpoint's "
                              f"original weights")
        return None, set()
    source = open_source(init)
    frozen = frozen_paths(trainer.trainable)
    from_base = covered_paths(source, target) & frozen
    fresh_frozen = sorted("/".join(p) for p in frozen - from_base)
    if quantize != "none" and fresh_frozen:
        raise ConfigError(f"frozen_quantize={quantize!r}: frozen params {fresh_frozen[:3]} are not in init_checkpoint "
                          f"{init}; only weights read from a checkpoint are quantized")
    return source, from_base


def _check_same_base(meta: dict, base, directory: str, step: int) -> None:
    """A run resumes on the base it was trained on (its frozen weights are read back from it)."""
    from ovla_jax.checkpoints.train_dir import base_fingerprint

    recorded = (meta or {}).get("base")
    if not recorded or base is None:
        return
    now = base_fingerprint(base.path)
    if now != recorded.get("fingerprint"):
        raise ConfigError(f"{directory}/{step} was trained on the base {recorded.get('path')} (fingerprint "
                          f"{recorded.get('fingerprint')}); init_checkpoint {base.path} differs ({now}): resume with "
                          f"the same base, or use a new workdir")


def _check_resumable(meta: dict, config, process_count: int, directory: str, step: int) -> None:
    """A workdir resumes only with the settings that fix its checkpoint's layout and data position."""
    where = f"{directory}/{step}"
    scan = bool(config.get("scan_layers", False))
    if bool(meta.get("scan_layers", False)) != scan:
        raise ConfigError(f"{where} was written with scan_layers={not scan}; resume it with "
                          f"--config.scan_layers={not scan} (or use a new workdir)")
    if meta.get("process_count", process_count) != process_count:
        log.warning("%s was written by %s process(es), this run has %s: the data stream restarts from an "
                    "equivalent position, not bitwise the same one", where, meta.get("process_count"), process_count)


def _check_widths(model_cfg: OpenVLAConfig, stats: dict) -> None:
    """The data's action and state widths must be the model's (a mismatch otherwise surfaces as a shape
    error deep inside the step)."""
    for name, st in stats.items():
        width = len(st["action"]["mean"])
        want = model_cfg.action_dim if model_cfg.parallel else 7
        if width != want:
            hint = ("--config.model.action_dim" if model_cfg.parallel else
                    "an L1 or parallel head (model.action_head, model.action_dim): the token head decodes 7 dims")
            raise ConfigError(f"dataset {name!r} has {width}-D actions; the model predicts {want}: set {hint}")
        if model_cfg.proprio_dim and "proprio" in st and len(st["proprio"]["mean"]) != model_cfg.proprio_dim:
            raise ConfigError(f"dataset {name!r} gives a {len(st['proprio']['mean'])}-D state; model.proprio_dim is "
                              f"{model_cfg.proprio_dim}: set --config.model.proprio_dim={len(st['proprio']['mean'])}")


def shared_batches(host_batches, max_batches: int) -> list:
    """Up to ``max_batches`` host batches, as many on every process: each process's share of the
    validation split may hold a different number of full batches, and a process that ran a sharded eval
    step the others skipped would wait for them forever. The count is agreed on (the minimum) first."""
    local = list(itertools.islice(host_batches, max_batches))
    n = len(local)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        n = int(np.min(multihost_utils.process_allgather(np.int32(n))))
    return local[:n]


def _validation(trainer, params, val_frames, host_batch, bt, batch_sh, names, max_batches):
    sums = None
    for host in shared_batches(numpy_batches(val_frames, host_batch), max_batches):
        metrics = trainer.eval(params, to_global_arrays(bt(host), batch_sh, names))
        part = _sums(metrics)
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    return None if sums is None else summarize(jax.device_get(sums), names, "val/")


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train(config, workdir: str, *, progress: bool = True,
          on_step: Optional[Callable[[int], None]] = None) -> RunResult:
    """Run (or resume) the training ``config`` describes in ``workdir``; see configs/train/*.py.
    ``on_step(step)`` is called after each step is dispatched (hooks for callers and tests)."""
    fileio.makedirs(workdir)
    model_cfg, init_norm_stats = model_config(config)
    pcount, pindex = jax.process_count(), jax.process_index()
    if config.batch_size % pcount:
        raise ConfigError(f"batch_size {config.batch_size} does not split over {pcount} processes")
    host_batch = config.batch_size // pcount
    try:
        tokenizer = make_tokenizer(config.tokenizer, model_cfg.tokenizer_vocab_size, model_cfg.n_action_bins)
    except ValueError as e:
        raise ConfigError(f"tokenizer: {e}") from None
    try:
        dc = declare(data_config(config, model_cfg))
    except DataError as e:
        raise ConfigError(str(e)) from None
    bt = BatchTransform(tokenizer, config.max_length, model_cfg.n_action_bins, window=dc.window,
                        chunk=model_cfg.chunk, parallel=model_cfg.parallel,
                        mask_past_end=bool(config.get("mask_past_end", False)))

    ckpt = Checkpointer(fileio.join(workdir, "checkpoints"), save_every=config.save_every, keep=config.keep,
                        async_save=config.async_checkpoints)
    latest = ckpt.latest_step()
    resumed_meta = read_meta(resolve(ckpt.directory, latest)) if latest is not None else None
    if resumed_meta is not None:
        _check_resumable(resumed_meta, config, pcount, ckpt.directory, latest)
    data_index = resumed_meta["data_index"] if resumed_meta else 0
    frames, stats = make_frames(dc, "train", train=True, seed=config.seed, start_index=data_index,
                                process_index=pindex, process_count=pcount)
    names = list(stats)
    _check_widths(model_cfg, stats)
    norm_stats = {**init_norm_stats, **stats}

    setup = build(config, model_cfg, len(names))
    trainer, lr, lora, example = setup.trainer, setup.lr, setup.lora, setup.example
    rng = jax.random.PRNGKey(config.seed)
    abstract, shardings = trainer.abstract_state(rng, example)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.params,
                          shardings.params)
    base, from_base = _base_checkpoint(config, trainer, target)
    ckpt.skip_params = frozenset(from_base)
    load_progress = progress and pindex == 0
    if latest is not None:
        _check_same_base(resumed_meta, base, ckpt.directory, latest)
        state, _ = ckpt.restore(abstract, shardings, latest)
        if from_base:  # the frozen base was not saved: read it back into its form and shards
            frozen = place(base, _subtree(target, from_base), progress=load_progress, skip_unknown=True)
            state = state.replace(params=combine(state.params, frozen))
        start = latest
    else:
        params = place(base, target, progress=load_progress) if base is not None else None
        state = trainer.init(rng, example, params)
        start = 0
    batch_sh = sharding.batch_sharding(setup.mesh)
    step_fn = trainer.compile_step(batch_sh)
    val_frames = None
    if config.eval_every:
        try:
            val_frames, _ = make_frames(dc, config.eval_split, train=False, seed=config.seed,
                                        process_index=pindex, process_count=pcount)
            trainer.compile_eval(batch_sh)
        except DataError as e:
            log.warning("validation disabled: %s", e)
            val_frames = None
        if pcount > 1:  # every process validates, or none does (a lone one would wait for the others)
            from jax.experimental import multihost_utils

            if not bool(np.all(multihost_utils.process_allgather(np.int32(val_frames is not None)))):
                if val_frames is not None:
                    log.warning("validation disabled: another process has no validation data")
                val_frames = None

    meta_base = {"config": config_to_hf(model_cfg, norm_stats, "float32", False),
                 "lora": dataclasses.asdict(lora) if lora else None, "dataset_names": names,
                 "base": base_record(config.init_checkpoint) if from_base else None,
                 "frozen": dataclasses.asdict(trainer.frozen_form) if trainer.trainable is not None else None,
                 "scan_layers": bool(config.get("scan_layers", False)),
                 "host_batch": host_batch, "process_count": pcount, "train_config": json.loads(config.to_json_best_effort())}
    # What "auto" and an empty mixture resolved to is what a loader of this run needs to know.
    meta_base["train_config"].setdefault("data", {}).update(normalization=dc.normalization, mixture=dc.mixture)
    if pindex == 0:
        fileio.write_text(fileio.join(workdir, "config.json"), json.dumps(meta_base["train_config"], indent=2))

    def meta(step):
        return {**meta_base, "step": step, "data_index": step * host_batch}

    reporter = Reporter(workdir, total_steps=config.num_steps, start_step=start, enabled=pindex == 0,
                        wandb_project=config.get("wandb_project", ""), wandb_config=meta_base["train_config"],
                        progress=progress)
    if start:
        reporter.message(f"resumed from {ckpt.directory}/{start} (data position {data_index})")
    batches = numpy_batches(frames, host_batch)
    pending_losses, sums, last_log = [], None, (start, time.time())
    result = None
    with PreemptionWatch() as stop:
        step = start
        try:
            while step < config.num_steps:
                batch = to_global_arrays(bt(next(batches)), batch_sh, names)
                state, metrics = step_fn(state, batch)
                step += 1
                pending_losses.append((step, metrics["loss"]))
                part = _sums(metrics)
                part["grad_norm_sum"] = metrics["grad_norm"]
                sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
                reporter.advance()
                if on_step is not None:
                    on_step(step)
                stopping = stop.reached(step)
                due_save = ckpt.due(step) or step == config.num_steps or stopping
                if step % config.log_every == 0 or due_save:
                    bad = [(s, v) for s, v in jax.device_get(pending_losses) if not np.isfinite(v)]
                    if bad:
                        ckpt.wait()
                        kept = ckpt.latest_step()
                        # The loss of step N is computed on the params after N - 1 updates.
                        msg = (f"loss is {bad[0][1]} at step {bad[0][0]}: stopping (no checkpoint of this state "
                               f"is written). Latest checkpoint: {'step ' + str(kept) if kept is not None else 'none'}"
                               + (f"; it is from before step {bad[0][0] - 1}, whose update led to the non-finite loss."
                                  if kept is not None and kept < bad[0][0] - 1 else "."))
                        reporter.message(msg)
                        result = RunResult("nan", bad[0][0], reporter.history, msg, state)
                        break
                    if due_save and not bool(_all_finite(state.params)):
                        ckpt.wait()
                        kept = ckpt.latest_step()
                        msg = (f"parameters are non-finite after the update of step {step} (its loss was finite): "
                               f"stopping without saving them. Latest checkpoint: "
                               f"{'step ' + str(kept) if kept is not None else 'none'}.")
                        reporter.message(msg)
                        result = RunResult("nan", step, reporter.history, msg, state)
                        break
                    host = jax.device_get(sums)
                    n = step - last_log[0]
                    scalars = summarize(host, names, "train/")
                    scalars["train/grad_norm"] = float(host["grad_norm_sum"]) / n
                    scalars["train/learning_rate"] = float(lr(step))
                    scalars["train/steps_per_second"] = n / max(time.time() - last_log[1], 1e-9)
                    reporter.write(step, scalars)
                    pending_losses, sums, last_log = [], None, (step, time.time())
                if val_frames is not None and step % config.eval_every == 0:
                    val = _validation(trainer, state.params, val_frames, host_batch, bt, batch_sh, names, config.eval_batches)
                    if val:
                        reporter.write(step, val)
                        reporter.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()
                                                                      if k.count("/") == 1))
                    else:  # said once: validation stays off for this run
                        reporter.message(f"validation skipped: the {config.eval_split!r} split has no full batch of "
                                         f"{host_batch} frames per process")
                        val_frames = None
                ckpt.save(step, state, meta(step), force=step == config.num_steps or stopping)
                if stopping:
                    ckpt.wait()
                    msg = f"preempted (SIGTERM): saved a checkpoint at step {step} in {ckpt.directory}; exiting"
                    reporter.message(msg)
                    result = RunResult("preempted", step, reporter.history, msg, state)
                    break
        except StopIteration:
            raise DataError(f"the training stream of {dc.mixture!r} ended at step {step}") from None
        finally:
            ckpt.wait()
            ckpt.close()
            reporter.close()
    if result is None:
        result = RunResult("done", step, reporter.history, f"trained to step {step}; checkpoints in {ckpt.directory}",
                           state)
    return result
