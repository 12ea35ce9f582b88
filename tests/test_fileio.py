"""Run-directory I/O at URLs: ovla-jax's own files (run config, metrics, TensorBoard, checkpoint listing
and metadata) go through tf.io.gfile for any ``scheme://`` path. GCS itself needs the network, so the
URL path is exercised with TensorFlow's in-memory file system (``ram://``), the same gfile code path;
orbax and tfds bring their own gs:// support."""
import json

import pytest

from ovla_jax import fileio

tf = pytest.importorskip("tensorflow")


def test_url_files_write_atomically_list_and_append_across_reopens():
    root = "ram://fileio-test/run"
    fileio.makedirs(root)
    fileio.write_text(fileio.join(root, "config.json"), json.dumps({"a": 1}))
    assert json.loads(fileio.read_text(fileio.join(root, "config.json"))) == {"a": 1}
    assert fileio.listdir(root) == ["config.json"]  # no temp file left behind
    log = fileio.LineLog(fileio.join(root, "metrics.jsonl"))
    log.write('{"step": 1}')
    log.close()
    log = fileio.LineLog(fileio.join(root, "metrics.jsonl"))  # a resumed run keeps what was there
    log.write('{"step": 2}')
    log.close()
    assert fileio.read_text(fileio.join(root, "metrics.jsonl")).splitlines() == ['{"step": 1}', '{"step": 2}']
    assert fileio.isdir(root) and not fileio.isdir(fileio.join(root, "config.json"))


def test_reporter_writes_metrics_and_tensorboard_to_a_url(capsys):
    from ovla_jax.train.report import Reporter

    workdir = "ram://fileio-test/reporter"
    fileio.makedirs(workdir)
    reporter = Reporter(workdir, total_steps=100, start_step=0, interactive=False)
    reporter.write(10, {"train/loss": 1.5, "train/accuracy": 0.25, "train/steps_per_second": 2.0})
    reporter.close()
    rows = [json.loads(x) for x in fileio.read_text(fileio.join(workdir, "metrics.jsonl")).splitlines()]
    assert rows == [{"step": 10, "train/loss": 1.5, "train/accuracy": 0.25, "train/steps_per_second": 2.0}]
    assert any(n.startswith("events.out.tfevents") for n in fileio.listdir(fileio.join(workdir, "tensorboard")))
    # not a terminal: a plain progress line, no carriage-return bar
    out = capsys.readouterr().out
    assert "step 10/100 (10.0%) | 2.00 steps/s | ETA 00:00:45 | loss 1.5000 | acc 0.250" in out and "\r" not in out


def test_train_checkpoints_resolve_and_read_meta_at_a_url():
    from ovla_jax.checkpoints.train_dir import read_meta, resolve

    ckpts = "ram://fileio-test/ckpt/checkpoints"
    for step in (5, 10):
        fileio.makedirs(fileio.join(ckpts, str(step), "params"))
        fileio.makedirs(fileio.join(ckpts, str(step), "meta"))
        fileio.write_text(fileio.join(ckpts, str(step), "meta", "metadata"), json.dumps({"step": step}))
    step_dir = resolve("ram://fileio-test/ckpt")
    assert step_dir == fileio.join(ckpts, "10") and read_meta(step_dir) == {"step": 10}
    assert resolve("ram://fileio-test/ckpt", 5).endswith("/5")


def test_converted_checkpoint_at_a_url_loads_into_shards(tmp_path):
    """``init_checkpoint`` on GCS: every host of a pod reads the same converted checkpoint."""
    import jax
    import numpy as np
    from flax import traverse_util
    from flax.linen import meta

    from ovla_jax import sharding
    from ovla_jax.checkpoints.jax_format import save_jax_checkpoint
    from ovla_jax.checkpoints.sharded import load_sharded_params
    from ovla_jax.models.openvla import OpenVLA
    from tests.conftest import tiny_config
    from tests.helpers import random_params

    config = tiny_config()
    params = random_params(config, seed=7)
    local = tmp_path / "ckpt"
    save_jax_checkpoint(str(local), config, params)
    url = "ram://fileio-test/ckpt"
    fileio.makedirs(url)
    for name in fileio.listdir(str(local)):
        tf.io.gfile.copy(str(local / name), fileio.join(url, name), overwrite=True)
    model = OpenVLA(config, scan_layers=True)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 6), np.float32),
                                              np.zeros((1, 8), np.int32))["params"])
    shardings = sharding.param_shardings(boxed, sharding.make_mesh({"fsdp": -1}))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), meta.unbox(boxed), shardings)
    loaded = traverse_util.flatten_dict(jax.device_get(load_sharded_params(url, target)))
    from ovla_jax.models.scan import stack_layers

    want = traverse_util.flatten_dict(stack_layers(params))
    assert loaded.keys() == want.keys() and all(np.array_equal(loaded[k], want[k]) for k in want)
