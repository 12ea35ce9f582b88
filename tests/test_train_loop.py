"""The training loop end to end on the Bridge sample: resume after SIGTERM is bitwise exact, NaN stops
naming the step, LoRA runs export merged, converted checkpoints load straight into shards, and the
debug config trains from the command line with a falling loss."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from configs.train import debug
from ovla_jax import sharding
from ovla_jax.checkpoints.hf import HF, save_checkpoint
from ovla_jax.checkpoints.jax_format import load_jax_checkpoint, save_jax_checkpoint
from ovla_jax.checkpoints.sharded import load_sharded_params
from ovla_jax.models.lora import LoRA, merge_lora
from ovla_jax.models.openvla import OpenVLA
from ovla_jax.train.loop import train
from tests.conftest import tiny_config
from tests.helpers import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "bridge_dataset")
needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="Bridge sample not in ../shared")
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def small_config(tmp_path, **overrides):
    c = debug.get_config()
    c.data.stats_cache_dir = str(tmp_path / "stats")
    c.batch_size, c.log_every, c.eval_every = 8, 5, 0
    for k, v in overrides.items():
        target = c
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return c


def flat_params(state):
    return traverse_util.flatten_dict(jax.device_get(state.params))


@needs_sample
def test_sigterm_saves_and_resume_is_bitwise_exact(tmp_path):
    cfg = small_config(tmp_path, num_steps=20, save_every=10)
    straight = train(cfg, str(tmp_path / "straight"), progress=False)
    assert straight.status == "done" and straight.step == 20

    def preempt(step):
        if step == 13:
            os.kill(os.getpid(), signal.SIGTERM)

    # A save is due at 10; SIGTERM at 13 saves 13 and exits cleanly, leaving a restorable checkpoint.
    first = train(cfg, str(tmp_path / "resumed"), progress=False, on_step=preempt)
    assert first.status == "preempted" and first.step == 13
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["10", "13"]
    # Resume from the SIGTERM checkpoint (13) and, in a copy without it, from the periodic one (10).
    shutil.copytree(tmp_path / "resumed", tmp_path / "from10")
    shutil.rmtree(tmp_path / "from10" / "checkpoints" / "13")
    a = flat_params(straight.state)
    mu_a = jax.tree.leaves(jax.device_get(straight.state.opt_state))
    for name in ("resumed", "from10"):
        again = train(cfg, str(tmp_path / name), progress=False)
        assert again.status == "done" and again.step == 20
        b = flat_params(again.state)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
        mu_b = jax.tree.leaves(jax.device_get(again.state.opt_state))
        assert all(np.array_equal(x, y) for x, y in zip(mu_a, mu_b)), name


@needs_sample
def test_nonfinite_loss_stops_and_names_the_step(tmp_path):
    cfg = small_config(tmp_path, num_steps=20, save_every=100, log_every=1, **{"optimizer.lr": 1e30,
                                                                             "optimizer.schedule": "constant"})
    result = train(cfg, str(tmp_path / "run"), progress=False)
    assert result.status == "nan" and 1 < result.step < 20
    assert f"at step {result.step}" in result.message
    assert all(np.isfinite(h["train/loss"]) for h in result.history)  # logged steps were all finite
    assert not os.listdir(tmp_path / "run" / "checkpoints")  # nothing non-finite was saved


@needs_sample
def test_lora_run_exports_merged_weights(tmp_path):
    from ovla_jax.convert import convert

    cfg = small_config(tmp_path, num_steps=4, save_every=4, mode="lora", **{"lora.rank": 4, "optimizer.lr": 1e-2})
    result = train(cfg, str(tmp_path / "run"), progress=False)
    params = jax.device_get(result.state.params)
    assert any(k[-1] == "lora_b" and np.abs(v).max() > 0 for k, v in traverse_util.flatten_dict(params).items())
    convert(str(tmp_path / "run"), str(tmp_path / "export"), "train", "jax", progress=False)
    config, exported, norm_stats = load_jax_checkpoint(str(tmp_path / "export"))
    assert "bridge_dataset" in norm_stats and norm_stats["bridge_dataset"]["num_transitions"] > 0
    merged = traverse_util.flatten_dict(merge_lora(params, LoRA(rank=4, alpha=4.0)))  # alpha: min(rank, 16)
    exported = traverse_util.flatten_dict(exported)
    assert exported.keys() == merged.keys()
    for k in merged:
        np.testing.assert_allclose(exported[k], merged[k], rtol=0, atol=1e-6, err_msg=str(k))
    # Layering: inference loads a train checkpoint (LoRA merged, the run's tokenizer) with no training code;
    # the path is relative to the caller's directory.
    probe = ("import sys, numpy as np\n"
             "from ovla_jax.policy import OpenVLAPolicy\n"
             "p = OpenVLAPolicy.from_pretrained('run')\n"
             "a = p.predict_action(np.zeros((64, 64, 3), np.uint8), 'pick up the block')\n"
             "assert a.shape == (7,) and np.isfinite(a).all(), a\n"
             "print(sorted(m for m in sys.modules if m.startswith('ovla_jax.train')))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "XLA_FLAGS": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.parametrize("layout", ["jax", "hf"])
def test_converted_checkpoint_loads_straight_into_shards(tmp_path, layout):
    config = tiny_config()
    params = random_params(config, seed=3)
    path = str(tmp_path / "ckpt")
    if layout == "jax":
        save_jax_checkpoint(path, config, params)
    else:
        save_checkpoint(path, HF, config, params)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = OpenVLA(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 6), np.float32),
                                              np.zeros((1, 8), np.int32))["params"])
    shardings = sharding.param_shardings(boxed, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), meta.unbox(boxed), shardings)
    loaded = load_sharded_params(path, target)
    up = loaded["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding == shardings["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert up.addressable_shards[0].data.shape == (16, 64)
    want, got = traverse_util.flatten_dict(params), traverse_util.flatten_dict(jax.device_get(loaded))
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


@needs_sample
def test_debug_config_trains_from_the_command_line(tmp_path):
    workdir = tmp_path / "debug"
    cmd = [sys.executable, "-m", "ovla_jax", "train", "--config", os.path.join(ROOT, "configs/train/debug.py"),
           "--workdir", str(workdir), "--config.num_steps=40", "--config.eval_every=20", "--noprogress",
           f"--config.data.stats_cache_dir={tmp_path / 'stats'}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    assert any("val/loss" in r for r in rows)
    assert os.listdir(workdir / "tensorboard") and "40" in os.listdir(workdir / "checkpoints")


def test_train_cli_reports_bad_configs(tmp_path, capsys):
    from ovla_jax.cli import main

    cfg = os.path.join(ROOT, "configs/train/debug.py")
    cases = [
        (["--workdir", str(tmp_path)], "--config is required"),
        (["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)], "nope.py' not found"),
        (["--config", cfg], "--workdir is required"),
        (["--config", cfg, "--workdir", str(tmp_path / "w"), "--config.data.data_dir=/nonexistent"],
         "/nonexistent/bridge_dataset not found"),
        (["--config", cfg, "--workdir", str(tmp_path), "--config.no_such_field=1"], "no_such_field"),
        (["--config", cfg, "--workdir", str(tmp_path), "--coordinator", "127.0.0.1:1"], "go together"),
        (["--config", cfg, "--workdir", str(tmp_path), "--coordinator=127.0.0.1:1", "--num-processes=2",
          "--process-id=5"], "--process_id 5 is not in 0..1"),
    ]
    if os.path.isdir(SAMPLE):  # these are checked once the data is found (the debug config reads ../shared)
        cases += [
            (["--config", cfg, "--workdir", str(tmp_path / "w"), "--config.mode=lora"], "lora.rank > 0"),
            (["--config", cfg, "--workdir", str(tmp_path / "w"), "--config.param_init=xavier"],
             "param_init 'xavier': choose from ('hf', 'fan_in')"),
        ]
    for argv, message in cases:
        assert main(["train"] + argv) == 2, argv
        assert message in capsys.readouterr().err, argv
