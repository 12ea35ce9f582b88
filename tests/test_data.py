"""RLDS pipeline tests on the real Bridge V2 sample in ../shared and on RLDS datasets written here."""
import os
from collections import Counter

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from ovla_jax import actions as A  # noqa: E402
from ovla_jax.data import frames as F  # noqa: E402
from ovla_jax.data import rlds_writer as W  # noqa: E402
from ovla_jax.data import traj_transforms as TT  # noqa: E402
from ovla_jax.data.batch import BatchTransform, decode_label_actions  # noqa: E402
from ovla_jax.data.errors import DataError  # noqa: E402
from ovla_jax.data.oxe import registry  # noqa: E402
from ovla_jax.data.oxe.transforms import identity  # noqa: E402
from ovla_jax.data.pipeline import DataConfig, make_frames, numpy_batches  # noqa: E402
from ovla_jax.tokenizer import CharTokenizer  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
BRIDGE = os.path.join(SHARED_DATA, "bridge_dataset", "1.0.0")
needs_bridge = pytest.mark.skipif(not os.path.isdir(BRIDGE), reason="../shared/data/bridge_dataset not present")


def bridge_cfg(tmp_path, **kw):
    kw.setdefault("image_size", 224)
    return DataConfig(data_dir=SHARED_DATA, mixture="bridge_dataset", stats_cache_dir=str(tmp_path / "stats"),
                      shuffle_buffer=64, threads=2, **kw)


def _np_binarize(g):
    out, carry = np.empty_like(g), g[-1]
    for t in range(len(g) - 1, -1, -1):
        carry = 1.0 if g[t] > 0.95 else 0.0 if g[t] < 0.05 else carry
        out[t] = carry
    return out


def _np_bridge_actions(split):
    """Independent numpy standardization of the raw Bridge episodes -> [(instruction, actions[T, 7])]."""
    builder = tfds.builder_from_directory(BRIDGE)
    out = []
    for ep in builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()}).as_numpy_iterator():
        a, s = ep["steps"]["action"][1:], ep["steps"]["observation"]["state"][1:]
        g = _np_binarize(a[:, -1])
        act = np.concatenate([s[1:, :6] - s[:-1, :6], g[:-1, None]], axis=1)
        out.append((ep["steps"]["language_instruction"][0].decode(), act.astype(np.float32)))
    return out


@needs_bridge
def test_bridge_frames_schema_and_normalized_range(tmp_path):
    frames, stats = make_frames(bridge_cfg(tmp_path), "train", train=False)
    frame = next(frames.as_numpy_iterator())
    assert frame["pixel_values"].shape == (224, 224, 6) and frame["pixel_values"].dtype == np.float32
    assert frame["image"].shape == (1, 224, 224, 3) and frame["image"].dtype == np.uint8
    assert frame["action"].shape == (1, 7) and frame["action"].dtype == np.float32
    assert frame["dataset_name"] == b"bridge_dataset" and frame["task"]["language_instruction"]
    actions = np.concatenate([f["action"] for f in frames.as_numpy_iterator()])
    assert np.abs(actions[:, :6]).max() <= 1.0 and np.abs(actions[:, :6]).max() > 0.9
    assert set(np.unique(actions[:, 6])) <= {0.0, 1.0}  # the gripper is binarized, not normalized


@needs_bridge
def test_bridge_statistics_match_numpy_and_are_cached(tmp_path):
    cfg = bridge_cfg(tmp_path)
    _, stats = make_frames(cfg, "train", train=False)
    want = np.concatenate([a for _, a in _np_bridge_actions("train") + _np_bridge_actions("val")]).astype(np.float64)
    got = stats["bridge_dataset"]
    assert got["num_transitions"] == len(want) and got["num_trajectories"] == 50
    np.testing.assert_allclose(got["action"]["mean"], want.mean(0), atol=1e-6)
    np.testing.assert_allclose(got["action"]["std"], want.std(0), atol=1e-6)
    np.testing.assert_allclose(got["action"]["q01"], np.quantile(want, 0.01, axis=0), atol=1e-6)
    np.testing.assert_allclose(got["action"]["q99"], np.quantile(want, 0.99, axis=0), atol=1e-6)
    np.testing.assert_allclose(got["action"]["min"], want.min(0), atol=1e-7)
    assert got["action"]["mask"] == [True] * 6 + [False]
    cached = os.listdir(tmp_path / "stats")
    assert len(cached) == 1 and cached[0].startswith("bridge_dataset-")


@needs_bridge
def test_full_unshuffled_pass_yields_every_frame_once(tmp_path):
    frames, stats = make_frames(bridge_cfg(tmp_path, image_size=32), "train", train=False)
    st = stats["bridge_dataset"]["action"]
    got = Counter((f["task"]["language_instruction"].decode(), tuple(np.round(f["action"][0], 5)))
                  for f in frames.as_numpy_iterator())
    want = Counter((instr, tuple(np.round(row, 5))) for instr, acts in _np_bridge_actions("train")
                   for row in np.asarray(A.normalize_bounds_q99(acts, st)))
    assert sum(got.values()) == sum(want.values()) == 200
    assert got == want


@needs_bridge
def test_same_seed_same_batches_different_seed_differs(tmp_path):
    def first_batches(seed):
        frames, _ = make_frames(bridge_cfg(tmp_path, image_size=64, augment=True), "train", train=True, seed=seed)
        it = numpy_batches(frames, 8)
        return [next(it) for _ in range(3)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
        np.testing.assert_array_equal(x["action"], y["action"])
    assert any(not np.array_equal(x["action"], z["action"]) for x, z in zip(a, c))


@needs_bridge
def test_resume_from_start_index_continues_the_same_stream(tmp_path):
    cfg = bridge_cfg(tmp_path, image_size=32, augment=True)
    full, _ = make_frames(cfg, "train", train=True, seed=3)
    stream = [f for _, f in zip(range(24), full.as_numpy_iterator())]
    resumed, _ = make_frames(cfg, "train", train=True, seed=3, start_index=16)
    for want, got in zip(stream[16:], resumed.as_numpy_iterator()):
        np.testing.assert_array_equal(want["image"], got["image"])  # augmentation included
        np.testing.assert_array_equal(want["action"], got["action"])


@needs_bridge
def test_processes_read_disjoint_shares(tmp_path):
    cfg = bridge_cfg(tmp_path, image_size=16)
    keys = []
    for index in range(2):
        frames, _ = make_frames(cfg, "train", train=False, process_index=index, process_count=2)
        keys.append({(f["task"]["language_instruction"], f["action"].tobytes()) for f in frames.as_numpy_iterator()})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0]) + len(keys[1]) == len({*keys[0], *keys[1]}) > 150


def _toy_dataset(data_dir, name, n_episodes, length=10, seed=0, image_key="image", instruction="push the block"):
    rng = np.random.default_rng(seed)
    episodes = [W.episode({image_key: rng.integers(0, 255, (length, 24, 24, 3), dtype=np.uint8)},
                          np.concatenate([rng.normal(size=(length, 6)), rng.integers(0, 2, (length, 1))], 1),
                          f"{instruction} {i}" if instruction else "") for i in range(n_episodes)]
    W.write_rlds(str(data_dir), name, {"train": episodes}, [image_key], (24, 24, 3))
    registry.register(registry.DatasetSpec(name=name, cameras={"primary": "image", "secondary": None, "wrist": None},
                                           state_encoding=registry.StateEncoding.NONE,
                                           action_encoding=registry.ActionEncoding.EEF_POS, standardize=identity))


def test_generated_rlds_dataset_flows_end_to_end_and_labels_round_trip(tmp_path):
    _toy_dataset(tmp_path, "toy_e2e", 4)
    cfg = DataConfig(data_dir=str(tmp_path), mixture="toy_e2e", image_size=28, stats_cache_dir=str(tmp_path / "s"),
                     threads=2)
    frames, stats = make_frames(cfg, "train", train=False)
    tokenizer = CharTokenizer()
    batch = BatchTransform(tokenizer, max_length=128)(next(numpy_batches(frames, 5)))
    assert batch.pixel_values.shape == (5, 28, 28, 6) and batch.input_ids.shape == (5, 128)
    assert (batch.input_ids[:, 0] == tokenizer.bos_id).all()
    n_labels = (batch.labels != -100).sum(1)
    assert (n_labels == 8).all()  # 7 action tokens + EOS
    decoded = decode_label_actions(batch, tokenizer.vocab_size)
    assert np.abs(decoded - batch.actions).max() <= 2.0 / 255 + 1e-6  # within one bin
    assert stats["toy_e2e"]["num_trajectories"] == 4


def test_mixture_proportions_follow_weights_times_size(tmp_path):
    _toy_dataset(tmp_path, "toy_small", 10, seed=1)
    _toy_dataset(tmp_path, "toy_large", 20, seed=2)
    cfg = DataConfig(data_dir=str(tmp_path), mixture=[("toy_small", 3.0), ("toy_large", 1.0)], image_size=8,
                     stats_cache_dir=str(tmp_path / "s"), shuffle_buffer=50, threads=2)
    frames, _ = make_frames(cfg, "train", train=True, seed=0)
    names = Counter(f["dataset_name"] for _, f in zip(range(6000), frames.as_numpy_iterator()))
    expected = 3 * 100 / (3 * 100 + 1 * 200)  # weight x num_transitions, normalized
    assert abs(names[b"toy_small"] / 6000 - expected) < 0.02, names


def test_augmentation_seeded_uint8_and_off_means_plain_resize():
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    a1 = F.augment(image, tf.constant([1, 2])).numpy()
    a2 = F.augment(image, tf.constant([1, 2])).numpy()
    a3 = F.augment(image, tf.constant([1, 3])).numpy()
    assert a1.dtype == np.uint8 and a1.shape == (64, 64, 3)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3) and not np.array_equal(a1, image.numpy())


def test_batched_inference_pixels_equal_the_per_image_pipeline_ops():
    """The policy's fast path (one traced resize for a batch, numpy normalization) gives the very
    pixels of the pipeline's per-image TF ops, for down- and up-sizing and several batch sizes."""
    rng = np.random.default_rng(0)
    for batch, side, size in ((1, 64, 56), (5, 40, 56), (3, 224, 224)):
        images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        resized = F.resize_batch(images, size)
        per_image = np.stack([F.resize(tf.constant(im), size).numpy() for im in images])
        np.testing.assert_array_equal(resized, per_image)
        for towers in (("dinov2", "siglip"), ("siglip",)):
            want = np.stack([F.pixel_values(tf.constant(im), towers).numpy() for im in per_image])
            got = F.pixel_values_np(resized, towers)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)


def test_inference_pixel_lookup_inside_jit_equals_the_pipeline_bit_for_bit():
    """predict_action sends uint8 images and looks pixel values up in the jitted call: every level of
    every channel, for one and two cameras, must give the pipeline's floats exactly."""
    import jax

    from ovla_jax.policy import _lookup_pixels

    rng = np.random.default_rng(3)
    levels = np.stack([np.arange(256, dtype=np.uint8), rng.permutation(256).astype(np.uint8),
                       np.arange(255, -1, -1).astype(np.uint8)], axis=-1).reshape(1, 16, 16, 3)
    wrist = rng.integers(0, 256, levels.shape, dtype=np.uint8)
    for towers in (("dinov2", "siglip"), ("siglip",)):
        lookup = jax.jit(lambda cams, t=F.pixel_table(towers): _lookup_pixels(t, cams))
        one = np.asarray(lookup(levels))
        assert one.dtype == np.float32 and one.shape == (1, 16, 16, 3 * len(towers))
        np.testing.assert_array_equal(one, F.pixel_values(tf.constant(levels[0]), towers).numpy()[None])
        two = np.asarray(lookup(np.concatenate([levels, wrist], axis=-1)))
        np.testing.assert_array_equal(two, np.concatenate([F.pixel_values_np(levels, towers),
                                                           F.pixel_values_np(wrist, towers)], axis=-1))


def test_augment_flag_off_gives_plain_decoded_resized_images(tmp_path):
    _toy_dataset(tmp_path, "toy_plain", 2)
    cfg = DataConfig(data_dir=str(tmp_path), mixture="toy_plain", image_size=32, stats_cache_dir=str(tmp_path / "s"),
                     threads=2, augment=False)
    frames, _ = make_frames(cfg, "train", train=True, seed=0)
    raw = tfds.builder_from_directory(str(tmp_path / "toy_plain" / "1.0.0"))
    encoded = {bytes(e) for ep in raw.as_dataset("train", decoders={"steps": tfds.decode.SkipDecoding()}).as_numpy_iterator()
               for e in ep["steps"]["observation"]["image"]}
    plain = [F.resize(F.decode(tf.constant(e)), 32).numpy() for e in encoded]
    frame = next(frames.as_numpy_iterator())
    assert any(np.array_equal(frame["image"][0], p) for p in plain)


def test_trajectory_transforms():
    traj = {"observation": {"image_primary": tf.constant([b"a", b"b", b"c", b"d"])},
            "task": {"language_instruction": tf.constant([b"x"] * 4)},
            "action": tf.reshape(tf.range(8, dtype=tf.float32), (4, 2))}
    out = TT.chunk(traj, window=2, future=1)
    assert out["observation"]["image_primary"].numpy().tolist() == [[b"a", b"a"], [b"a", b"b"], [b"b", b"c"], [b"c", b"d"]]
    assert out["pad_mask"].numpy().tolist() == [[False, True], [True, True], [True, True], [True, True]]
    assert out["action"].shape == (4, 3, 2) and out["action_pad_mask"].numpy()[-1].tolist() == [True, True, False]
    relabeled = TT.uniform_goal_relabel(traj, tf.constant([0, 1]))
    goals = relabeled["task"]["image_primary"].numpy().tolist()
    assert all(g >= s for g, s in zip(goals, [b"a", b"b", b"c", b"d"]))  # the goal lies in the future
    assert TT.subsample(traj, 2, tf.constant([0, 1]))["action"].shape == (2, 2)
    assert bool(TT.has_language(traj)) and not bool(TT.has_language({"task": {"language_instruction": tf.constant([b""])}}))


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown mixture or dataset 'no_such_mix'"):
        make_frames(DataConfig(data_dir=str(tmp_path), mixture="no_such_mix"), train=False)
    with pytest.raises(DataError, match="unknown dataset 'nonexistent_ds'"):
        make_frames(DataConfig(data_dir=str(tmp_path), mixture=[("nonexistent_ds", 1.0)]), train=False)
    with pytest.raises(DataError, match="bridge_dataset.*not found"):
        make_frames(DataConfig(data_dir=str(tmp_path), mixture="bridge_dataset"), train=False)
    _toy_dataset(tmp_path, "toy_wrong_key", 1, image_key="rgb")
    with pytest.raises(DataError, match="toy_wrong_key.*no image key 'image'"):
        make_frames(DataConfig(data_dir=str(tmp_path), mixture="toy_wrong_key", stats_cache_dir=None), train=False)
    _toy_dataset(tmp_path, "toy_empty", 2, instruction="")  # every episode unlabeled: nothing to train on
    with pytest.raises(DataError, match="toy_empty.*empty"):
        make_frames(DataConfig(data_dir=str(tmp_path), mixture="toy_empty", stats_cache_dir=None), train=False)
    with pytest.raises(DataError, match="berkeley_mvp.*does not feed the VLA"):
        make_frames(DataConfig(data_dir=str(tmp_path), mixture="berkeley_mvp_converted_externally_to_rlds"), train=False)


def test_host_batches_become_sharded_global_arrays(tmp_path):
    """On 8 simulated devices: a host-local Batch -> global arrays sharded over the batch axis."""
    import subprocess
    import sys

    script = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ovla_jax.data.batch import Batch, to_global_arrays
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
b = Batch(input_ids=np.arange(16 * 5, dtype=np.int32).reshape(16, 5), attention_mask=np.ones((16, 5), bool),
          labels=np.zeros((16, 5), np.int32), pixel_values=np.zeros((16, 4, 4, 6), np.float32),
          actions=np.zeros((16, 7), np.float32), dataset_name=np.array(["a", "b"] * 8, object))
g = to_global_arrays(b, NamedSharding(mesh, P(("data", "fsdp"))), dataset_names=["a", "b"])
assert g["input_ids"].shape == (16, 5) and len(g["input_ids"].addressable_shards) == 8
assert g["input_ids"].addressable_shards[0].data.shape == (2, 5)
np.testing.assert_array_equal(np.asarray(g["input_ids"]), b.input_ids)
assert np.asarray(g["dataset_id"]).tolist() == [0, 1] * 8
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@needs_bridge
def test_stats_command_writes_official_format(tmp_path):
    import json
    import subprocess
    import sys

    out_file = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "ovla_jax", "stats", "--data-dir", SHARED_DATA, "--dataset", "bridge_dataset",
           "--out", str(out_file), "--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out_file.read_text())["bridge_dataset"]
    assert set(stats["action"]) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert stats["num_transitions"] == 400 and stats["num_trajectories"] == 50
    bad = subprocess.run(cmd[:7] + ["no_such_dataset"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown dataset 'no_such_dataset'" in bad.stderr


def test_zero_motion_frames_are_dropped_when_the_spec_asks(tmp_path):
    rng = np.random.default_rng(5)
    actions = np.concatenate([rng.normal(size=(10, 6)), np.ones((10, 1))], 1)
    actions[[2, 5, 6], :6] = 0.0  # idle frames
    W.write_rlds(str(tmp_path), "toy_idle", {"train": [W.episode({"image": rng.integers(0, 255, (10, 24, 24, 3), dtype=np.uint8)},
                                                                 actions, "wait then move")]}, ["image"], (24, 24, 3))
    for drop in (False, True):
        registry.register(registry.DatasetSpec(name="toy_idle", cameras={"primary": "image"},
                                               state_encoding=registry.StateEncoding.NONE,
                                               action_encoding=registry.ActionEncoding.EEF_POS, standardize=identity,
                                               drop_zero_motion=drop))
        cfg = DataConfig(data_dir=str(tmp_path), mixture="toy_idle", image_size=8, stats_cache_dir=None, threads=1)
        frames, _ = make_frames(cfg, "train", train=False)
        assert sum(1 for _ in frames.as_numpy_iterator()) == (7 if drop else 10)


def test_instruction_may_appear_only_after_standardization(tmp_path):
    """RT-X-style datasets keep the instruction elsewhere (e.g. the observation); the pipeline must
    accept any dataset whose standardization yields it, and name the dataset when none does."""
    _toy_dataset(tmp_path, "toy_lang", 2)

    def moves_instruction(traj):
        traj = dict(traj)
        traj["instruction"] = traj.pop("language_instruction")
        return traj

    for standardize, ok in ((moves_instruction, True), (lambda traj: {k: v for k, v in traj.items()
                                                                      if k != "language_instruction"}, False)):
        registry.register(registry.DatasetSpec(name="toy_lang", cameras={"primary": "image"},
                                               state_encoding=registry.StateEncoding.NONE,
                                               action_encoding=registry.ActionEncoding.EEF_POS,
                                               standardize=standardize, language_key="instruction"))
        cfg = DataConfig(data_dir=str(tmp_path), mixture="toy_lang", image_size=8, stats_cache_dir=None, threads=1)
        if ok:
            frames, _ = make_frames(cfg, "train", train=False)
            assert next(frames.as_numpy_iterator())["task"]["language_instruction"].startswith(b"push the block")
        else:
            with pytest.raises(DataError, match="toy_lang.*no 'instruction' after standardization"):
                make_frames(cfg, "train", train=False)
