"""Shared by the 7B benches: a checkpoint dir in the exact openvla-7b HF layout with random bf16 weights
(written once, streamed tensor by tensor), and child processes measured for peak RSS.

Not a test fixture: 15 GB on disk, minutes to write. Keep it out of the repo and out of CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ovla_jax.checkpoints import hf  # noqa: E402
from ovla_jax.models.config import openvla_config, tiny_openvla_config  # noqa: E402
from ovla_jax.tokenizer import write_llama_style_tokenizer  # noqa: E402

GIB = 1024 ** 3
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ovla_jax", "bench", "openvla-7b-random")
BF16 = np.dtype(ml_dtypes.bfloat16)


def model_config(model: str):
    if model == "7b":
        return openvla_config("dinosiglip-vit-so-224px", hf=json.dumps({"vision_backbone_id": "dinosiglip-vit-so-224px",
                                                                        "llm_backbone_id": "llama2-7b-pure"}))
    return tiny_openvla_config()


def _random_tensor(entry: hf.Entry, rng) -> np.ndarray:
    """A plausible value per kind of tensor (Flax layout): N(0, 0.02) weights, unit norms, zero biases,
    DINOv2's LayerScale at its init, so activations stay finite through 32 random layers."""
    leaf = entry.path[-1]
    if leaf == "bias":
        return np.zeros(entry.jax_shape, BF16)
    if leaf == "scale":
        return np.ones(entry.jax_shape, BF16)
    if leaf == "scale_factor":
        return np.full(entry.jax_shape, 1e-5, BF16)
    return (rng.standard_normal(entry.jax_shape, np.float32) * 0.02).astype(BF16)


def write_random_checkpoint(path: str, model: str = "7b", seed: int = 0, progress: bool = True) -> float:
    """Write (atomically) an HF checkpoint dir with random bf16 weights, the official config.json with
    action statistics for ``bridge_orig``, and a tokenizer. Returns the weights' GiB."""
    config = model_config(model)
    entries = hf.name_map(config)
    rng = np.random.default_rng(seed)
    stats = {"bridge_orig": {"action": {"q01": [-0.03] * 6 + [0.0], "q99": [0.03] * 6 + [1.0],
                                        "mask": [True] * 6 + [False], "mean": [0.0] * 7, "std": [0.01] * 7,
                                        "min": [-0.1] * 6 + [0.0], "max": [0.1] * 6 + [1.0]},
                             "num_transitions": 0, "num_trajectories": 0}}
    staging = path + ".tokenizer"  # a small Llama-style tokenizer (the real one cannot be downloaded here)
    words = ["In: What action should the robot take to pick up the red block?\nOut: ",
             "put place move open close the a on in of to left right front back top bottom",
             "green blue yellow block cup spoon towel drawer pot sink knife carrot eggplant cloth bowl"] * 4
    # Text ids stay below the action tokens (the last 256 of the model's vocabulary): tiny has 64 of them.
    write_llama_style_tokenizer(staging, words, vocab_size=60 if model != "7b" else 1000)
    hf.write_checkpoint(path, hf.HF, config, stats, entries, {e.path: BF16 for e in entries},
                        lambda e: _random_tensor(e, rng), carry_from=staging, progress=progress)
    for name in os.listdir(staging):
        os.remove(os.path.join(staging, name))
    os.rmdir(staging)
    return sum(int(np.prod(e.jax_shape)) * 2 for e in entries) / GIB


def ensure_checkpoint(path: str = DEFAULT_DIR, model: str = "7b") -> str:
    if not os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
        start = time.time()
        size = write_random_checkpoint(path, model)
        print(f"wrote a random {model} checkpoint in the openvla-7b HF layout: {size:.2f} GiB bf16 in "
              f"{time.time() - start:.0f}s -> {path}", flush=True)
    return path


class Child:
    """A child process whose peak RSS is the kernel's own record for it (``wait4``'s ru_maxrss), not a
    sample; its output goes to a temp file."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.log = tempfile.TemporaryFile("w+")
        self.start = time.time()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        self.peak_gib = self.seconds = None

    def running(self) -> bool:
        return not self._reaped()

    def _reaped(self) -> bool:
        """Reap the child if it has exited (recording its peak); never through Popen.poll, whose waitpid
        would drop the rusage."""
        if self.proc.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if not pid:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_gib, self.seconds = usage.ru_maxrss / 1024 ** 2, time.time() - self.start
        return True

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout: float | None = None) -> int:
        while not self._reaped():
            if timeout is not None and time.time() - self.start > timeout:
                self.proc.kill()
            time.sleep(0.2)
        return self.proc.returncode


def run_measured(args: list[str], env: dict | None = None, timeout: float | None = None):
    """Run a child to the end -> (returncode, peak RSS GiB, seconds, output)."""
    child = Child(args, env)
    code = child.wait(timeout)
    return code, child.peak_gib, child.seconds, child.output()
