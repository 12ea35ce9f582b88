"""Launch scripts: every --dry-run prints the commands a pod run needs, and launch/local.sh runs a real
two-process training (2 processes x 4 CPU devices through jax.distributed) that survives a SIGTERM to
one process and resumes bitwise exactly."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "bridge_dataset")
TRAIN = ["--config", "configs/train/pretrain_oxe.py", "--workdir", "gs://bucket/runs/7b",
         "--config.batch_size=1024", "--config.data.data_dir=gs://bucket/oxe"]


def script(*args, check=True):
    out = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable))
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("path", ["launch/tpu_vm.sh", "launch/gke/jobset.sh", "launch/slurm_gpu.sbatch",
                                  "launch/local.sh"])
def test_every_script_has_help(path):
    out = script(path, "--help")
    assert out.stdout.startswith("usage:") and "--dry-run" in out.stdout


def test_tpu_vm_dry_runs_print_the_gcloud_commands():
    common = ["--name", "ovla", "--zone", "us-east5-a", "--dry-run"]
    create = script("launch/tpu_vm.sh", "create", *common, "--accelerator-type", "v5p-256", "--spot").stdout
    assert "gcloud compute tpus queued-resources create ovla" in create
    assert "--accelerator-type v5p-256" in create and "--runtime-version v2-alpha-tpuv5" in create
    assert "--spot" in create
    setup = script("launch/tpu_vm.sh", "setup", *common).stdout
    assert "--worker=all" in setup and "pip\\ install" in setup and "tpu-vm scp" in setup
    train = script("launch/tpu_vm.sh", "train", *common, "--", *TRAIN).stdout
    assert "--worker=all" in train and "ovla-jax\\ train\\ --distributed" in train
    for arg in TRAIN[1:]:
        assert arg in train.replace("\\", "")
    for verb, expect in [("logs", "tail"), ("ssh", "tpu-vm ssh ovla"), ("stop", "pkill -TERM"),
                         ("delete", "queued-resources delete ovla"), ("status", "queued-resources describe")]:
        assert expect in script("launch/tpu_vm.sh", verb, *common).stdout.replace("\\", ""), verb
    bad = script("launch/tpu_vm.sh", "train", *common, "--", "--config", "c.py", "--workdir", "/tmp/x", check=False)
    assert bad.returncode == 2 and "not on GCS" in bad.stderr
    assert script("launch/tpu_vm.sh", "frobnicate", check=False).returncode == 2


def test_gke_jobset_renders_one_pod_per_host_running_the_train_command():
    yaml = pytest.importorskip("yaml")
    out = script("launch/gke/jobset.sh", "render", "--name", "ovla-7b", "--accelerator-type", "v5p-256",
                 "--image", "img:1", "--spot", "--", *TRAIN).stdout
    doc = yaml.safe_load(out)
    assert doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 32  # 128 chips, 4 per host
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x8", "cloud.google.com/gke-spot": "true"}
    container = pod["containers"][0]
    assert container["command"] == ["ovla-jax", "train", "--distributed"] and container["args"] == TRAIN
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    applied = script("launch/gke/jobset.sh", "apply", "--name", "x", "--accelerator-type", "v4-8", "--image", "i",
                     "--dry-run", "--", *TRAIN).stdout
    assert "kubectl apply" in applied and "gke-tpu-topology: 2x2x1" in applied
    bad = script("launch/gke/jobset.sh", "render", "--name", "x", "--accelerator-type", "v5p-8", "--image", "i",
                 "--", "--workdir", "/local", check=False)
    assert bad.returncode == 2 and "gs://" in bad.stderr


def test_slurm_dry_run_prints_one_srun_task_per_node():
    out = script("launch/slurm_gpu.sbatch", "--dry-run", "--", *TRAIN).stdout
    assert out.startswith("srun --ntasks-per-node=1") and "ovla-jax\\ train\\ --distributed" in out
    assert all(arg in out.replace("\\", "") for arg in TRAIN)


def test_local_dry_run_prints_one_command_per_process():
    out = script("launch/local.sh", "3", "--port", "4321", "--dry-run", "--", "--config", "c.py", "--workdir", "w").stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert "JAX_NUM_CPU_DEVICES=4" in line and "--coordinator 127.0.0.1:4321" in line
        assert f"--num_processes 3 --process_id {i}" in line and line.endswith(f"w/logs/process-{i}.log 2>&1 &")


# ---------------------------------------------------------------------------------------------------
# The two-process rehearsal

def _local(workdir, tmp_path, steps, validate=False):
    # validate: the Bridge sample's val split gives the two processes 104 and 96 frames (26 and 24 host
    # batches of 4); asking for more batches than either has makes each run out at a different count,
    # which hung the sharded eval before the processes agreed on one.
    evals = ["--config.eval_every=20", "--config.eval_batches=1000"] if validate else ["--config.eval_every=0"]
    args = ["launch/local.sh", "2", "--", "--config", "configs/train/debug.py", "--workdir", str(workdir),
            f"--config.num_steps={steps}", "--config.save_every=10", *evals,
            "--config.log_every=5", f"--config.data.stats_cache_dir={tmp_path / 'stats'}"]
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(["bash", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _final_params(workdir, step):
    from flax import traverse_util

    from ovla_jax.checkpoints.train_dir import load_params

    _, params, _, meta = load_params(str(workdir), step)
    assert meta["process_count"] == 2
    return traverse_util.flatten_dict(params)


@pytest.mark.slow  # minutes on 2 cores: CI runs it after the default suite
@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="Bridge sample not in ../shared")
def test_two_processes_train_survive_sigterm_to_one_and_resume_bitwise(tmp_path):
    steps = 40
    straight = tmp_path / "straight"
    code, out, err = _finish(_local(straight, tmp_path, steps, validate=True))
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    assert sum("val/loss" in r for r in rows) == 2  # uneven validation shares, at steps 20 and 40: no hang
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == steps // 5 and losses[-1] < losses[0] - 0.5, losses  # process 0 alone writes metrics
    assert re.search(r"\[p0\] step 40/40 \(100.0%\) \| [\d.]+ steps/s \| ETA", out)  # plain lines, not a bar
    assert "[p1] step" not in out  # only process 0 reports progress
    assert sorted(os.listdir(straight / "checkpoints")) == ["30", "40"]  # debug config: keep 2

    # SIGTERM to process 1 alone, mid-run: both processes save one common step and exit 0.
    interrupted = tmp_path / "interrupted"
    proc = _local(interrupted, tmp_path, steps)
    pids, deadline = {}, time.time() + 300
    while len(pids) < 2:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "local.sh ended before starting both processes"
        match = re.match(r"local.sh: process (\d) pid (\d+)", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    metrics = interrupted / "metrics.jsonl"
    while not (metrics.exists() and any(json.loads(x)["step"] >= 10 for x in metrics.read_text().splitlines())):
        assert time.time() < deadline and proc.poll() is None, "training did not reach step 10"
        time.sleep(0.2)
    os.kill(pids[1], signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 0, err[-3000:]
    saved = sorted(int(s) for s in os.listdir(interrupted / "checkpoints"))
    stop = saved[-1]
    assert 10 < stop < steps, saved
    logs = [(interrupted / "logs" / f"process-{i}.log").read_text() for i in (0, 1)]
    assert f"preempted (SIGTERM): saved a checkpoint at step {stop}" in logs[0]
    assert all("Traceback" not in log for log in logs), logs
    assert "saved a checkpoint" not in logs[1]  # process 0 alone reports

    # A rerun resumes from that step and ends where the straight run did, bitwise.
    code, out, err = _finish(_local(interrupted, tmp_path, steps))
    assert code == 0, err[-3000:]
    assert "resumed from" in out and f"/{stop} " in out
    assert (interrupted / "logs" / "process-1.log").read_text().count("=== local.sh: process 1 of 2") == 2
    a, b = _final_params(straight, steps), _final_params(interrupted, steps)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.slow  # minutes on 2 cores: CI runs it after the default suite
@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="Bridge sample not in ../shared")
def test_two_processes_train_qlora_on_an_int8_base_and_resume(tmp_path):
    """QLoRA across processes: each of 2 processes x 4 devices reads its shards of the bf16 base checkpoint
    straight into int8 (fsdp, scanned layers, remat), both save the adapters alone, and a rerun reads the
    base back and resumes; the export merges into the base."""
    from flax import traverse_util

    from ovla_jax.checkpoints import hf
    from ovla_jax.checkpoints.train_dir import param_metadata, resolve
    from ovla_jax.models.config import tiny_openvla_config
    from tests.helpers import random_params

    config = tiny_openvla_config()
    base = str(tmp_path / "base")
    hf.save_hf_checkpoint(base, config, random_params(config, seed=2, scale=0.05), {}, dtype="bfloat16")
    workdir = tmp_path / "qlora"

    def run(steps):
        args = ["launch/local.sh", "2", "--", "--config", "configs/train/debug.py:lora", "--workdir", str(workdir),
                f"--config.num_steps={steps}", "--config.save_every=3", "--config.eval_every=0", "--config.log_every=1",
                f"--config.init_checkpoint={base}", "--config.frozen_quantize=int8", "--config.scan_layers=true",
                "--config.remat=full", "--config.dtype=bfloat16", f"--config.data.stats_cache_dir={tmp_path / 'stats'}"]
        env = dict(os.environ, PYTHON=sys.executable)
        env.pop("XLA_FLAGS", None)
        out = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        logs = [(workdir / "logs" / f"process-{i}.log").read_text() for i in (0, 1)]
        assert out.returncode == 0 and all("Traceback" not in log for log in logs), (out.stderr[-2000:], logs)
        return out

    run(3)
    stored = param_metadata(resolve(str(workdir)))
    assert stored and all(p[-1] in ("lora_a", "lora_b") for p in stored)  # the int8 base is not saved
    out = run(6)
    assert "resumed from" in out.stdout
    losses = [json.loads(line)["train/loss"] for line in open(workdir / "metrics.jsonl") if "train/loss" in line]
    assert len(losses) == 6 and np.isfinite(losses).all()
    from ovla_jax.convert import convert

    convert(str(workdir), str(tmp_path / "export"), "train", "hf", progress=False)
    exported = traverse_util.flatten_dict(hf.load_hf_checkpoint(str(tmp_path / "export"))[1])
    original = traverse_util.flatten_dict(hf.load_hf_checkpoint(base)[1])
    changed = [k for k in original if not np.array_equal(exported[k], original[k])]
    assert changed and all(k[-1] == "kernel" for k in changed)  # adapters merged into kernels, the rest as it was
