"""Your own data: spec files declare a dataset without code; ``ovla-jax import`` round-trips LeRobot and
HDF5 (robomimic, ACT) datasets exactly; the state becomes proprio when the spec names it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ovla_jax.data import spec_file  # noqa: E402
from ovla_jax.data.errors import DataError  # noqa: E402
from ovla_jax.data.importers import example  # noqa: E402
from ovla_jax.data.importers import open_reader, write  # noqa: E402
from ovla_jax.data.pipeline import DataConfig, make_frames  # noqa: E402

EPISODES = example.episodes(num=4, length=8, size=16, seed=1)  # 8 frames: one held-out episode fills a batch


def _read_back(data_dir, name):
    builder = tfds.builder_from_directory(os.path.join(data_dir, name, "1.0.0"))
    return [{"steps": list(ep["steps"])} for ep in tfds.as_numpy(builder.as_dataset(split="train"))]


def _assert_same(written, truth, cameras, with_state=True):
    assert len(written) == len(truth)
    by_first_action = {np.asarray(w["actions"][0], np.float32).tobytes(): w for w in truth}
    for got in written:  # tfds stores episodes in an order of its own (by a hash of their index)
        steps = got["steps"]
        want = by_first_action[steps[0]["action"].tobytes()]
        np.testing.assert_array_equal(np.stack([s["action"] for s in steps]), want["actions"])
        if with_state:
            np.testing.assert_array_equal(np.stack([s["observation"]["state"] for s in steps]), want["state"])
        for ours, theirs in cameras.items():
            np.testing.assert_array_equal(np.stack([s["observation"][ours] for s in steps]), want["images"][theirs])
        assert {s["language_instruction"].decode() for s in steps} == {want["instruction"]}


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_import_round_trips_exactly(tmp_path, version):
    pytest.importorskip("av")
    pytest.importorskip("pyarrow")
    src = example.write_lerobot(str(tmp_path / "lerobot"), EPISODES, version=version)
    path, spec_path, summary = write(open_reader("lerobot", src), str(tmp_path / "data"), "lr", progress=False)
    _assert_same(_read_back(tmp_path / "data", "lr"), EPISODES, {"image": "image", "wrist_image": "wrist_image"})
    assert summary.episodes == 4 and summary.steps == 32
    spec = spec_file.load(spec_path)
    assert spec.cameras["primary"] == "image" and spec.cameras["wrist"] == "wrist_image" and spec.state_keys == ("state",)


def test_hdf5_imports_round_trip_exactly(tmp_path):
    pytest.importorskip("h5py")
    rm = example.write_robomimic(str(tmp_path / "demos.hdf5"), EPISODES)
    reader = open_reader("hdf5", rm, state_keys=["robot0_eef_pos", "robot0_eef_rot", "robot0_gripper_qpos"])
    _, spec_path, _ = write(reader, str(tmp_path / "data"), "rm", progress=False)
    _assert_same(_read_back(tmp_path / "data", "rm"), EPISODES,
                 {"agentview_image": "image", "robot0_eye_in_hand_image": "wrist_image"})
    assert spec_file.load(spec_path).cameras["wrist"] == "robot0_eye_in_hand_image"
    act = example.write_act(str(tmp_path / "act"), EPISODES)
    write(open_reader("hdf5", act), str(tmp_path / "data"), "act", val_episodes=1, progress=False)
    _assert_same(_read_back(tmp_path / "data", "act"), EPISODES[:3], {"cam_high": "image", "cam_left_wrist": "wrist_image"})


def test_import_errors_name_the_problem_and_leave_nothing(tmp_path):
    pytest.importorskip("h5py")
    rm = example.write_robomimic(str(tmp_path / "demos.hdf5"), EPISODES, with_instruction=False)
    cmd = [sys.executable, "-m", "ovla_jax", "import", "hdf5", rm, "--data-dir", str(tmp_path / "data"), "--name", "x",
           "--noprogress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "pass --instruction TEXT" in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "data" / "x")
    out = subprocess.run(cmd + ["--instruction", "stack", "--state-keys", "robot0_joint_pos"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "no state key 'robot0_joint_pos'" in out.stderr and "robot0_eef_pos" in out.stderr


def _spec(tmp_path, **fields):
    base = {"name": "own", "cameras": {"primary": "image", "wrist": "wrist_image"},
            "action": {"gripper": {"dim": -1, "open": 1.0, "closed": 0.0}}, "state": ["state"]}
    base.update(fields)
    path = tmp_path / "own.json"
    path.write_text(json.dumps(base))
    return str(path)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    pytest.importorskip("h5py")
    root = tmp_path_factory.mktemp("own")
    act = example.write_act(str(root / "act"), EPISODES)
    write(open_reader("hdf5", act, cameras=["cam_high", "cam_left_wrist"]), str(root / "data"), "own", progress=False)
    return root


def test_spec_state_becomes_proprio_and_a_missing_key_is_named(own_data, tmp_path):
    data = str(own_data / "data")
    specs = (_spec(tmp_path, cameras={"primary": "cam_high", "wrist": "cam_left_wrist"}),)
    cfg = DataConfig(data_dir=data, mixture="own", image_size=16, stats_cache_dir=None, threads=1, proprio=True,
                     wrist=True, dataset_specs=specs)
    frames, stats = make_frames(cfg, "train", train=False)
    frame = next(frames.as_numpy_iterator())
    assert frame["proprio"].shape == (7,) and frame["pixel_values"].shape == (16, 16, 12)
    assert stats["own"]["action"]["mask"] == [True] * 6 + [False]
    state = EPISODES[0]["state"][0]
    expected = 2 * (state - np.array(stats["own"]["proprio"]["q01"])) / (
        np.array(stats["own"]["proprio"]["q99"]) - np.array(stats["own"]["proprio"]["q01"]) + 1e-8) - 1
    np.testing.assert_allclose(frame["proprio"], np.clip(expected, -1, 1), atol=1e-5)
    bad = (_spec(tmp_path, cameras={"primary": "cam_high", "wrist": "cam_left_wrist"}, state=["joint_state"]),)
    with pytest.raises(DataError, match=r"own.*declared in .*own.json.*no state key 'joint_state'"):
        make_frames(DataConfig(data_dir=data, mixture="own", image_size=16, stats_cache_dir=None, threads=1,
                               proprio=True, wrist=True, dataset_specs=bad), "train", train=False)
    with pytest.raises(DataError, match=r"declared in .*own.json.*no image key 'image'"):
        make_frames(DataConfig(data_dir=data, mixture="own", image_size=16, stats_cache_dir=None, threads=1,
                               dataset_specs=(_spec(tmp_path),)), "train", train=False)


def test_spec_gripper_convention_custom_transform_and_normalization(own_data, tmp_path):
    transform = tmp_path / "flip.py"
    transform.write_text("def flip(traj):\n    traj['action'] = traj['action'] * 2.0\n    return traj\n")
    spec = _spec(tmp_path, cameras={"primary": "cam_high"}, normalization="normal", transform="flip.py:flip",
                 action={"gripper": {"dim": 6, "open": 0.0, "closed": 1.0}})
    cfg = DataConfig(data_dir=str(own_data / "data"), mixture="", image_size=16, stats_cache_dir=None, threads=1,
                     dataset_specs=(spec,))
    frames, stats = make_frames(cfg, "train", train=False)
    # The raw gripper is 0 / 1; the transform doubles it (0 / 2), then the declared convention (open = 0,
    # closed = 1) maps g -> 1 - g: 0 -> 1, 2 -> -1. Without the transform it would be 1 / 0.
    assert set(np.concatenate([e["actions"][:, 6] for e in EPISODES])) == {0.0, 1.0}
    assert stats["own"]["action"]["min"][6] == -1.0 and stats["own"]["action"]["max"][6] == 1.0
    motion = next(frames.as_numpy_iterator())["action"][0, :6]
    assert np.abs(motion).max() < 6  # z-scored ("normal"), not clipped to the bins' [-1, 1] necessarily
    with pytest.raises(DataError, match="contradicts the dataset spec"):
        make_frames(DataConfig(data_dir=str(own_data / "data"), mixture="own", image_size=16, stats_cache_dir=None,
                               threads=1, normalization="bounds", dataset_specs=(spec,)), "train", train=False)


@pytest.mark.parametrize("fields, message", [
    ({"name": "a b"}, "'name' must be"),
    ({"cameras": {"wrist": "x"}}, "'cameras' must map 'primary'"),
    ({"action": {"encoding": "joint_velocity"}}, "action.encoding 'joint_velocity'"),
    ({"action": {"gripper": {"dim": -1, "open": 1, "closed": 1}}}, "action.gripper: 'open' and 'closed' must differ"),
    ({"normalization": "minmax"}, "normalization 'minmax'"),
    ({"colour": 1}, r"unknown field\(s\) \['colour'\]"),
    ({"transform": "nowhere.py:f"}, "transform file .*nowhere.py not found"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, fields, message):
    with pytest.raises(DataError, match=rf"dataset spec .*own.json: {message}"):
        spec_file.load(_spec(tmp_path, **fields))


def test_yaml_spec_and_stats_verb(own_data, tmp_path):
    spec = tmp_path / "own.yaml"
    spec.write_text("name: own\ncameras: {primary: cam_high}\naction:\n  gripper: none\nstate: [state]\n")
    out = subprocess.run([sys.executable, "-m", "ovla_jax", "stats", "--data-dir", str(own_data / "data"),
                          "--dataset-spec", str(spec), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["own"]
    assert stats["action"]["mask"] == [True] * 7 and len(stats["proprio"]["q01"]) == 7  # gripper: none
    assert stats["num_trajectories"] == 4


def test_imported_hdf5_dataset_trains_with_the_own_data_config(own_data, tmp_path):
    """The ACT import (no val split: training holds out one of its 4 episodes) trains with
    configs/train/finetune_own.py:tiny: both cameras, the 7-D state as proprio, validation on."""
    import jax

    from configs.train import finetune_own
    from ovla_jax.train.loop import train

    if jax.device_count() % 8:
        pytest.skip("needs the 8 simulated devices of the test setup")
    spec = _spec(tmp_path, cameras={"primary": "cam_high", "wrist": "cam_left_wrist"})
    c = finetune_own.get_config("tiny")
    c.data.data_dir, c.data.dataset_specs = str(own_data / "data"), (spec,)
    c.data.stats_cache_dir = str(tmp_path / "stats")
    c.model.image_size = 28  # 4 patches per camera: the path, not the model, is under test
    c.num_steps, c.eval_every, c.save_every, c.log_every = 4, 2, 4, 2
    result = train(c, str(tmp_path / "run"), progress=False)
    assert result.status == "done" and result.step == 4, result.message
    logged = {k for h in result.history for k in h}
    assert "val/loss" in logged and "train/loss" in logged
    assert all(np.isfinite(h["train/loss"]) for h in result.history if "train/loss" in h)
    meta = json.load(open(tmp_path / "run" / "config.json"))
    assert meta["data"]["mixture"] == "own" and meta["data"]["normalization"] == "bounds_q99"


class _ZeroPolicy:
    """Predicts the normalized action 0 (the middle of every range) for every frame: the metrics then
    equal plain statistics of the held-out truth, computed here independently."""

    def __init__(self, config, norm_stats):
        self.config, self.norm_stats = config, norm_stats
        self.image_size, self.towers, self.normalization = 16, ("dinov2", "siglip"), "bounds_q99"
        self.calls = []

    def predict_normalized(self, cameras, instructions, state=None):
        self.calls.append((cameras.shape, None if state is None else state.shape))
        shape = (len(instructions), self.config.chunk, 7) if self.config.parallel else (len(instructions), 7)
        return np.zeros(shape, np.float32)


@pytest.mark.parametrize("head", ["tokens", "l1"])
def test_offline_evaluation_metrics(own_data, tmp_path, head):
    from ovla_jax import actions as A
    from ovla_jax.eval import offline
    from ovla_jax.models.config import tiny_openvla_config

    spec = _spec(tmp_path, cameras={"primary": "cam_high", "wrist": "cam_left_wrist"})
    oft = dict(action_head="l1", chunk=3, num_images=2, proprio_dim=7) if head == "l1" else {}
    config = tiny_openvla_config(**oft)
    cfg = DataConfig(data_dir=str(own_data / "data"), mixture="own", image_size=16, stats_cache_dir=None, threads=1,
                     dataset_specs=(spec,), future=config.chunk - 1 if config.parallel else 0)
    frames, stats = make_frames(cfg, "val", train=False)
    truth = np.stack([f["action"] for f in frames.as_numpy_iterator()])  # [N, 1 + F, 7] normalized
    valid = np.stack([f["action_pad_mask"] for f in frames.as_numpy_iterator()])
    policy = _ZeroPolicy(config, stats)
    r = offline.evaluate(policy, str(own_data / "data"), "own", "val", batch_size=3, dataset_specs=(spec,),
                         stats_cache_dir=None, progress=False)
    assert r["frames"] == len(truth) == 8  # one held-out episode of 8 steps, batches of 3, 3, 2
    np.testing.assert_allclose(r["l1_normalized"], np.abs(truth[:, 0]).mean(0), atol=1e-6)
    zero_units = A.unnormalize(np.zeros(7), stats["own"]["action"])
    np.testing.assert_allclose(r["l1"], np.abs(A.unnormalize(truth[:, 0], stats["own"]["action"]) - zero_units).mean(0),
                               rtol=1e-5, atol=1e-7)
    if head == "tokens":
        hits = A.encode_actions(truth[:, 0], config.tokenizer_vocab_size) == A.encode_actions(np.zeros(7), config.tokenizer_vocab_size)
        assert r["token_accuracy"] == pytest.approx(hits.mean())
        assert policy.calls[0] == ((3, 16, 16, 3), None)
    else:
        w = valid[:, :3, None].astype(np.float32)
        assert r["chunk_l1_normalized_mean"] == pytest.approx(float((np.abs(truth[:, :3]) * w).sum() / (w.sum() * 7)),
                                                              rel=1e-5)
        assert valid[:, :3].sum() < 8 * 3  # the chunk runs past the episode's end: masked
        assert policy.calls[0] == ((3, 16, 16, 6), (3, 7))  # both cameras, the state
