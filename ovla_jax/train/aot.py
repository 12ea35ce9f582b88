"""Ahead-of-time compilation of the real train step for a TPU slice, on any host (no TPU needed).

The step is the one ``ovla-jax train`` runs: :func:`ovla_jax.train.loop.build` makes the model,
optimizer, mesh and Trainer from the same config, over the slice's compile-only devices, and the
jitted step is lowered with abstract (shape-only) state and batch. XLA then reports per-chip memory
and, from its TPU cost model, FLOPs and an estimated step time.

XLA's cost analysis counts a loop body once, so with scanned layers its FLOPs and time cover one
layer per stack. The estimate then comes from shallow unrolled compiles, extrapolated per layer: a
base with 2 layers in every stack (LLM, each vision tower's blocks up to the feature block) and one
compile per stack with 4; each stack's per-layer cost is (T4 - T2) / 2. Memory always comes from the
real (scanned) program.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import numpy as np

from ovla_jax.models.config import OpenVLAConfig


@dataclasses.dataclass
class CompiledStep:
    lower_seconds: float
    compile_seconds: float
    argument_bytes: int  # per chip
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int
    code_bytes: int
    xla_flops: Optional[float]  # per chip, as XLA counts them (loop bodies once)
    xla_seconds: Optional[float]  # XLA's estimated step time ("optimal_seconds")
    xla_bytes: Optional[float] = None  # per chip, memory traffic as XLA counts it ("bytes accessed")

    @property
    def seconds(self) -> float:
        return self.lower_seconds + self.compile_seconds

    @property
    def total_bytes(self) -> int:
        """Peak HBM per chip: arguments + outputs that are not aliased to them + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def compile_train_step(config, model_cfg: OpenVLAConfig, devices, num_datasets: int) -> CompiledStep:
    """Lower and compile ``config``'s train step over ``devices`` (compile-only TPU devices)."""
    from ovla_jax import sharding
    from ovla_jax.train.loop import build

    setup = build(config, model_cfg, num_datasets, devices)
    abstract, _ = setup.trainer.abstract_state(jax.random.PRNGKey(0), setup.example)
    step = setup.trainer.compile_step(sharding.batch_sharding(setup.mesh))
    return _compiled(step, abstract, setup.batch_spec(config.batch_size, config.max_length))


def compile_inference(model_cfg: OpenVLAConfig, device, *, dtype: str = "bfloat16", quantize: str = "none",
                      batch: int = 1, max_length: int = 40) -> CompiledStep:
    """Lower and compile the policy's prediction (greedy decode of 7 tokens, or OFT's one parallel pass)
    on one ``device`` with weights in ``dtype`` / ``quantize`` form and scanned layers, as
    ``OpenVLAPolicy.from_pretrained`` holds a 7B model."""
    import jax.numpy as jnp

    from ovla_jax.checkpoints.loader import model_target
    from ovla_jax.compile_options import weight_loop_options
    from ovla_jax.models.openvla import OpenVLA, greedy_decode, parallel_decode

    sharding = jax.sharding.SingleDeviceSharding(device)
    params = model_target(model_cfg, dtype=dtype, quantize=quantize, scan=True, sharding=sharding)
    model = OpenVLA(model_cfg, dtype=jnp.dtype(dtype), scan_layers=True)
    size = model_cfg.vision[0].image_size
    channels = 3 * len(model_cfg.vision) * model_cfg.num_images

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    inputs = [spec((batch, size, size, channels), jnp.float32), spec((batch, max_length), jnp.int32),
              spec((batch, max_length), jnp.bool_)]
    if model_cfg.parallel:
        inputs.append(spec((batch, max_length), jnp.bool_))
        if model_cfg.proprio_dim:
            inputs.append(spec((batch, model_cfg.proprio_dim), jnp.float32))
        fn = lambda p, *a: parallel_decode(model, p, *a)  # noqa: E731
    else:
        fn = lambda p, *a: greedy_decode(model, p, *a, num_tokens=7)  # noqa: E731
    jitted = jax.jit(fn, compiler_options=weight_loop_options(device.platform))
    return _compiled(jitted, params, *inputs)


def _compiled(jitted, *args) -> CompiledStep:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return CompiledStep(
        lower_seconds=lowered_at - start, compile_seconds=done - lowered_at,
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        xla_flops=float(cost["flops"]) if "flops" in cost else None,
        xla_seconds=float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None,
        xla_bytes=float(cost["bytes accessed"]) if "bytes accessed" in cost else None)


def stack_depths(model_cfg: OpenVLAConfig) -> dict[str, int]:
    """Layers that run per stack: the LLM's, and each tower's blocks up to its feature block."""
    depths = {"llm": model_cfg.llm.num_layers}
    for i, tower in enumerate(model_cfg.vision):
        depths[f"tower{i}"] = tower.feature_block + 1
    return depths


def with_depths(model_cfg: OpenVLAConfig, depths: dict[str, int]) -> OpenVLAConfig:
    """``model_cfg`` with the given running depth per stack (a tower keeps one unused block after its
    feature block, as the real ones do)."""
    towers = tuple(dataclasses.replace(t, depth=depths[f"tower{i}"] + 1, feature_layer=-2)
                   for i, t in enumerate(model_cfg.vision))
    return dataclasses.replace(model_cfg, vision=towers,
                               llm=dataclasses.replace(model_cfg.llm, num_layers=depths["llm"]))


@dataclasses.dataclass
class Estimate:
    xla_flops: float  # per chip
    xla_seconds: float
    how: str
    compile_seconds: float  # spent on the estimate's compiles
    xla_bytes: Optional[float] = None


def extrapolate(config, model_cfg: OpenVLAConfig, devices, num_datasets: int, log=print,
                base: int = 2, step: int = 2) -> Estimate:
    """XLA's per-chip FLOPs and step time of the full-depth unrolled step, from shallow unrolled compiles."""
    unrolled = config.copy_and_resolve_references()
    with unrolled.unlocked():
        unrolled.scan_layers = False
    full = stack_depths(model_cfg)
    names = list(full)
    points, spent = {}, 0.0
    for grow in [None] + names:
        depths = {n: base + (step if n == grow else 0) for n in names}
        log(f"  estimate: compiling the unrolled step with {', '.join(f'{n} {d}' for n, d in depths.items())} layers")
        out = compile_train_step(unrolled, with_depths(model_cfg, depths), devices, num_datasets)
        if out.xla_flops is None or out.xla_seconds is None:
            raise RuntimeError("XLA reported no cost analysis for this platform")
        # A non-positive time would poison the extrapolation; it propagates as NaN and is reported unusable.
        if not out.xla_seconds > 0:
            log(f"  estimate: XLA's cost model gave {out.xla_seconds:.4g} s for this compile")
            out.xla_seconds = float("nan")
        points[grow] = (out.xla_flops, out.xla_seconds, np.nan if out.xla_bytes is None else out.xla_bytes)
        spent += out.seconds
    total = np.asarray(points[None], dtype=np.float64)
    for n in names:
        total += (np.subtract(points[n], points[None]) / step) * (full[n] - base)
    flops, seconds, traffic = total.tolist()
    how = (f"extrapolated from {len(points)} shallow unrolled compiles ({base} layers per stack, +{step} per stack)")
    return Estimate(flops, seconds, how, spent, None if np.isnan(traffic) else traffic)
