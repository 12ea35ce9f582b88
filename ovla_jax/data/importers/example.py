"""Tiny robot datasets in the formats ``ovla-jax import`` reads, generated here (nothing downloaded): for
the tests and for following the README's walk-through without data of your own.

    python -m ovla_jax.data.importers.example lerobot my_robot_lerobot   # LeRobot v2.1 (--lerobot-version v3.0)
    python -m ovla_jax.data.importers.example robomimic demos.hdf5       # robomimic HDF5
    python -m ovla_jax.data.importers.example act aloha_episodes/        # ACT / ALOHA HDF5 episodes

Each episode: two 64x64 cameras (``image``: a coloured block moving across the table; ``wrist_image``),
a 7-D action (6 motion dims + a 0 / 1 gripper), a 7-D state, one of a few instructions. Videos are
lossless H.264 (RGB), so an import round-trips them exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

INSTRUCTIONS = ("pick up the red block", "push the blue block left", "put the green block on the plate")
COLOURS = np.array([[220, 40, 40], [40, 60, 220], [40, 180, 60]], np.uint8)


def episodes(num: int = 8, length: int = 12, size: int = 64, seed: int = 0) -> list[dict]:
    """Ground truth: [{images: {camera: uint8[T, S, S, 3]}, actions, state, instruction}]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        task = i % len(INSTRUCTIONS)
        motion = rng.normal(0, 0.01, (length, 6)).astype(np.float32)
        gripper = (np.arange(length) < length // 2).astype(np.float32)[:, None]
        actions = np.concatenate([motion, gripper], 1)
        state = np.concatenate([np.cumsum(motion, 0), gripper], 1).astype(np.float32)
        top = np.full((length, size, size, 3), 90, np.uint8)
        wrist = np.full((length, size, size, 3), 30, np.uint8)
        for t in range(length):
            x = int(4 + (size - 16) * t / max(length - 1, 1))
            top[t, 20:32, x:x + 12] = COLOURS[task]
            wrist[t, :, :] = (wrist[t] + rng.integers(0, 40, (size, size, 3), dtype=np.uint8))
        out.append({"images": {"image": top, "wrist_image": wrist}, "actions": actions, "state": state,
                    "instruction": INSTRUCTIONS[task]})
    return out


def write_lerobot(root: str, eps: list[dict], fps: int = 10, version: str = "v2.1") -> str:
    """LeRobot's layout: ``v2.1`` (meta/*.json(l), a parquet per episode, a lossless MP4 per camera per
    episode) or ``v3.0`` (every episode in one parquet and one MP4 per camera, located by meta/episodes)."""
    if version.startswith("v3"):
        return _write_lerobot_v3(root, eps, fps)
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    cams = list(eps[0]["images"])
    tasks = sorted({e["instruction"] for e in eps})
    features = _lerobot_features(eps, channels_first=False)
    info = {"codebase_version": "v2.1", "robot_type": "example", "fps": fps, "chunks_size": 1000,
            "total_episodes": len(eps), "total_frames": sum(len(e["actions"]) for e in eps),
            "total_tasks": len(tasks), "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": features}
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f:
        f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
    index = 0
    with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f:
        for e_i, ep in enumerate(eps):
            length = len(ep["actions"])
            f.write(json.dumps({"episode_index": e_i, "tasks": [ep["instruction"]], "length": length}) + "\n")
            table = pa.table({
                "observation.state": [row.tolist() for row in ep["state"]],
                "action": [row.tolist() for row in ep["actions"]],
                "timestamp": (np.arange(length) / fps).astype(np.float32),
                "frame_index": np.arange(length), "episode_index": np.full(length, e_i),
                "index": np.arange(index, index + length), "task_index": np.full(length, tasks.index(ep["instruction"]))})
            index += length
            path = os.path.join(root, info["data_path"].format(episode_chunk=0, episode_index=e_i))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path)
            for cam in cams:
                video = os.path.join(root, info["video_path"].format(episode_chunk=0, episode_index=e_i,
                                                                     video_key=f"observation.images.{cam}"))
                os.makedirs(os.path.dirname(video), exist_ok=True)
                _lossless_mp4(video, ep["images"][cam], fps, av)
    return root


def _lerobot_features(eps: list[dict], channels_first: bool) -> dict:
    """info.json features; camera shapes as LeRobot writes them (v2: [h, w, c]; v3 hub sets: [c, h, w])."""
    cams = list(eps[0]["images"])
    h, w, c = eps[0]["images"][cams[0]].shape[1:]
    shape, names = ([c, h, w], ["channels", "height", "width"]) if channels_first else ([h, w, c], ["height", "width", "channel"])
    features = {f"observation.images.{cam}": {"dtype": "video", "shape": shape, "names": names} for cam in cams}
    features.update({
        "observation.state": {"dtype": "float32", "shape": [eps[0]["state"].shape[1]]},
        "action": {"dtype": "float32", "shape": [eps[0]["actions"].shape[1]]},
        "timestamp": {"dtype": "float32", "shape": [1]}, "frame_index": {"dtype": "int64", "shape": [1]},
        "episode_index": {"dtype": "int64", "shape": [1]}, "index": {"dtype": "int64", "shape": [1]},
        "task_index": {"dtype": "int64", "shape": [1]}})
    return features


def _write_lerobot_v3(root: str, eps: list[dict], fps: int) -> str:
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    cams = list(eps[0]["images"])
    tasks = sorted({e["instruction"] for e in eps})
    info = {"codebase_version": "v3.0", "robot_type": "example", "fps": fps, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "total_episodes": len(eps), "total_frames": sum(len(e["actions"]) for e in eps),
            "total_tasks": len(tasks), "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": _lerobot_features(eps, channels_first=True)}
    for sub in ("meta/episodes/chunk-000", "data/chunk-000"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}),
                   os.path.join(root, "meta", "tasks.parquet"))
    columns: dict = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index", "episode_index",
                                     "index", "task_index")}
    episodes: dict = {k: [] for k in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                                      "dataset_from_index", "dataset_to_index")}
    start = 0
    for e_i, ep in enumerate(eps):
        length = len(ep["actions"])
        columns["observation.state"] += [r.tolist() for r in ep["state"]]
        columns["action"] += [r.tolist() for r in ep["actions"]]
        columns["timestamp"] += (np.arange(length) / fps).astype(np.float32).tolist()
        columns["frame_index"] += list(range(length))
        columns["episode_index"] += [e_i] * length
        columns["index"] += list(range(start, start + length))
        columns["task_index"] += [tasks.index(ep["instruction"])] * length
        for k, v in (("episode_index", e_i), ("tasks", [ep["instruction"]]), ("length", length),
                     ("data/chunk_index", 0), ("data/file_index", 0), ("dataset_from_index", start),
                     ("dataset_to_index", start + length)):
            episodes[k].append(v)
        for cam in cams:
            key = f"observation.images.{cam}"
            for k, v in ((f"videos/{key}/chunk_index", 0), (f"videos/{key}/file_index", 0),
                         (f"videos/{key}/from_timestamp", start / fps),
                         (f"videos/{key}/to_timestamp", (start + length) / fps)):
                episodes.setdefault(k, []).append(v)
        start += length
    pq.write_table(pa.table(columns), os.path.join(root, info["data_path"].format(chunk_index=0, file_index=0)))
    pq.write_table(pa.table(episodes), os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"))
    for cam in cams:
        video = os.path.join(root, info["video_path"].format(video_key=f"observation.images.{cam}", chunk_index=0,
                                                             file_index=0))
        os.makedirs(os.path.dirname(video), exist_ok=True)
        _lossless_mp4(video, np.concatenate([e["images"][cam] for e in eps]), fps, av, keyframe_every=10)
    return root


def _lossless_mp4(path: str, frames: np.ndarray, fps: int, av, keyframe_every: int = 250) -> None:
    from fractions import Fraction

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "preset": "ultrafast", "g": str(keyframe_every)}
        stream.time_base = Fraction(1, fps)
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_robomimic(path: str, eps: list[dict], with_instruction: bool = True) -> str:
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, ep in enumerate(eps):
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("actions", data=ep["actions"].astype(np.float64))
            if with_instruction:
                demo.attrs["language_instruction"] = ep["instruction"]
            obs = demo.create_group("obs")
            obs.create_dataset("agentview_image", data=ep["images"]["image"])
            obs.create_dataset("robot0_eye_in_hand_image", data=ep["images"]["wrist_image"])
            obs.create_dataset("robot0_eef_pos", data=ep["state"][:, :3].astype(np.float64))
            obs.create_dataset("robot0_eef_rot", data=ep["state"][:, 3:6].astype(np.float64))
            obs.create_dataset("robot0_gripper_qpos", data=ep["state"][:, 6:].astype(np.float64))
    return path


def write_act(directory: str, eps: list[dict]) -> str:
    import h5py

    os.makedirs(directory, exist_ok=True)
    for i, ep in enumerate(eps):
        with h5py.File(os.path.join(directory, f"episode_{i}.hdf5"), "w") as f:
            f.attrs["language_instruction"] = ep["instruction"]
            f.create_dataset("action", data=ep["actions"])
            obs = f.create_group("observations")
            obs.create_dataset("qpos", data=ep["state"])
            images = obs.create_group("images")
            images.create_dataset("cam_high", data=ep["images"]["image"])
            images.create_dataset("cam_left_wrist", data=ep["images"]["wrist_image"])
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovla_jax.data.importers.example", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=("lerobot", "robomimic", "act"))
    p.add_argument("out", help="directory (lerobot, act) or .hdf5 file (robomimic) to create")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--length", type=int, default=12, help="steps per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lerobot-version", default="v2.1", choices=("v2.1", "v3.0"), help="LeRobot codebase version")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        print(f"example: error: {args.out} exists", file=sys.stderr)
        return 2
    eps = episodes(args.episodes, args.length, seed=args.seed)
    if args.format == "lerobot":
        out = write_lerobot(args.out, eps, version=args.lerobot_version)
    else:
        out = {"robomimic": write_robomimic, "act": write_act}[args.format](args.out, eps)
    print(f"wrote {out}: {args.episodes} episodes of {args.length} steps ({args.format})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
