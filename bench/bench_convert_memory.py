#!/usr/bin/env python
"""Peak memory and time of a full-size checkpoint conversion, measured (not estimated).

Writes a synthetic HF checkpoint in the OpenVLA-7B layout (random bf16 weights, 5 GiB shards), runs
``ovla-jax convert`` HF -> ovla-jax -> HF as child processes, reports each one's peak RSS and wall time
(and the ratio of peak RSS to checkpoint size), then checks the round trip bit-exact tensor by tensor.
Needs ~3x the checkpoint size in free disk (about 46 GB for 7B).

    python bench/bench_convert_memory.py --workdir /tmp/convert-bench [--model 7b|tiny] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ovla_jax.checkpoints import hf  # noqa: E402
from ovla_jax.checkpoints.tensor_dir import TensorDir, write_tensor_dir  # noqa: E402
from ovla_jax.checkpoints.hf_config import config_to_hf  # noqa: E402
from ovla_jax.models.config import openvla_config, tiny_openvla_config  # noqa: E402

GIB = 1024**3


def write_synthetic(path: str, model: str) -> int:
    if model == "7b":
        config = openvla_config("dinosiglip-vit-so-224px", hf=json.dumps({"vision_backbone_id": "dinosiglip-vit-so-224px",
                                                                         "llm_backbone_id": "llama2-7b-pure"}))
    else:
        config = tiny_openvla_config()
    entries = hf.name_map(config)
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    items = [(e.hf_name, e.hf_shape, bf16) for e in entries]
    os.makedirs(path)
    write_tensor_dir(path, "model", items, lambda k: (rng.standard_normal(dict((n, s) for n, s, _ in items)[k], np.float32)
                                                      * 0.02).astype(bf16), 5 * GIB)
    with open(os.path.join(path, hf.CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(config, {}, "bfloat16", False), f, indent=2)
    return sum(int(np.prod(s)) * 2 for _, s, _ in items)


def run_measured(args: list[str]) -> tuple[float, float]:
    """(peak RSS GiB, seconds) of one child process."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 1024**2, time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/ovla-convert-bench")
    parser.add_argument("--model", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    src, mid, back = (os.path.join(args.workdir, n) for n in ("hf", "jax", "hf-back"))
    start = time.time()
    size = write_synthetic(src, args.model)
    print(f"synthetic {args.model} HF checkpoint: {size / GIB:.2f} GiB bf16, written in {time.time() - start:.0f}s")
    convert = [sys.executable, "-m", "ovla_jax", "convert", "--quiet"]
    for label, cmd in (("HF -> ovla-jax", convert + ["--from", "hf", "--to", "jax", src, mid]),
                       ("ovla-jax -> HF", convert + ["--from", "jax", "--to", "hf", mid, back])):
        peak, seconds = run_measured(cmd)
        print(f"{label}: peak RSS {peak:.2f} GiB ({peak * GIB / size:.3f} x checkpoint size), {seconds:.0f}s "
              f"({size / GIB / seconds:.2f} GiB/s)")
    a, b = TensorDir(src, "model"), TensorDir(back, "model")
    assert set(a.files) == set(b.files), "key sets differ"
    for key in sorted(a.files):
        x, y = a.read(key), b.read(key)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            raise SystemExit(f"round trip differs at {key}")
    print(f"round trip HF -> ovla-jax -> HF: {len(a.files)} tensors, identical key set, bit-exact")
    if not args.keep:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
