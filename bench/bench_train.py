#!/usr/bin/env python
"""Train-step throughput on this machine, as a fraction of its own measured matmul peak.

Builds a mid-size OpenVLA (two 224px towers of width 256 x 6 blocks, a 4-layer Llama of width 512,
vocab 32064), runs the real jitted train step (AdamW, full fine-tuning) on random batches, and prints:
  - the fp32 matmul peak of this machine, measured here (best of N square jitted matmuls),
  - model FLOPs per step as counted by XLA for the compiled step (forward + backward + optimizer),
  - achieved FLOP/s and its fraction of the measured peak, and tokens/s (text + image patches).

    python bench/bench_train.py [--batch 8] [--steps 5] [--dtype float32] [--remat none]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.linen import meta  # noqa: E402

from ovla_jax import sharding  # noqa: E402
from ovla_jax.data.batch import BatchTransform  # noqa: E402
from ovla_jax.models.config import LlamaConfig, openvla_config  # noqa: E402
from ovla_jax.models.openvla import OpenVLA  # noqa: E402
from ovla_jax.tokenizer import CharTokenizer  # noqa: E402
from ovla_jax.train import optimizer as O  # noqa: E402
from ovla_jax.train.step import Trainer  # noqa: E402

MID_LLM = LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8)
MID_VISION = dict(width=256, depth=6, num_heads=4, mlp_dim=1024)


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n x n x n jitted matmul (the machine's practical peak), accumulated in
    fp32 whatever the operand dtype, as the model's products are."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--max-length", type=int, default=96)
    args = p.parse_args(argv)

    config = openvla_config("dinosiglip-vit-so-224px", llm=MID_LLM, vision_overrides=MID_VISION,
                            pad_token_id=32000, hf='{"vision_backbone_id": "dinosiglip-vit-so-224px"}')
    model = OpenVLA(config, dtype=jnp.dtype(args.dtype), remat=args.remat)
    tok = CharTokenizer(vocab_size=config.tokenizer_vocab_size)
    bt = BatchTransform(tok, args.max_length)
    rng = np.random.default_rng(0)
    rows = [bt.example("pick up the red block", a) for a in rng.uniform(-1, 1, (args.batch, 7))]
    batch = {"input_ids": np.stack([r[0] for r in rows]), "attention_mask": np.stack([r[1] for r in rows]),
             "labels": np.stack([r[2] for r in rows]),
             "pixel_values": rng.uniform(-1, 1, (args.batch, 224, 224, 6)).astype(np.float32),
             "dataset_id": np.zeros(args.batch, np.int32)}
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    abstract = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["pixel_values"][:1],
                                                            batch["input_ids"][:1])["params"]))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    tx = O.make_optimizer(lr_schedule=O.schedule("constant", 1e-4))
    trainer = Trainer(model, tx, mesh)
    state = trainer.init(jax.random.PRNGKey(0), batch)
    step = trainer.compile_step(sharding.batch_sharding(mesh))
    device_batch = jax.device_put(batch, sharding.batch_sharding(mesh))

    print(f"device: {jax.devices()[0].device_kind} x1, {os.cpu_count()} cores; params {n_params / 1e6:.1f}M; "
          f"batch {args.batch}, compute {args.dtype}, remat {args.remat}")
    peak = matmul_peak(dtype=jnp.float32)
    print(f"measured fp32 matmul peak (2048^3, best of 10): {peak / 1e9:.1f} GFLOP/s")

    t = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    print(f"compile: {time.perf_counter() - t:.1f}s")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    state, metrics = compiled(state, device_batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_time = float(np.median(times))
    tokens = args.batch * (args.max_length + config.num_patches)
    achieved = flops / step_time
    print(f"model FLOPs per step (XLA count, fwd + bwd + AdamW): {flops / 1e9:.1f} GFLOP")
    print(f"step time (median of {args.steps}): {step_time * 1e3:.0f} ms; loss {float(metrics['loss']):.3f}")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.2f} x measured matmul peak")
    print(f"throughput: {tokens / step_time:.0f} tokens/s ({args.batch / step_time:.2f} examples/s, "
          f"{args.max_length} text + {config.num_patches} patch tokens each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
