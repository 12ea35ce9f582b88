"""The built-in tabletop: determinism, the expert, the success checks, the RLDS demo dataset through the
normal pipeline, the evaluation harness, and a seconds-long `ovla-jax demo --quick`."""
import json
import os

import jax
import numpy as np
import pytest

from ovla_jax.eval import closed_loop as E
from ovla_jax.sim import dataset
from ovla_jax.sim.tabletop import COLORS, TASKS, Tabletop, WorldConfig, expert_episode


def test_same_seed_same_world_other_seed_differs():
    a, b, c = Tabletop(5), Tabletop(5), Tabletop(6)
    assert np.array_equal(a.render(), b.render()) and a.instruction == b.instruction
    assert not np.array_equal(a.render(), c.render())
    for _ in range(5):
        act = a.expert_action()
        assert np.array_equal(act, b.expert_action())
        ia, _, _ = a.step(act)
        ib, _, _ = b.step(act)
        assert np.array_equal(ia, ib)
    e1, e2 = expert_episode(11, noise=0.01), expert_episode(11, noise=0.01)
    assert np.array_equal(e1["images"], e2["images"]) and np.array_equal(e1["actions"], e2["actions"])


def test_scene_needs_language_and_vision():
    env = Tabletop(3, "pick")
    assert len(set(env.colors)) == env.config.num_blocks and env.colors[env.target] in env.instruction
    img = env.render()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    for color in env.colors:  # every block is visible in its own colour
        assert (img.reshape(-1, 3) == COLORS[color]).all(axis=1).sum() >= 16


def test_wrist_lens_magnifies_the_middle_and_keeps_the_table_in_view():
    import dataclasses

    def block_pixels(lens, offset):
        env = Tabletop(3, "pick", dataclasses.replace(WorldConfig(), lens=lens))
        env.ee = np.array([0.5, 0.5])
        env.blocks[env.target] = env.ee + [offset, 0.0]
        others = [i for i in range(len(env.blocks)) if i != env.target]
        env.blocks[others] = [[5.0, 5.0]] * len(others)  # off the table, out of every view
        img = env.render()
        return (img.reshape(-1, 3) == COLORS[env.colors[env.target]]).all(axis=1).sum()

    assert block_pixels(0.3, 0.12) > 2 * block_pixels(1.0, 0.12)  # near the gripper: magnified
    assert block_pixels(0.3, 0.55) > 0  # far (the table's width away from the spawn square's edge): in view


@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds(task):
    episodes = [expert_episode(1000 + s, task, noise=0.01) for s in range(60)]
    rate = np.mean([e["success"] for e in episodes])
    assert rate >= 0.95, rate
    assert all(e["actions"].shape[1] == 7 and len(e["images"]) == len(e["actions"]) for e in episodes)


def test_success_checks():
    env = Tabletop(4, "pick")
    wrong = (env.target + 1) % len(env.blocks)
    env.ee = env.blocks[wrong].copy()
    _, done, success = env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))  # close on the wrong block
    assert env.held == wrong and not success and not done
    env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))  # let go
    env.ee = env.blocks[env.target] + 0.03  # within the grasp radius
    _, done, success = env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    assert success and done

    env = Tabletop(4, "place")
    env.ee = env.blocks[env.target].copy()
    env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    assert env.held == env.target and not env.success
    far = np.clip(env.plate + 0.3, 0.05, 0.95) if np.linalg.norm(env.plate - 0.5) < 0.3 else np.array([0.5, 0.5])
    env.ee = far.copy()
    env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    _, _, success = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))  # released off the plate
    assert not success and env.held == -1
    with pytest.raises(ValueError, match="7 finite"):
        env.step(np.array([np.nan] * 7))


def test_wilson_interval():
    lo, hi = E.wilson_interval(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.09
    lo, hi = E.wilson_interval(25, 50)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9


def test_harness_ranks_expert_above_random():
    expert = E.summarize(E.rollout(E.expert_policy, 20))
    random = E.summarize(E.rollout(E.random_policy(0), 20))
    assert expert["all"]["success_rate"] >= 0.95 and random["all"]["success_rate"] <= 0.2
    assert set(expert) == {"pick", "place", "all"} and expert["pick"]["episodes"] == 20


def test_demo_dataset_loads_with_tfds_and_the_pipeline(tmp_path):
    import tensorflow_datasets as tfds

    from ovla_jax.data.pipeline import DataConfig, make_frames, numpy_batches

    data_dir = str(tmp_path / "data")
    path = dataset.build(data_dir, num_episodes=12, num_val=3, progress=False)
    builder = tfds.builder_from_directory(path)
    assert builder.info.splits["train"].num_examples == 12 and builder.info.splits["val"].num_examples == 3
    steps = next(iter(builder.as_dataset(split="train").take(1)))["steps"]
    first = next(iter(steps))
    assert first["observation"]["image"].shape == (64, 64, 3) and first["action"].shape == (7,)
    assert bool(first["is_first"]) and "block" in first["language_instruction"].numpy().decode()
    with pytest.raises(Exception, match="already exists"):
        dataset.build(data_dir, num_episodes=2, num_val=1, progress=False)

    cfg = DataConfig(data_dir=data_dir, mixture=dataset.DATASET_NAME, image_size=56, shuffle_buffer=10,
                     threads=1, stats_cache_dir=str(tmp_path / "stats"))
    frames, stats = make_frames(cfg, "train", train=False)
    batch = next(numpy_batches(frames, 4))
    assert batch["pixel_values"].shape == (4, 56, 56, 6)
    assert stats[dataset.DATASET_NAME]["num_trajectories"] == 15  # train + val
    action = batch["action"][:, -1]
    assert np.all(np.abs(action[:, :6]) <= 1.0) and set(np.unique(action[:, 6])) <= {0.0, 1.0}


def test_demo_quick_runs_end_to_end(tmp_path):
    from ovla_jax.cli import main

    workdir = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(workdir), "--noprogress"]) == 0
    summary = json.load(open(workdir / "summary.json"))
    for key in ("success_rate", "random_success_rate", "expert_success_rate", "episodes", "wall_seconds"):
        assert key in summary, key
    assert summary["episodes"] == 6 and summary["expert_success_rate"] >= 0.95
    for policy in ("oft", "openvla", "random", "expert"):
        assert summary["success"][policy]["all"]["episodes"] == 2 * 3
        assert summary["policies"][policy]["episodes"] == 2 * 3
    assert summary["success_rate"] == summary["success"]["oft"]["all"]["success_rate"]
    assert summary["success"]["expert"]["all"]["success_rate"] >= 0.95
    assert summary["train"]["oft"]["steps"] == 6 and summary["train"]["openvla"]["steps"] == 6
    import ovla_jax

    assert summary["code"]["package"] == os.path.dirname(os.path.abspath(ovla_jax.__file__))
    import matplotlib.image as mpimg

    for name in ("loss_curve.png", "filmstrip.png"):
        image = mpimg.imread(workdir / name)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50

    # ovla-jax eval reads the same run back (train workdir -> merged params), with a JSON report
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(workdir / "run_openvla"), "--episodes", "2", "--tasks", "pick",
                 "--out", str(out), "--noprogress"]) == 0
    report = json.load(open(out))
    assert report["results"]["openvla"]["pick"]["episodes"] == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--noprogress"]) == 2

    # the same policy from Python, one image or a batch, and from its HF export
    from ovla_jax.convert import convert
    from ovla_jax.policy import OpenVLAPolicy

    policy = OpenVLAPolicy.from_pretrained(str(workdir / "run_openvla"))
    envs = [Tabletop(s) for s in (1, 2)]
    images = np.stack([e.render_scene() for e in envs])
    batch = policy.predict_action(images, [e.instruction for e in envs])
    one = policy.predict_action(images[1], envs[1].instruction)
    assert batch.shape == (2, 7) and one.shape == (7,) and np.allclose(one, batch[1])

    # the OFT policy: a chunk of 8 actions per example from the two cameras and the state
    oft = OpenVLAPolicy.from_pretrained(str(workdir / "run_oft"))
    wrist, states = np.stack([e.render() for e in envs]), np.stack([e.state() for e in envs])
    chunks = oft.predict_action(images, [e.instruction for e in envs], wrist_images=wrist, proprio=states)
    first = oft.predict_action(images[0], envs[0].instruction, wrist_images=wrist[0], proprio=states[0])
    assert chunks.shape == (2, 8, 7) and first.shape == (8, 7)
    np.testing.assert_allclose(first, chunks[0], atol=1e-5)
    with pytest.raises(ValueError, match="proprio"):
        oft.predict_action(images, [e.instruction for e in envs], wrist_images=wrist)
    with pytest.raises(ValueError, match="wrist_images"):
        oft.predict_action(images, [e.instruction for e in envs], proprio=states)
    with pytest.raises(ValueError, match="wrist_images"):
        policy.predict_action(images, [e.instruction for e in envs], wrist_images=wrist)
    with pytest.raises(ValueError, match="action_head"):
        OpenVLAPolicy.from_pretrained(str(workdir / "run_oft"), action_head="tokens")
    # bf16 inference: bf16 weights and operands, fp32 accumulators; float32 actions that track fp32 within
    # bf16's rounding (8 significant bits, a few layers deep: ~1e-2 of the action scale)
    oft_bf16 = OpenVLAPolicy.from_pretrained(str(workdir / "run_oft"), dtype="bfloat16")
    assert {str(a.dtype) for a in jax.tree.leaves(oft_bf16.params)} == {"bfloat16"}
    low = oft_bf16.predict_action(images, [e.instruction for e in envs], wrist_images=wrist, proprio=states)
    assert low.dtype == np.float32 and low.shape == chunks.shape
    np.testing.assert_allclose(low, chunks, atol=0.05 * max(1.0, float(np.abs(chunks).max())))
    with pytest.raises(ValueError, match="dtype"):
        OpenVLAPolicy.from_pretrained(str(workdir / "run_oft"), dtype="float16")
    convert(str(workdir / "run_oft"), str(tmp_path / "oft_hf"), "train", "hf", progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "oft_hf") if "--" in f) == [
        "action_head--latest_checkpoint.pt", "action_head--latest_checkpoint.safetensors",
        "proprio_projector--latest_checkpoint.pt", "proprio_projector--latest_checkpoint.safetensors",
        "vision_backbone--latest_checkpoint.pt", "vision_backbone--latest_checkpoint.safetensors"]  # FiLM (OFT+)
    oft_hf = OpenVLAPolicy.from_pretrained(str(tmp_path / "oft_hf"), tokenizer="words", max_length=80)
    np.testing.assert_allclose(oft_hf.predict_action(images, [e.instruction for e in envs], wrist_images=wrist,
                                                     proprio=states), chunks, atol=1e-5)
    convert(str(workdir / "run_openvla"), str(tmp_path / "hf"), "train", "hf", progress=False)
    hf_policy = OpenVLAPolicy.from_pretrained(str(tmp_path / "hf"), tokenizer="words", max_length=32)
    assert np.allclose(hf_policy.predict_action(images, [e.instruction for e in envs]), batch, atol=1e-6)
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--tokenizer", "words", "--max-length", "32",
                 "--episodes", "1", "--tasks", "place", "--noprogress"]) == 0
