"""LeRobot's local dataset layout (codebase v2.x): ``meta/info.json`` (features, fps, path templates),
``meta/episodes.jsonl`` and ``meta/tasks.jsonl``, one parquet file of per-frame columns per episode, and
one MP4 per camera per episode (or images stored in the parquet as PNG / JPEG bytes).

Cameras are the features of dtype ``video`` / ``image`` (``observation.images.top`` -> camera ``top``);
the state is ``observation.state``; the instruction of each frame is its task. Video frames are matched
to the parquet rows by timestamp. Needs the ``[import]`` extra (pyarrow, av).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from ovla_jax.data.errors import DataError
from ovla_jax.data.importers import Episode, Layout, Reader


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"reading LeRobot datasets needs {module}: pip install 'ovla-jax[import]'") from None


def _camera_name(feature: str, taken: set) -> str:
    short = feature.rsplit(".", 1)[-1]
    return short if short not in taken else feature.replace(".", "_")


def _hwc(feature: dict, name: str, source: str) -> tuple:
    shape, names = list(feature.get("shape", [])), feature.get("names") or []
    if len(shape) != 3:
        raise DataError(f"{source}: camera feature {name!r} has shape {shape}, expected 3 dims")
    if names and names[0] in ("channel", "channels", "c"):
        shape = shape[1:] + shape[:1]
    if shape[-1] != 3:
        raise DataError(f"{source}: camera feature {name!r} is not RGB (shape {feature.get('shape')})")
    return tuple(int(x) for x in shape)


class LeRobotReader(Reader):
    def __init__(self, root: str, state_key: str = "observation.state", action_key: str = "action",
                 instruction: Optional[str] = None, state_keys=None, cameras=None):
        self.root = root
        source = f"LeRobot dataset {root}"
        info_path = os.path.join(root, "meta", "info.json")
        if not os.path.isfile(info_path):
            raise DataError(f"{source}: no meta/info.json (is this a LeRobot dataset directory?)")
        with open(info_path) as f:
            self.info = info = json.load(f)
        version = str(info.get("codebase_version", "?"))
        if not version.startswith("v2"):
            raise DataError(f"{source}: codebase_version {version}; this importer reads LeRobot's v2.x layout "
                            f"(per-episode parquet and video files)")
        features = info.get("features", {})
        if action_key not in features:
            raise DataError(f"{source}: no {action_key!r} feature (features: {sorted(features)})")
        if state_keys:  # --state-keys: several features concatenated
            self.state_keys = list(state_keys)
        else:
            self.state_keys = [state_key] if state_key in features else []
        for key in self.state_keys:
            if key not in features:
                raise DataError(f"{source}: no state feature {key!r} (features: {sorted(features)})")
        taken: set = set()
        self.camera_features = {}
        for key, feature in features.items():
            if feature.get("dtype") in ("video", "image") and (cameras is None or key in cameras
                                                               or key.rsplit(".", 1)[-1] in cameras):
                name = _camera_name(key, taken)
                taken.add(name)
                self.camera_features[name] = key
        if not self.camera_features:
            raise DataError(f"{source}: no camera (video or image) features")
        self.episodes_meta = self._jsonl("episodes.jsonl", source)
        self.tasks = {int(t["task_index"]): t["task"] for t in self._jsonl("tasks.jsonl", source)}
        self.instruction = instruction
        self.action_key = action_key
        self.layout = Layout(
            cameras={name: _hwc(features[key], key, source) for name, key in self.camera_features.items()},
            action_dim=int(np.prod(features[action_key]["shape"])),
            state_dim=sum(int(np.prod(features[k]["shape"])) for k in self.state_keys),
            num_episodes=len(self.episodes_meta), source=source)

    def _jsonl(self, name: str, source: str) -> list:
        path = os.path.join(self.root, "meta", name)
        if not os.path.isfile(path):
            raise DataError(f"{source}: no meta/{name}")
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _path(self, template_key: str, episode_index: int, **kw) -> str:
        chunk = episode_index // int(self.info.get("chunks_size", 1000))
        rel = self.info[template_key].format(episode_chunk=chunk, episode_index=episode_index, **kw)
        return os.path.join(self.root, rel)

    def episode(self, index: int) -> Episode:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading LeRobot datasets needs pyarrow: pip install 'ovla-jax[import]'") from None
        episode_index = int(self.episodes_meta[index]["episode_index"])
        path = self._path("data_path", episode_index)
        if not os.path.isfile(path):
            raise DataError(f"{self.layout.source}: episode {episode_index}: {path} not found")
        table = pq.read_table(path)
        columns = set(table.column_names)
        for key in [self.action_key, *self.state_keys]:
            if key not in columns:
                raise DataError(f"{path}: no column {key!r} (columns: {sorted(columns)})")

        def stacked(key):
            return np.asarray(table.column(key).to_pylist(), np.float32).reshape(table.num_rows, -1)

        actions = stacked(self.action_key)
        state = np.concatenate([stacked(k) for k in self.state_keys], 1) if self.state_keys else None
        if self.instruction is not None:
            instructions = [self.instruction] * table.num_rows
        elif "task_index" in columns:
            instructions = [self.tasks.get(int(t), "") for t in table.column("task_index").to_pylist()]
        else:
            tasks = self.episodes_meta[index].get("tasks") or [""]
            instructions = [tasks[0]] * table.num_rows
        timestamps = (np.asarray(table.column("timestamp").to_pylist(), np.float64) if "timestamp" in columns
                      else np.arange(table.num_rows) / float(self.info.get("fps", 1)))
        images = {}
        for name, key in self.camera_features.items():
            feature = self.info["features"][key]
            if feature["dtype"] == "video":
                images[name] = self._video_frames(self._path("video_path", episode_index, video_key=key), timestamps)
            else:
                if key not in columns:
                    raise DataError(f"{path}: no image column {key!r}")
                images[name] = np.stack([_decode_image(cell, path) for cell in table.column(key).to_pylist()])
        return Episode(images=images, actions=actions, instructions=instructions, state=state)

    def _video_frames(self, path: str, timestamps: np.ndarray) -> np.ndarray:
        av = _require("av")
        if not os.path.isfile(path):
            raise DataError(f"{self.layout.source}: video {path} not found")
        frames, times = [], []
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.pts * stream.time_base) if frame.pts is not None else len(times) / self.info["fps"])
        if not frames:
            raise DataError(f"{path}: no video frames")
        times = np.asarray(times)
        nearest = np.abs(times[None, :] - timestamps[:, None]).argmin(1)
        off = np.abs(times[nearest] - timestamps).max()
        tolerance = 0.5 / float(self.info.get("fps", 30))
        if off > tolerance + 1e-6:
            raise DataError(f"{path}: no frame within {tolerance * 1e3:.1f} ms of a parquet timestamp (off by "
                            f"{off * 1e3:.1f} ms)")
        return np.stack([frames[i] for i in nearest])


def _decode_image(cell, where: str) -> np.ndarray:
    import tensorflow as tf

    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise DataError(f"{where}: an image cell holds no bytes (path-only images are not supported)")
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
