#!/usr/bin/env python
"""Train-step speed on this machine: ovla-jax against the official PyTorch composition, side by side.

The model (``--model towers``, the default) is the official composition at full size where it costs:
the real DINOv2 ViT-L/14 + SigLIP So400m/14 towers at 224px, the fused projector, and a 2-layer 256-wide
Llama (vocab 32064), batch 2, 96 text tokens + 256 patches, full fine-tuning with AdamW after global-norm
clipping. ``--model mid``: 224px towers of width 256 x 6 blocks and a 4-layer 512-wide Llama.

For each dtype (fp32; bf16 = bf16 operands with fp32 accumulation in ovla-jax, ``torch.autocast`` over
fp32 weights in PyTorch) it prints, measured in this one process:
  - the machine's matmul peak (best 2048^3 matmul of JAX and of PyTorch, fp32 accumulation),
  - step compute times (median; the JAX and PyTorch steps alternate, each on a fresh batch), the
    ratio, and the time spent getting each batch onto the device / into tensors, reported apart,
  - achieved model FLOP/s (``ovla_jax.train.flops``: 6NT-style count of what the model needs, the
    same for both) and its fraction of the peak; XLA's own count of the compiled step too.

    python bench/bench_train.py --vs-torch [--dtypes bfloat16,float32] [--steps 5]
    python bench/bench_train.py --remat-sweep [--dtypes bfloat16]

``--remat-sweep``: each remat policy (none / dots / dots_all / full) in a fresh subprocess: step time,
peak RSS of that process, and XLA's temp buffer size for the step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ovla_jax import sharding  # noqa: E402
from ovla_jax.data.batch import BatchTransform  # noqa: E402
from ovla_jax.models.config import LlamaConfig, openvla_config  # noqa: E402
from ovla_jax.models.openvla import OpenVLA  # noqa: E402
from ovla_jax.tokenizer import CharTokenizer  # noqa: E402
from ovla_jax.train import flops as F  # noqa: E402
from ovla_jax.train import optimizer as O  # noqa: E402
from ovla_jax.train.step import Trainer  # noqa: E402

REMAT_POLICIES = ("none", "dots", "dots_all", "full")
TOWERS_LLM = LlamaConfig(vocab_size=32064, hidden_size=256, intermediate_size=688, num_layers=2, num_heads=4)
MID_LLM = LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8)
MID_VISION = dict(width=256, depth=6, num_heads=4, mlp_dim=1024)


def model_config(name: str):
    hf = json.dumps({"vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-tiny"})
    if name == "towers":
        return openvla_config("dinosiglip-vit-so-224px", llm=TOWERS_LLM, pad_token_id=32000, hf=hf)
    return openvla_config("dinosiglip-vit-so-224px", llm=MID_LLM, vision_overrides=MID_VISION, pad_token_id=32000, hf=hf)


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n x n x n jitted matmul, accumulated in fp32 whatever the operand
    dtype, as the model's products are."""
    kind = jnp.dtype(dtype)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), kind)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), kind)
    f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def host_batches(config, batch: int, count: int, max_length: int = 96, seed: int = 0) -> list[dict]:
    """``count`` distinct random host batches in ovla-jax's layout."""
    tok = CharTokenizer(vocab_size=config.tokenizer_vocab_size)
    bt = BatchTransform(tok, max_length)
    rng = np.random.default_rng(seed)
    size = config.vision[0].image_size
    out = []
    for _ in range(count):
        rows = [bt.example("pick up the red block", a) for a in rng.uniform(-1, 1, (batch, 7))]
        out.append({"input_ids": np.stack([r[0] for r in rows]), "attention_mask": np.stack([r[1] for r in rows]),
                    "labels": np.stack([r[2] for r in rows]),
                    "pixel_values": rng.uniform(-1, 1, (batch, size, size, 3 * len(config.vision))).astype(np.float32),
                    "dataset_id": np.zeros(batch, np.int32)})
    return out


class JaxStep:
    """The real jitted ovla-jax train step (``Trainer``), compiled once for one dtype and remat policy."""

    def __init__(self, config, dtype: str, remat: str, example: dict):
        self.model = OpenVLA(config, dtype=jnp.dtype(dtype), remat=remat)
        self.mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
        self.trainer = Trainer(self.model, O.make_optimizer(lr_schedule=O.schedule("constant", 1e-5)), self.mesh)
        self.state = self.trainer.init(jax.random.PRNGKey(0), example)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step = self.trainer.compile_step(self.batch_sharding)
        t = time.perf_counter()
        self.compiled = step.lower(self.state, jax.device_put(example, self.batch_sharding)).compile()
        self.compile_s = time.perf_counter() - t
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost.get("flops", 0.0))
        memory = self.compiled.memory_analysis()
        self.temp_bytes = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0

    def put(self, batch: dict):
        on_device = jax.device_put(batch, self.batch_sharding)
        jax.block_until_ready(on_device)
        return on_device

    def run(self, on_device) -> float:
        self.state, metrics = self.compiled(self.state, on_device)
        return float(jax.block_until_ready(metrics["loss"]))


class TorchStep:
    def __init__(self, config, dtype: str):
        import torch_openvla

        self.lib, self.dtype = torch_openvla, dtype
        self.model, self.optimizer = torch_openvla.build(config)

    def put(self, batch: dict):
        return self.lib.to_torch(batch)

    def run(self, tensors) -> float:
        return self.lib.train_step(self.model, self.optimizer, tensors, self.dtype)


def timed(step, batch: dict) -> tuple[float, float, float]:
    """(input seconds, compute seconds, loss) of one step on a fresh host batch."""
    t = time.perf_counter()
    ready = step.put(batch)
    t_input = time.perf_counter() - t
    t = time.perf_counter()
    loss = step.run(ready)
    return t_input, time.perf_counter() - t, loss


def model_flops(config, batch: int, max_length: int = 96) -> float:
    """Model FLOPs of one full fine-tuning step (``ovla_jax.train.flops``), the same for both frameworks."""
    return batch * F.example_flops(config, max_length, trainable=lambda path: True).train


def compare(args) -> dict:
    config = model_config(args.model)
    batches = host_batches(config, args.batch, args.steps + 1)
    need = model_flops(config, args.batch)
    print(f"model {args.model}: {sum(t.depth for t in config.vision)} tower blocks "
          f"({'+'.join(str(t.width) for t in config.vision)} wide), Llama {config.llm.num_layers} x "
          f"{config.llm.hidden_size}; batch {args.batch}, 96 text + {config.num_patches} patch tokens; "
          f"model FLOPs per step {need / 1e12:.3f} T (fwd + bwd, {F.FORMULA.split(';')[0]})")
    print(f"machine: {os.cpu_count()} cores, {jax.devices()[0].device_kind}; jax {jax.__version__}", end="")
    torch_lib = None
    if args.vs_torch:
        import torch

        import torch_openvla as torch_lib

        print(f", torch {torch.__version__} ({torch.get_num_threads()} threads)")
    else:
        print()
    results = {"model": args.model, "batch": args.batch, "model_flops": need, "dtypes": {}}
    for dtype in args.dtypes:
        peaks = {"jax": matmul_peak(dtype)}
        if torch_lib is not None:
            peaks["torch"] = torch_lib.matmul_peak(dtype)
        peak = max(peaks.values())
        print(f"\n[{dtype}] matmul peak (2048^3, fp32 accumulation, best of 10): "
              + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s")
        steps = {"ovla-jax": JaxStep(config, dtype, args.remat, batches[0])}
        print(f"  ovla-jax compile {steps['ovla-jax'].compile_s:.1f}s; XLA counts "
              f"{steps['ovla-jax'].xla_flops / 1e12:.3f} TFLOP per step (remat {args.remat})")
        if torch_lib is not None:
            steps["pytorch"] = TorchStep(config, dtype)
        times = {name: {"input": [], "compute": [], "loss": []} for name in steps}
        for i, batch in enumerate(batches):
            for name, step in steps.items():  # alternating, so drift hits both alike
                t_input, t_compute, loss = timed(step, batch)
                if i == 0:
                    continue  # warm-up (PyTorch's first step allocates its optimizer state)
                times[name]["input"].append(t_input)
                times[name]["compute"].append(t_compute)
                times[name]["loss"].append(loss)
        row = {"peak_flops": peaks}
        for name, t in times.items():
            compute, waiting = float(np.median(t["compute"])), float(np.median(t["input"]))
            achieved = need / compute
            row[name] = {"step_s": compute, "input_s": waiting, "steps": t["compute"], "losses": t["loss"],
                         "model_flops_per_s": achieved, "fraction_of_peak": achieved / peak}
            print(f"  {name:9s} step {compute:7.2f} s (median of {len(t['compute'])}; input {waiting * 1e3:.1f} ms "
                  f"apart), {achieved / 1e9:6.0f} GFLOP/s = {achieved / peak:.0%} of the {dtype} peak; "
                  f"losses {', '.join(f'{x:.3f}' for x in t['loss'])}")
        if "pytorch" in row:
            row["ratio"] = row["ovla-jax"]["step_s"] / row["pytorch"]["step_s"]
            print(f"  ovla-jax / pytorch step time: {row['ratio']:.2f}x")
        results["dtypes"][dtype] = row
    if len(args.dtypes) == 2 and "bfloat16" in results["dtypes"] and "float32" in results["dtypes"]:
        for name in ("ovla-jax", "pytorch"):
            if name in results["dtypes"]["bfloat16"]:
                ratio = results["dtypes"]["bfloat16"][name]["step_s"] / results["dtypes"]["float32"][name]["step_s"]
                print(f"{name} bf16 / fp32 step time: {ratio:.2f}x")
    return results


def one_remat(args) -> dict:
    """One policy, in this (fresh) process: step time, peak RSS, XLA temp bytes."""
    config = model_config(args.model)
    batches = host_batches(config, args.batch, args.steps + 1)
    step = JaxStep(config, args.dtypes[0], args.remat, batches[0])
    times = [timed(step, b)[1] for b in batches][1:]
    return {"remat": args.remat, "step_s": float(np.median(times)), "compile_s": step.compile_s,
            "temp_gib": step.temp_bytes / 2 ** 30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def remat_sweep(args) -> dict:
    print(f"remat policies, {args.model} model, {args.dtypes[0]}, batch {args.batch}, each in a fresh process:")
    rows = []
    for policy in REMAT_POLICIES:
        cmd = [sys.executable, os.path.abspath(__file__), "--remat-one", "--remat", policy, "--model", args.model,
               "--dtypes", args.dtypes[0], "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"remat {policy} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {policy:9s} step {row['step_s']:6.2f} s, peak RSS {row['peak_rss_gib']:5.2f} GiB, "
              f"XLA temp {row['temp_gib']:5.2f} GiB (compile {row['compile_s']:.0f}s)")
    base = rows[0]["step_s"]
    print("  time vs none: " + ", ".join(f"{r['remat']} {r['step_s'] / base:.2f}x" for r in rows))
    return {"model": args.model, "dtype": args.dtypes[0], "batch": args.batch, "remat": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="towers", choices=["towers", "mid"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework and dtype (after one warm-up)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float32")
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    p.add_argument("--vs-torch", action="store_true", help="time the official PyTorch composition alongside")
    p.add_argument("--remat-sweep", action="store_true", help="every remat policy in a fresh process")
    p.add_argument("--remat-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in ("bfloat16", "float32")]
    if bad:
        p.error(f"unknown dtype(s) {bad}: use bfloat16 and/or float32")
    if args.remat_one:
        print(json.dumps(one_remat(args)))
        return 0
    results = remat_sweep(args) if args.remat_sweep else compare(args)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
