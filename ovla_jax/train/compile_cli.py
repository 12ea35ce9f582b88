"""``ovla-jax compile --config FILE[:variant] --topology NAME [--config.x=y ...]``: compile the train step
ahead of time for a TPU slice, on any host, and say whether it fits and how fast it would run.
``--inference [--dtype bfloat16] [--quantize int8] [--batch 1]``: compile the policy's prediction for one
chip of the slice instead (the model of the config, weights in that form), and say whether it fits.

It builds exactly what ``ovla-jax train`` builds from the same config (model, remat, scan, optimizer,
fine-tuning mode, mesh, shardings, batch) over the slice's compile-only TPU devices (libtpu from the
``[tpu]`` extra; no TPU needed) and prints: compile seconds; per-chip memory (arguments, outputs,
temporaries, total) against the chip's HBM; model FLOPs per step (analytic, formula stated) and XLA's
count; XLA's estimated step time, the implied MFU, examples/s and days for the config's steps.
Exit codes: 0 fits, 1 does not fit (the message names the shortfall), 2 bad arguments or config.
"""
from __future__ import annotations

import json
import math
import os
import sys

USAGE = ("usage: ovla-jax compile --config configs/train/<name>.py[:variant] --topology v5p-256 "
         "[--config.<field>=<value> ...] [--estimate shallow|unrolled|none] [--json FILE]")
GIB = 1024 ** 3


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("topology", None, "TPU slice: v5p-256, v4-128, v5e-64, v6e-8, ... or v5p:4x4x8", flag_values=fv)
    flags.DEFINE_enum("estimate", "unrolled", ["unrolled", "shallow", "none"],
                      "how XLA's FLOPs and step time are obtained for a scanned model: shallow unrolled compiles "
                      "extrapolated per layer, the full unrolled step (slow; also times its compile), or none",
                      flag_values=fv)
    flags.DEFINE_string("json", None, "also write the report as JSON to this file", flag_values=fv)
    flags.DEFINE_bool("inference", False, "compile the policy's prediction (one chip) instead of the train step",
                      flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "--inference: weight / compute dtype",
                      flag_values=fv)
    flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"], "--inference: weight-only quantization",
                      flag_values=fv)
    flags.DEFINE_integer("batch", 1, "--inference: examples per call", flag_values=fv)


def _model_config(config):
    from ovla_jax.models.config import from_config_dict

    init = config.get("init_checkpoint")
    from ovla_jax import fileio

    if init and fileio.isfile(fileio.join(init, "config.json")):
        from ovla_jax.checkpoints.hf import read_config

        return read_config(init)[0]
    return from_config_dict(config.model)


def _param_counts(model_cfg, config):
    """(total, trainable) parameter counts of the run's model (adapters included)."""
    import numpy as np
    from flax import traverse_util

    from ovla_jax.train import flops as F
    from ovla_jax.train import optimizer as O

    lora = None
    if config.get("lora") and config.lora.get("rank", 0):
        from ovla_jax.models.lora import lora_from_config

        lora = lora_from_config(config.lora)
    from ovla_jax.checkpoints.hf import abstract_params

    params = abstract_params(model_cfg) if lora is None else F._abstract_with_lora(model_cfg, lora)
    labels = traverse_util.flatten_dict(O.trainable_labels(params, O.trainable_patterns(
        config.mode, model_cfg.llm.num_layers)))
    sizes = {k: int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(params).items()}
    return sum(sizes.values()), sum(n for k, n in sizes.items() if labels[k] == "train"), lora


def report(config, topology: str, estimate: str = "unrolled", log=print, label: str = "the config") -> dict:
    """Compile ``config``'s train step for ``topology``; returns the report (and logs it as it goes)."""
    import re

    from ovla_jax.data.pipeline import usable_datasets
    from ovla_jax.train import aot
    from ovla_jax.train import flops as F
    from ovla_jax.train import optimizer as O
    from ovla_jax.train.topology import parse_slice, slice_devices

    tpu = parse_slice(topology)
    devices = slice_devices(tpu)
    model_cfg = _model_config(config)
    try:
        num_datasets = len(usable_datasets(config.data.mixture))
    except Exception:  # a custom mixture this registry does not know: metrics shapes only
        num_datasets = 1
    total, trainable, lora = _param_counts(model_cfg, config)
    scan = bool(config.get("scan_layers", False))
    mesh = dict(config.mesh)
    log(f"compiling the train step of {label} for {tpu.name} ({tpu.topology_name}, {tpu.chips} chips) ...")
    compiled = aot.compile_train_step(config, model_cfg, devices, num_datasets)
    from ovla_jax import sharding

    mesh_shape = dict(sharding.make_mesh(mesh, devices).shape)

    patterns = [re.compile(p) for p in O.trainable_patterns(config.mode, model_cfg.llm.num_layers)]
    per_example = F.example_flops(model_cfg, config.max_length, lambda p: any(c.search(p) for c in patterns), lora)
    model_flops = per_example.train * config.batch_size
    out = {
        "topology": tpu.name, "topology_name": tpu.topology_name, "chips": tpu.chips,
        "chip": tpu.chip.generation, "hbm_gib_per_chip": tpu.chip.hbm_bytes / GIB,
        "peak_bf16_tflops_per_chip": tpu.chip.peak_bf16 / 1e12,
        "hbm_gb_per_s_per_chip": tpu.chip.hbm_bandwidth / 1e9,
        "params": total, "trainable_params": trainable, "mode": config.mode, "scan_layers": scan,
        "remat": config.remat, "dtype": config.dtype, "mesh": mesh_shape, "batch_size": config.batch_size,
        "sequence": {"patches": model_cfg.num_patches, "text": config.max_length},
        "compile_seconds": compiled.seconds, "lower_seconds": compiled.lower_seconds,
        "memory_gib_per_chip": {"arguments": compiled.argument_bytes / GIB, "outputs": compiled.output_bytes / GIB,
                                "aliased": compiled.alias_bytes / GIB, "temporaries": compiled.temp_bytes / GIB,
                                "code": compiled.code_bytes / GIB, "total": compiled.total_bytes / GIB},
        "model_flops_per_step": model_flops, "model_flops_per_example": per_example.train,
        "model_flops_formula": F.FORMULA,
    }
    if not scan:
        xla_flops, xla_seconds, how = compiled.xla_flops, compiled.xla_seconds, "this (unrolled) compile"
        xla_bytes = compiled.xla_bytes
        out["unrolled_compile_seconds"] = compiled.seconds
    elif estimate == "unrolled":
        unrolled = config.copy_and_resolve_references()
        unrolled.scan_layers = False
        log("  estimate: compiling the full unrolled step ...")
        full = aot.compile_train_step(unrolled, model_cfg, devices, num_datasets)
        xla_flops, xla_seconds, how = full.xla_flops, full.xla_seconds, "the full unrolled compile"
        xla_bytes = full.xla_bytes
        out["unrolled_compile_seconds"] = full.seconds
    elif estimate == "shallow":
        est = aot.extrapolate(config, model_cfg, devices, num_datasets, log=log)
        xla_flops, xla_seconds, how, xla_bytes = est.xla_flops, est.xla_seconds, est.how, est.xla_bytes
        out["estimate_compile_seconds"] = est.compile_seconds
    else:
        xla_flops = xla_seconds = how = xla_bytes = None
    out["xla_estimate_from"] = how
    if xla_flops is not None:
        out["xla_flops_per_step"] = xla_flops * tpu.chips
    if xla_seconds is not None and not (xla_seconds > 0 and math.isfinite(xla_seconds)):
        # Seen with libtpu's v4 cost model on the 7B step: a negative total. Report it, derive nothing.
        out["xla_step_seconds_unusable"] = xla_seconds
        xla_seconds = None
    if xla_seconds is None and xla_flops is not None and xla_bytes is not None:
        # No usable cost-model time: the roofline's bound instead (each chip at its bf16 peak or its
        # HBM bandwidth, whichever takes longer, for the FLOPs and bytes XLA counted), labelled as such.
        compute, memory = xla_flops / tpu.chip.peak_bf16, xla_bytes / tpu.chip.hbm_bandwidth
        bound = max(compute, memory)
        out["xla_bytes_per_chip"] = xla_bytes
        out["roofline_step_seconds"] = bound
        out["roofline_mfu"] = model_flops / (tpu.chips * tpu.chip.peak_bf16 * bound)
        out["roofline_bound"] = "compute" if compute >= memory else "memory"
    if xla_seconds:
        out["xla_step_seconds"] = xla_seconds
        out["mfu"] = model_flops / (tpu.chips * tpu.chip.peak_bf16 * xla_seconds)
        out["examples_per_second"] = config.batch_size / xla_seconds
        out["days"] = config.num_steps * xla_seconds / 86400
        out["num_steps"] = config.num_steps
    out["fits"] = compiled.total_bytes <= tpu.chip.hbm_bytes
    return out


def inference_report(config, topology: str, dtype: str, quantize: str, batch: int, log=print) -> dict:
    """Compile the policy's prediction for one chip of ``topology``; returns the report."""
    from ovla_jax.checkpoints.loader import num_params
    from ovla_jax.train import aot
    from ovla_jax.train.topology import parse_slice, slice_devices

    tpu = parse_slice(topology)
    device = slice_devices(tpu)[0]
    model_cfg = _model_config(config)
    log(f"compiling the policy's prediction ({dtype}, quantize {quantize}, batch {batch}) for one {tpu.chip.generation} "
        f"chip ...")
    compiled = aot.compile_inference(model_cfg, device, dtype=dtype, quantize=quantize, batch=batch,
                                     max_length=config.get("max_length", 40))
    return {"inference": True, "topology": tpu.name, "chip": tpu.chip.generation,
            "hbm_gib_per_chip": tpu.chip.hbm_bytes / GIB, "params": num_params(model_cfg), "dtype": dtype,
            "quantize": quantize, "batch": batch, "action_head": model_cfg.action_head,
            "compile_seconds": compiled.seconds,
            "memory_gib": {"weights": compiled.argument_bytes / GIB, "temporaries": compiled.temp_bytes / GIB,
                           "outputs": compiled.output_bytes / GIB, "code": compiled.code_bytes / GIB,
                           "total": compiled.total_bytes / GIB},
            "fits": compiled.total_bytes <= tpu.chip.hbm_bytes}


def format_inference_report(r: dict) -> str:
    mem = r["memory_gib"]
    return "\n".join([
        f"chip          one {r['chip']} chip ({r['topology']}): {r['hbm_gib_per_chip']:.2f} GiB usable HBM",
        f"model         {r['params'] / 1e9:.2f}B params, action head {r['action_head']}; weights {r['dtype']}, "
        f"quantize {r['quantize']}; batch {r['batch']}",
        f"compile       {r['compile_seconds']:.1f} s",
        f"memory/chip   weights and inputs {mem['weights']:.2f} GiB, temporaries {mem['temporaries']:.2f} GiB, outputs "
        f"{mem['outputs']:.3f} GiB, code {mem['code']:.2f} GiB: total {mem['total']:.2f} of {r['hbm_gib_per_chip']:.2f} GiB "
        f"({100 * mem['total'] / r['hbm_gib_per_chip']:.0f}%): {'fits' if r['fits'] else 'does NOT fit'}",
    ])


def format_report(r: dict) -> str:
    mem = r["memory_gib_per_chip"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [
        f"topology      {r['topology']} = {r['topology_name']}: {r['chips']} chips, {r['hbm_gib_per_chip']:.2f} GiB "
        f"usable HBM and {r['peak_bf16_tflops_per_chip']:.0f} bf16 TFLOP/s each",
        f"model         {r['params'] / 1e9:.2f}B params, {r['trainable_params'] / 1e9:.3f}B trained (mode {r['mode']}); "
        f"scan_layers={r['scan_layers']}, remat={r['remat']}, compute {r['dtype']}",
        f"step          global batch {r['batch_size']} ({r['batch_size'] / r['chips']:g} per chip), sequence "
        f"{r['sequence']['patches']} patches + {r['sequence']['text']} text tokens; mesh {mesh}",
        f"compile       {r['compile_seconds']:.1f} s (lower {r['lower_seconds']:.1f} s)"
        + (f"; unrolled step {r['unrolled_compile_seconds']:.1f} s" if "unrolled_compile_seconds" in r
           and r["scan_layers"] else ""),
        f"memory/chip   arguments {mem['arguments']:.2f} GiB, outputs {mem['outputs']:.2f} GiB "
        f"({mem['aliased']:.2f} GiB aliased to donated arguments), temporaries {mem['temporaries']:.2f} GiB, "
        f"code {mem['code']:.2f} GiB: total {mem['total']:.2f} of {r['hbm_gib_per_chip']:.2f} GiB "
        f"({100 * mem['total'] / r['hbm_gib_per_chip']:.0f}%)",
        f"model FLOPs   {r['model_flops_per_step']:.3e} per step ({r['model_flops_per_example']:.3e} per example)",
        f"              {r['model_flops_formula']}",
    ]
    if "xla_flops_per_step" in r:
        lines.append(f"XLA FLOPs     {r['xla_flops_per_step']:.3e} per step (remat recompute included; "
                     f"from {r['xla_estimate_from']})")
    if "xla_step_seconds_unusable" in r:
        lines.append(f"step time     unavailable: XLA's cost model returned {r['xla_step_seconds_unusable']:.4g} s for "
                     f"this program (none derived from it)")
    if "roofline_step_seconds" in r:
        lines += [
            f"roofline      >= {r['roofline_step_seconds']:.3f} s per step ({r['roofline_bound']}-bound: XLA's "
            f"{r['xla_flops_per_step'] / r['chips']:.3e} FLOPs and {r['xla_bytes_per_chip'] / 1e9:.1f} GB of HBM "
            f"traffic per chip at {r['peak_bf16_tflops_per_chip']:.0f} TFLOP/s and "
            f"{r['hbm_gb_per_s_per_chip']:.0f} GB/s)",
            f"MFU           <= {100 * r['roofline_mfu']:.1f}% (model FLOPs over the roofline's time: an upper bound)",
        ]
    if "xla_step_seconds" in r:
        lines += [
            f"step time     {r['xla_step_seconds']:.3f} s (XLA's cost-model estimate)",
            f"MFU           {100 * r['mfu']:.1f}% = model FLOPs / ({r['chips']} chips x "
            f"{r['peak_bf16_tflops_per_chip']:.0f} TFLOP/s x step time)",
            f"throughput    {r['examples_per_second']:.0f} examples/s; {r['num_steps']} steps = {r['days']:.2f} days",
        ]
    return "\n".join(lines)


def _hint(inference: bool, config=None) -> str:
    """What might make it fit, leaving out what the config already does."""
    if inference:
        return "--quantize int8 / int4, a smaller --batch, or a chip with more HBM"
    remat = config.remat if config is not None else None
    mode = config.mode if config is not None else None
    quantize = config.get("frozen_quantize", "none") if config is not None else "none"
    tries = [] if remat == "full" else ["--config.remat=full"]
    if mode != "full" and quantize != "int4":
        tries.append("--config.frozen_quantize=int4" if quantize == "int8"
                     else "--config.frozen_quantize=int8 or int4 (LoRA and frozen modes)")
    tries += ["a larger fsdp mesh axis", "a smaller batch_size", "a bigger slice"]
    return ", ".join(tries)


def run(argv: list[str]) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU backend
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from ovla_jax.train.cli import _config_path, parse_config_flags

    try:
        fv = parse_config_flags(argv, "compile", USAGE, _define_flags)
    except SystemExit as e:
        return int(e.code or 0)
    if not fv.topology:
        print(f"compile: error: --topology is required\n{USAGE}", file=sys.stderr)
        return 2
    from ovla_jax.data.errors import DataError
    from ovla_jax.train.loop import ConfigError
    from ovla_jax.train.topology import parse_slice

    try:
        parse_slice(fv.topology)
        if fv.inference:
            if fv.batch < 1:
                raise ValueError(f"--batch must be >= 1, got {fv.batch}")
            r = inference_report(fv.config, fv.topology, fv.dtype, fv.quantize, fv.batch,
                                 log=lambda m: print(m, flush=True))
        else:
            r = report(fv.config, fv.topology, fv.estimate, log=lambda m: print(m, flush=True), label=_config_path(argv))
    except (ValueError, ConfigError, DataError) as e:
        print(f"compile: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        message = str(e)
        if "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message:
            print(f"compile: does not fit on {fv.topology}: {message.splitlines()[0]}\n"
                  f"  try: {_hint(fv.inference, fv.config)}",
                  file=sys.stderr)
            return 1
        print(f"compile: error: {message}", file=sys.stderr)
        return 2
    print(format_inference_report(r) if fv.inference else format_report(r))
    if fv.json:
        from ovla_jax import fileio

        fileio.write_text(fv.json, json.dumps(r, indent=2))
    if not r["fits"]:
        mem = (r["memory_gib"] if fv.inference else r["memory_gib_per_chip"])["total"]
        print(f"compile: does not fit: {'the prediction' if fv.inference else 'the step'} needs {mem:.2f} GiB per "
              f"chip, a {r['chip']} chip has {r['hbm_gib_per_chip']:.2f} GiB (short by "
              f"{mem - r['hbm_gib_per_chip']:.2f} GiB); try {_hint(fv.inference, fv.config)}", file=sys.stderr)
        return 1
    return 0
