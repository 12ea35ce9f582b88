#!/usr/bin/env python
"""OpenVLA-7B on one machine, measured: inference and LoRA / QLoRA fine-tuning at the real size.

Writes once (cached) a checkpoint dir in the exact openvla-7b HF layout with random bf16 weights
(15 GB, ``bench/checkpoint_7b.py``), then runs every measurement in its own process and reports the
kernel's peak RSS for it (``wait4``), beside the figures the official PyTorch code needs on a GPU:

- ``predict``: ``OpenVLAPolicy.from_pretrained`` at bf16 / int8 / int4 (weights streamed straight into
  that form), then ``predict_action``: load time, first call (compile), latency of the next calls.
- ``serve``: ``ovla-jax serve`` at the same precisions, up and answering one ``POST /act``.
- ``train``: ``ovla-jax train --config configs/train/finetune_bridge.py:lora`` (rank 32 on every linear
  layer) on the Bridge V2 sample in ../shared/data, from the random checkpoint, with a bf16 / int8 /
  int4 frozen base at batch 1 and 8 (remat full: one device): s/step, model FLOP/s against this
  machine's bf16 matmul peak measured in this run, every loss finite, the adapters changed.
- ``export``: the last training run exported to the HF layout (LoRA merged into the base read back in
  its original precision) and ``predict_action`` on the export.

Not in CI: minutes per step on 2 cores, about an hour all told, 15 GB of disk (+15 GB for the export).

    python bench/bench_7b.py [--only predict,serve,train,export] [--train 1:none:5,8:int8:2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from checkpoint_7b import DEFAULT_DIR, Child, ensure_checkpoint, run_measured  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data")
OFFICIAL = {  # GPU memory the official PyTorch code needs (OpenVLA and OpenVLA-OFT READMEs and issue trackers)
    "predict bfloat16": "16.8 GB", "predict int8": "10.2 GB", "predict int4": "7.0 GB",
    "train": "LoRA: 40 GB A100 at a small batch (RTX 3090 24 GB: out of memory); OFT LoRA 25.6 GB at batch 1",
}
PRECISIONS = (("bfloat16", "none"), ("bfloat16", "int8"), ("bfloat16", "int4"))
INSTRUCTION = "pick up the red block"


def child_predict(path: str, dtype: str, quantize: str, repeats: int) -> None:
    """In the child: load, predict, time; one JSON line on stdout."""
    from ovla_jax.policy import OpenVLAPolicy

    t = time.perf_counter()
    policy = OpenVLAPolicy.from_pretrained(path, dtype=dtype, quantize=quantize)
    loaded = time.perf_counter() - t
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)
    t = time.perf_counter()
    action = policy.predict_action(image, INSTRUCTION, "bridge_orig")
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        policy.predict_action(image, INSTRUCTION, "bridge_orig")
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"load_s": loaded, "first_call_s": first, "latency_s": float(np.median(times)),
                                  "action": np.asarray(action).tolist(), "finite": bool(np.isfinite(action).all()),
                                  "scan": bool(policy.model.scan_layers)}), flush=True)


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def predict(path: str, dtype: str, quantize: str, repeats: int) -> dict:
    code, peak, seconds, out = run_measured([sys.executable, __file__, "--child-predict", path, dtype, quantize,
                                             str(repeats)])
    row = {"what": f"predict {dtype if quantize == 'none' else quantize}", "peak_rss_gib": peak, "wall_s": seconds,
           "ok": code == 0, **_result(out)}
    if code:
        row["error"] = out[-1500:]
    return row


def serve(path: str, dtype: str, quantize: str) -> dict:
    import json_numpy
    import requests

    from ovla_jax.serve.background import free_port

    port = free_port()
    child = Child([sys.executable, "-m", "ovla_jax", "serve", "--checkpoint", path, "--dtype", dtype, "--quantize",
                   quantize, "--max-batch", "1", "--host", "127.0.0.1", "--port", str(port)])
    url, row = f"http://127.0.0.1:{port}", {"what": f"serve {dtype if quantize == 'none' else quantize}"}
    try:
        while child.running() and time.time() - child.start < 1800:
            try:
                if requests.get(url + "/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        row["ready_s"] = time.time() - child.start
        image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), np.uint8)
        body = json_numpy.dumps({"image": image, "instruction": INSTRUCTION, "unnorm_key": "bridge_orig"})
        t = time.perf_counter()
        answer = requests.post(url + "/act", data=body, headers={"Content-Type": "application/json"}, timeout=600)
        row["act_s"] = time.perf_counter() - t
        row["ok"] = bool(answer.ok and np.isfinite(np.asarray(json_numpy.loads(answer.text))).all())
    except Exception as e:  # the server died or never came up: its log says why
        row["ok"], row["error"] = False, f"{e}\n{child.output()[-1500:]}"
    finally:
        if child.running():
            child.proc.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    row["peak_rss_gib"], row["wall_s"] = child.peak_gib, child.seconds
    return row


def train(path: str, workdir: str, batch: int, quantize: str, steps: int, peak_flops: float) -> dict:
    import orbax.checkpoint as ocp
    from flax import traverse_util

    from ovla_jax.checkpoints.hf import read_config
    from ovla_jax.checkpoints.train_dir import resolve
    from ovla_jax.models.lora import LoRA
    from ovla_jax.train.flops import example_flops

    shutil.rmtree(workdir, ignore_errors=True)
    max_length = 96
    cmd = [sys.executable, "-m", "ovla_jax", "train", "--config", os.path.join(ROOT, "configs/train/finetune_bridge.py:lora"),
           "--workdir", workdir, f"--config.init_checkpoint={path}", f"--config.tokenizer={path}",
           f"--config.data.data_dir={os.path.abspath(SAMPLE)}", "--config.data.mixture=bridge_dataset",
           f"--config.batch_size={batch}", f"--config.frozen_quantize={quantize}", "--config.remat=full",
           f"--config.num_steps={steps}", f"--config.save_every={steps}", "--config.eval_every=0",
           "--config.log_every=1", "--config.data.shuffle_buffer=1000", "--config.data.threads=2",
           f"--config.max_length={max_length}", "--noprogress"]
    code, peak, seconds, out = run_measured(cmd)
    row = {"what": f"train batch {batch}, {'bf16' if quantize == 'none' else quantize} base", "batch": batch,
           "frozen_quantize": quantize, "peak_rss_gib": peak, "wall_s": seconds, "ok": code == 0}
    if code:
        row["error"] = out[-2000:]
        return row
    history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    step_s = [1 / h["train/steps_per_second"] for h in history if "train/steps_per_second" in h]
    row.update(losses=[float(x) for x in losses], first_step_s=float(step_s[0]),
               finite=bool(np.all(np.isfinite(losses))))
    if len(step_s) > 1:
        row["step_s"] = float(np.median(step_s[1:]))
        config = read_config(path)[0]
        per_example = example_flops(config, max_length, lambda p: "lora_" in p, LoRA(rank=32, alpha=16.0)).train
        row["model_flops_per_step"] = per_example * batch
        row["flops_per_s"] = per_example * batch / row["step_s"]
        row["fraction_of_bf16_peak"] = row["flops_per_s"] / peak_flops
    stored = ocp.PyTreeCheckpointer().restore(os.path.join(resolve(workdir), "params"))
    # lora_b starts at zero, so a nonzero one was trained; SigLIP's attention-pool head is in the checkpoint
    # (and adapted, as PEFT's all-linear does) but unused by OpenVLA: its adapters get no gradient.
    adapters_b = [float(np.abs(np.asarray(v)).max()) for k, v in traverse_util.flatten_dict(stored).items()
                  if k[-1] == "lora_b" and "attn_pool" not in k]
    row["adapters_changed"] = f"{sum(x > 0 for x in adapters_b)} of {len(adapters_b)} lora_b tensors"
    row["ok"] = bool(row["finite"] and adapters_b and all(x > 0 for x in adapters_b))
    row["checkpoint_mib"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(resolve(workdir))
                                for f in fs) / 2 ** 20
    return row


def export(workdir: str, dst: str, repeats: int) -> list[dict]:
    shutil.rmtree(dst, ignore_errors=True)
    code, peak, seconds, out = run_measured([sys.executable, "-m", "ovla_jax", "convert", "--from", "train", "--to",
                                             "hf", "--quiet", workdir, dst])
    rows = [{"what": "export train -> HF (LoRA merged)", "peak_rss_gib": peak, "wall_s": seconds, "ok": code == 0}]
    if code:
        rows[0]["error"] = out[-1500:]
        return rows
    rows.append(dict(predict(dst, "bfloat16", "none", repeats), what="predict bfloat16 on the export"))
    return rows


def format_row(r: dict) -> str:
    parts = [f"{r['what']:<40}", f"peak RSS {r['peak_rss_gib']:6.2f} GiB" if r.get("peak_rss_gib") else "",
             f"wall {r.get('wall_s', 0):6.0f} s"]
    if "load_s" in r:
        parts.append(f"load {r['load_s']:.0f} s, first call {r['first_call_s']:.1f} s, then {r['latency_s']:.2f} s/call")
    if "ready_s" in r:
        parts.append(f"up after {r['ready_s']:.0f} s, /act {r.get('act_s', float('nan')):.2f} s")
    if "losses" in r:
        parts.append("losses " + " ".join(f"{x:.3f}" for x in r["losses"]) + f" (finite: {r['finite']})")
        if "step_s" in r:
            parts.append(f"{r['step_s']:.1f} s/step (first {r['first_step_s']:.0f} s), "
                         f"{r['flops_per_s'] / 1e9:.0f} GFLOP/s = {r['fraction_of_bf16_peak']:.2f} x bf16 peak")
        parts.append(f"adapters changed: {r.get('adapters_changed')}; checkpoint {r.get('checkpoint_mib', 0):.0f} MiB")
    if not r.get("ok"):
        parts.append("FAILED: " + r.get("error", "")[-300:].replace("\n", " | "))
    return "  ".join(p for p in parts if p)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=DEFAULT_DIR, help="the random 7B checkpoint (written here once)")
    p.add_argument("--model", default="7b", choices=["7b", "tiny"], help="tiny: a seconds-long smoke run of the bench")
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "ovla_jax", "bench", "runs"))
    p.add_argument("--only", default="predict,serve,train,export")
    p.add_argument("--precisions", default="none,int8,int4", help="predict / serve: bf16 weights, or quantized")
    p.add_argument("--train", default="1:none:5,8:int8:2,1:int8:3,1:int4:3,8:int4:2,8:none:2",
                   help="batch:frozen_quantize:steps runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--child-predict", nargs=4, metavar=("DIR", "DTYPE", "QUANTIZE", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_predict:
        path, dtype, quantize, repeats = args.child_predict
        child_predict(path, dtype, quantize, int(repeats))
        return 0
    only = set(args.only.split(","))
    path = ensure_checkpoint(args.dir, args.model)
    rows = []

    def report(row):
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"checkpoint": path, "official": OFFICIAL, "rows": rows}, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    quantizes = args.precisions.split(",")
    if "predict" in only:
        for q in quantizes:
            report(predict(path, "bfloat16", q, args.repeats))
    if "serve" in only:
        for q in quantizes:
            report(serve(path, "bfloat16", q))
    last = None
    if "train" in only:
        import jax.numpy as jnp

        from bench_train import matmul_peak

        peak = matmul_peak(dtype=jnp.bfloat16)
        print(f"this machine's bf16 matmul peak (2048^3, fp32 accumulation, best of 10): {peak / 1e9:.0f} GFLOP/s",
              flush=True)
        for spec in args.train.split(","):
            batch, quantize, steps = spec.split(":")
            last = os.path.join(args.workdir, f"lora-b{batch}-{quantize}")
            report(train(path, last, int(batch), quantize, int(steps), peak))
    if "export" in only and last is not None:
        for row in export(last, os.path.join(args.workdir, "export-hf"), args.repeats):
            report(row)
    print(f"official PyTorch figures: {json.dumps(OFFICIAL)}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
