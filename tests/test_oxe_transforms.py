"""OXE standardization: the gripper conversions, quaternion -> Euler, and recipes on raw-shaped data."""
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from ovla_jax.data.oxe import mixtures, recipes, registry  # noqa: E402
from ovla_jax.data.oxe.transforms import STANDARDIZE  # noqa: E402


def test_relative_gripper_commands_become_absolute():
    # +1 = close, -1 = open, 0 = hold; before the first command the gripper is in the opposite state.
    rel = tf.constant([0.0, 0.0, 1.0, 0.0, -1.0, 0.0])
    np.testing.assert_array_equal(recipes.relative_to_absolute_gripper(rel).numpy(), [1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(recipes.relative_to_absolute_gripper(tf.constant([0.0, -1.0, 0.0])).numpy(), [0, 1, 1])
    np.testing.assert_array_equal(recipes.relative_to_absolute_gripper(tf.zeros(3)).numpy(), [1, 1, 1])


def test_binarize_takes_the_next_decided_state():
    g = tf.constant([1.0, 0.5, 0.3, 0.0, 0.6, 1.0])
    np.testing.assert_array_equal(recipes.binarize_gripper(g).numpy(), [1, 0, 0, 0, 1, 1])


@pytest.mark.parametrize("axis,index", [((1, 0, 0), 0), ((0, 1, 0), 1), ((0, 0, 1), 2)])
def test_quaternion_to_euler_single_axis(axis, index):
    theta = 0.7
    q = [a * math.sin(theta / 2) for a in axis] + [math.cos(theta / 2)]
    euler = recipes.quaternion_to_euler(tf.constant([q])).numpy()[0]
    want = np.zeros(3)
    want[index] = theta
    np.testing.assert_allclose(euler, want, atol=1e-6)


def _raw(action, observation=None, length=4):
    obs = {"state": tf.constant(np.tile([[0.0] * 6 + [1.0]], (length, 1)), tf.float32),
           "natural_language_instruction": tf.constant([b"pick it up"] * length)}
    obs.update(observation or {})
    return {"action": action, "observation": obs, "language_instruction": tf.constant([b"step text"] * length)}


def test_rtx_recipe_fractal():
    wv, rd = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    out = STANDARDIZE["fractal20220817_data"](_raw({"world_vector": wv, "rotation_delta": rd,
                                                    "gripper_closedness_action": tf.constant([[0.0], [1.0], [0.0], [-1.0]])}))
    np.testing.assert_allclose(out["action"].numpy(), np.concatenate([wv, rd, [[1], [0], [0], [1]]], axis=1))
    assert out["language_instruction"].numpy()[0] == b"pick it up"


def test_flat_recipes_invert_and_clip_the_gripper():
    raw = np.array([[0.1] * 6 + [1.0], [0.2] * 6 + [-1.0], [0.3] * 6 + [0.5], [0.4] * 6 + [0.0]], np.float32)
    out = STANDARDIZE["austin_sailor_dataset_converted_externally_to_rlds"](_raw(tf.constant(raw)))["action"].numpy()
    np.testing.assert_allclose(out[:, :6], raw[:, :6])
    np.testing.assert_allclose(out[:, 6], [0.0, 1.0, 0.5, 1.0])  # 1 - clip(g, 0, 1)
    assert out.dtype == np.float32


def test_every_vla_dataset_with_a_transform_is_in_the_table():
    for name, spec in registry.REGISTRY.items():
        assert spec.standardize is not None, name
    for mixture in mixtures.MIXTURES:
        for name, weight in mixtures.get_mixture(mixture):
            assert name in registry.REGISTRY and weight > 0, (mixture, name)
    plus_minus = dict(mixtures.get_mixture("oxe_magic_soup_plus_minus"))
    assert len(plus_minus) == 25 and plus_minus["fractal20220817_data"] == 1.0 and "droid" not in plus_minus
    assert all(registry.REGISTRY[n].loads_for_vla for n in plus_minus)


def test_droid_recipe_reads_the_action_dict_and_inverts_the_gripper():
    vel = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    raw = _raw(tf.zeros((4, 7)))
    raw["action_dict"] = {"cartesian_velocity": vel, "gripper_position": tf.constant([[0.0], [1.0], [0.25], [1.0]])}
    out = STANDARDIZE["droid"](raw)["action"].numpy()
    np.testing.assert_allclose(out, np.concatenate([vel, [[1.0], [0.0], [0.75], [0.0]]], axis=1))
    assert registry.REGISTRY["droid"].drop_zero_motion


def test_libero_raw_schema_inverts_the_gripper_and_splits_the_state():
    raw_action = np.array([[0.1] * 6 + [-1.0], [0.2] * 6 + [1.0], [0.3] * 6 + [0.4]], np.float32)
    state = np.arange(24, dtype=np.float32).reshape(3, 8)
    traj = {"action": tf.constant(raw_action), "language_instruction": tf.constant([b"put the bowl"] * 3),
            "observation": {"state": tf.constant(state), "image": tf.zeros((3, 4, 4, 3), tf.uint8),
                            "wrist_image": tf.zeros((3, 4, 4, 3), tf.uint8)}}
    for suite in ("spatial", "object", "goal", "10"):
        name = f"libero_{suite}_no_noops"
        spec = registry.get_spec(name)
        assert spec.cameras["primary"] == "image" and spec.cameras["wrist"] == "wrist_image"
        assert spec.state_encoding == registry.StateEncoding.POS_EULER and spec.loads_for_vla
        assert mixtures.get_mixture(name) == [(name, 1.0)]
        out = STANDARDIZE[name](traj)
        np.testing.assert_allclose(out["action"].numpy()[:, :6], raw_action[:, :6])
        np.testing.assert_allclose(out["action"].numpy()[:, 6], [1.0, 0.0, 0.6], atol=1e-6)  # 1 - clip(g, 0, 1)
        np.testing.assert_array_equal(out["observation"]["EEF_state"].numpy(), state[:, :6])
        np.testing.assert_array_equal(out["observation"]["gripper_state"].numpy(), state[:, -2:])
        from ovla_jax.data.proprio import proprio_of

        np.testing.assert_array_equal(proprio_of(out, spec).numpy(), np.concatenate([state[:, :6], state[:, -2:]], 1))


def test_registry_reaches_every_official_dataset_and_mixture():
    official = [n for n in registry._TABLE if n != "ovla_tabletop"]  # the built-in table (tests register more)
    assert len(official) == 70 and all(n in registry.REGISTRY for n in official)
    assert len([m for m in mixtures.MIXTURES if m != "bridge_dataset"]) == 18


def test_every_dataset_gives_proprio_with_a_stable_description():
    # Every registered dataset names its state pieces (upstream's state_obs_keys), and their description,
    # part of the statistics cache key, holds no function address (it would change every process).
    for name in registry._TABLE:  # the built-in entries (other tests register datasets of their own)
        spec = registry.REGISTRY[name]
        assert spec.state_keys, name
        assert " at 0x" not in repr(spec.state_keys), name


def _standardized(observation, length=3):
    return {"action": tf.zeros((length, 7)), "observation": {k: tf.constant(v) for k, v in observation.items()}}


def test_state_pieces_cut_concatenate_and_pad_like_upstream():
    from ovla_jax.data.proprio import proprio_of

    state = np.arange(36, dtype=np.float32).reshape(3, 12)
    hydra = registry.REGISTRY["stanford_hydra_dataset_converted_externally_to_rlds"]
    out = proprio_of(_standardized({"state": state}), hydra).numpy()  # xyz, rpy at 7:10, pad, gripper at -3
    np.testing.assert_array_equal(out, np.concatenate([state[:, :3], state[:, 7:10], np.zeros((3, 1)),
                                                       state[:, -3:-2]], 1))
    pose = np.arange(15, dtype=np.float32).reshape(3, 5)  # robo_net-like: xyz + yaw + gripper
    mask_vit = registry.REGISTRY["stanford_mask_vit_converted_externally_to_rlds"]
    np.testing.assert_array_equal(proprio_of(_standardized({"end_effector_pose": pose}), mask_vit).numpy(),
                                  np.concatenate([pose[:, :4], np.zeros((3, 3)), pose[:, -1:]], 1))
    fmb = registry.REGISTRY["fmb_dataset"]  # a rank-1 gripper field becomes one column
    eef, grip = np.ones((3, 7), np.float32), np.array([0.5, 0.25, 0.0], np.float32)
    np.testing.assert_array_equal(proprio_of(_standardized({"eef_pose": eef, "state_gripper_pose": grip}), fmb),
                                  np.concatenate([eef, grip[:, None]], 1))
    assert proprio_of(_standardized({}), registry.REGISTRY["uiuc_d3field"]).numpy().tolist() == [[0.0] * 8] * 3


def test_kuka_state_is_decoded_from_zlib_bytes():
    import zlib

    from ovla_jax.data.proprio import proprio_of

    pose = np.arange(21, dtype=np.float32).reshape(3, 7)
    closed = np.array([[0.0], [1.0], [1.0]], np.float32)
    observation = {"clip_function_input/base_pose_tool_reached": [zlib.compress(r.tobytes()) for r in pose],
                   "gripper_closed": [zlib.compress(r.tobytes()) for r in closed]}
    out = proprio_of(_standardized(observation), registry.REGISTRY["kuka"]).numpy()
    np.testing.assert_array_equal(out, np.concatenate([pose, closed], 1))


def test_a_missing_state_key_names_the_dataset_and_the_key():
    from ovla_jax.data.errors import DataError
    from ovla_jax.data.proprio import missing_state_keys, proprio_of

    spec = registry.REGISTRY["taco_play"]
    traj = _standardized({"rgb_static": np.zeros((3, 2, 2, 3), np.uint8)})
    assert missing_state_keys(traj, spec) == ["robot_obs"]
    with pytest.raises(DataError, match=r"'taco_play'.*'robot_obs'"):
        proprio_of(traj, spec)
