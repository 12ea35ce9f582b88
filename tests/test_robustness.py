"""Review findings of issue 23, each reproduced: per-epoch randomness, validation without a ``val``
split, a non-finite update never saved, multi-process validation with uneven shares, proprio clipping
only under the bounds normalizations, and no libtpu noise on CPU hosts."""
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ovla_jax.data import rlds_writer as W
from ovla_jax.data import traj as T
from ovla_jax.data.errors import DataError
from ovla_jax.data.oxe import registry
from ovla_jax.data.oxe.transforms import identity
from ovla_jax.data.pipeline import DataConfig, make_frames
from ovla_jax.data.proprio import normalize as normalize_proprio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy(data_dir, name, n_episodes, length=10, splits=("train",)):
    rng = np.random.default_rng(0)

    def episodes(offset):
        return [W.episode({"image": rng.integers(0, 255, (length, 8, 8, 3), dtype=np.uint8)},
                          np.concatenate([np.arange(length)[:, None] + 100.0 * (i + offset),
                                          rng.normal(size=(length, 5)), np.ones((length, 1))], 1),
                          f"task {i + offset}") for i in range(n_episodes)]

    W.write_rlds(str(data_dir), name, {s: episodes(100 * k) for k, s in enumerate(splits)}, ["image"], (8, 8, 3))
    registry.register(registry.DatasetSpec(name=name, cameras={"primary": "image"},
                                           state_encoding=registry.StateEncoding.NONE,
                                           action_encoding=registry.ActionEncoding.EEF_POS, standardize=identity))


def _cfg(tmp_path, name, **kw):
    return DataConfig(data_dir=str(tmp_path), mixture=name, image_size=8, stats_cache_dir=None, threads=1,
                      shuffle_buffer=1, **kw)


def test_subsample_draws_differ_per_epoch_and_replay_on_resume(tmp_path):
    _toy(tmp_path, "toy_epochs", 1, length=12)
    cfg = _cfg(tmp_path, "toy_epochs", subsample_length=4, normalization="normal")
    frames, _ = make_frames(cfg, "train", train=True, seed=3)
    stream = [f["action"][0, 0] for _, f in zip(range(40), frames.as_numpy_iterator())]
    epochs = [tuple(np.round(stream[i:i + 4], 4)) for i in range(0, 40, 4)]  # 4 kept frames per epoch
    assert len(set(epochs)) > 5, epochs  # before the fix: one draw, repeated every epoch
    resumed, _ = make_frames(cfg, "train", train=True, seed=3, start_index=22)
    again = [f["action"][0, 0] for _, f in zip(range(18), resumed.as_numpy_iterator())]
    np.testing.assert_array_equal(again, stream[22:])


def test_dataset_without_val_holds_out_episodes_by_index(tmp_path):
    assert [T.held_out_episodes(n) for n in (0, 1, 2, 8, 19, 20, 30, 100)] == [0, 0, 1, 1, 1, 1, 2, 5]
    _toy(tmp_path, "toy_noval", 8)
    train, _ = make_frames(_cfg(tmp_path, "toy_noval"), "train", train=False)
    val, _ = make_frames(_cfg(tmp_path, "toy_noval"), "val", train=False)
    seen = lambda ds: {bytes(f["task"]["language_instruction"]) for f in ds.as_numpy_iterator()}  # noqa: E731
    assert len(seen(train)) == 7 and len(seen(val)) == 1  # the last in file order (tfds orders by key hash)
    assert seen(train) | seen(val) == {f"task {i}".encode() for i in range(8)}
    _toy(tmp_path, "toy_single", 1)
    with pytest.raises(DataError, match="toy_single.*no 'val' split, and 1 episode"):
        make_frames(_cfg(tmp_path, "toy_single"), "val", train=False)
    _toy(tmp_path, "toy_withval", 2, splits=("train", "val"))
    val, _ = make_frames(_cfg(tmp_path, "toy_withval"), "val", train=False)
    assert seen(val) == {b"task 100", b"task 101"}


def test_proprio_clipped_only_under_bounds_normalizations():
    stats = {"q01": [0.0], "q99": [1.0], "min": [0.0], "max": [1.0], "mean": [0.0], "std": [1.0]}
    x = np.array([[5.0]])
    assert normalize_proprio(x, stats, "bounds_q99")[0, 0] == 1.0
    assert normalize_proprio(x, stats, "bounds")[0, 0] == 1.0
    assert normalize_proprio(x, stats, "normal")[0, 0] == pytest.approx(5.0, rel=1e-6)


SAMPLE = os.path.join(ROOT, "..", "shared", "data", "bridge_dataset")


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="Bridge sample not in ../shared")
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_nonfinite_update_is_never_saved(tmp_path):
    """lr = inf: step 1's loss is finite (computed before its update), the update makes the params
    non-finite. Checking losses alone would save them at step 1."""
    from tests.test_train_loop import small_config
    from ovla_jax.train.loop import train

    cfg = small_config(tmp_path, num_steps=3, save_every=1, log_every=1, **{"optimizer.lr": float("inf")})
    result = train(cfg, str(tmp_path / "run"), progress=False)
    assert result.status == "nan" and result.step == 1, result.message
    assert "non-finite after the update of step 1" in result.message
    assert not os.listdir(tmp_path / "run" / "checkpoints")


_TWO_PROCESS = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ovla_jax.train.loop import shared_batches
    mesh = Mesh(np.array(jax.devices()), ("data",))
    mine = 3 if jax.process_index() == 0 else 1  # uneven shares: 3 full batches here, 1 there
    batches = shared_batches(iter([np.full((2,), i, np.float32) for i in range(mine)]), max_batches=8)
    total = jax.jit(lambda x: x.sum())
    for host in batches:
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), host)
        print("sum", float(total(x)), flush=True)
    print("done", len(batches), flush=True)
""")


def test_two_process_validation_with_uneven_shares_finishes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "probe.py"
    script.write_text(_TWO_PROCESS)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process hung in the sharded eval")
    assert all(p.returncode == 0 for p in procs), outs
    assert all("done 1" in o and o.count("sum 0.0") == 1 for o in outs), outs


def test_quiet_start_on_a_cpu_host_with_the_tpu_extra(tmp_path):
    pytest.importorskip("libtpu")
    from ovla_jax.platform import has_gpu_plugin, has_tpu

    if has_tpu() or has_gpu_plugin():
        pytest.skip("this host has an accelerator (or a GPU plugin): JAX's defaults are left alone")
    # What this test process set itself (JAX_PLATFORMS in conftest, the TPU_* of ahead-of-time compiles) stays out.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    out = subprocess.run([sys.executable, "-m", "ovla_jax", "stats", "--data-dir", str(tmp_path), "--dataset",
                          "bridge_orig"], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 2 and "directory" in out.stderr
    probe = subprocess.run([sys.executable, "-c", "import ovla_jax, jax; print(jax.devices())"], capture_output=True,
                           text=True, env=env, cwd=str(tmp_path), timeout=300)
    for text in (out.stderr, probe.stderr):
        for noise in ("Failed to find host bounds", "INVALID_ARGUMENT", "TPU_WORKER_HOSTNAMES", "libtpu", "TPU backend"):
            assert noise not in text, text
    assert "CpuDevice" in probe.stdout
