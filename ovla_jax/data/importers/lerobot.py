"""LeRobot's local dataset layouts, codebase v2.x and v3.0: ``meta/info.json`` (features, fps, path
templates) and
- v2.x: ``meta/episodes.jsonl`` + ``meta/tasks.jsonl``, one parquet file per episode, one MP4 per camera
  per episode;
- v3.0: ``meta/episodes/chunk-*/file-*.parquet`` (per episode: its rows' file and index range, and per
  camera its video file and time span) + ``meta/tasks.parquet``; parquet and MP4 files hold many
  episodes each.

Cameras are the features of dtype ``video`` / ``image`` (``observation.images.top`` -> camera ``top``;
images may also sit in the parquet as PNG / JPEG bytes); the state is ``observation.state``; the
instruction of each frame is its task. Video frames are matched to the rows by timestamp (v3: the
episode's span start + the row's timestamp). Needs the ``[import]`` extra (pyarrow, av).
"""
from __future__ import annotations

import glob
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
        if not version.startswith(("v2", "v3")):
            raise DataError(f"{source}: codebase_version {version}; this importer reads LeRobot's v2.x and v3.0 "
                            f"layouts")
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
        self.v3 = version.startswith("v3")
        if self.v3:
            self.episodes_meta = self._episodes_v3(source)
            self.tasks = self._tasks_v3(source)
        else:
            self.episodes_meta = self._jsonl("episodes.jsonl", source)
            self.tasks = {int(t["task_index"]): t["task"] for t in self._jsonl("tasks.jsonl", source)}
        self._table_cache: tuple = (None, None)
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

    def _episodes_v3(self, source: str) -> list:
        pq = _parquet()
        files = sorted(glob.glob(os.path.join(self.root, "meta", "episodes", "chunk-*", "*.parquet")))
        if not files:
            raise DataError(f"{source}: no meta/episodes/chunk-*/*.parquet (v3.0 episode metadata)")
        rows = [r for f in files for r in pq.read_table(f).to_pylist()]
        return sorted(rows, key=lambda r: int(r["episode_index"]))

    def _tasks_v3(self, source: str) -> dict:
        path = os.path.join(self.root, "meta", "tasks.parquet")
        if not os.path.isfile(path):
            raise DataError(f"{source}: no meta/tasks.parquet")
        table = _parquet().read_table(path)
        name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if name is None or "task_index" not in table.column_names:
            raise DataError(f"{path}: expected columns task_index and task (has {table.column_names})")
        return dict(zip(table.column("task_index").to_pylist(), table.column(name).to_pylist()))

    def _path(self, template_key: str, meta: dict, video_key: Optional[str] = None) -> str:
        fmt = {} if video_key is None else {"video_key": video_key}
        if self.v3:
            where = "data" if video_key is None else f"videos/{video_key}"
            fmt.update(chunk_index=int(meta[f"{where}/chunk_index"]), file_index=int(meta[f"{where}/file_index"]))
        else:
            episode_index = int(meta["episode_index"])
            fmt.update(episode_chunk=episode_index // int(self.info.get("chunks_size", 1000)),
                       episode_index=episode_index)
        return os.path.join(self.root, self.info[template_key].format(**fmt))

    def _rows(self, meta: dict):
        """The parquet rows of one episode (v3: a slice of a file shared with other episodes)."""
        path = self._path("data_path", meta)
        if not os.path.isfile(path):
            raise DataError(f"{self.layout.source}: episode {meta['episode_index']}: {path} not found")
        if self._table_cache[0] != path:  # consecutive episodes usually share a v3 file: read it once
            self._table_cache = (path, _parquet().read_table(path))
        table = self._table_cache[1]
        if self.v3:
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table.column("episode_index"), int(meta["episode_index"])))
        return path, table

    def episode(self, index: int) -> Episode:
        meta = self.episodes_meta[index]
        path, table = self._rows(meta)
        columns = set(table.column_names)
        for key in [self.action_key, *self.state_keys]:
            if key not in columns:
                raise DataError(f"{path}: no column {key!r} (columns: {sorted(columns)})")
        if table.num_rows == 0:
            raise DataError(f"{path}: no rows of episode {meta['episode_index']}")

        def stacked(key):
            return np.asarray(table.column(key).to_pylist(), np.float32).reshape(table.num_rows, -1)

        actions = stacked(self.action_key)
        state = np.concatenate([stacked(k) for k in self.state_keys], 1) if self.state_keys else None
        if self.instruction is not None:
            instructions = [self.instruction] * table.num_rows
        elif "task_index" in columns:
            instructions = [self.tasks.get(int(t), "") for t in table.column("task_index").to_pylist()]
        else:
            tasks = meta.get("tasks") or [""]
            instructions = [tasks[0]] * table.num_rows
        timestamps = (np.asarray(table.column("timestamp").to_pylist(), np.float64).reshape(-1) if "timestamp" in columns
                      else np.arange(table.num_rows) / float(self.info.get("fps", 1)))
        images = {}
        for name, key in self.camera_features.items():
            feature = self.info["features"][key]
            if feature["dtype"] == "video":
                start = float(meta.get(f"videos/{key}/from_timestamp", 0.0)) if self.v3 else 0.0
                images[name] = self._video_frames(self._path("video_path", meta, key), start + timestamps)
            else:
                if key not in columns:
                    raise DataError(f"{path}: no image column {key!r}")
                images[name] = np.stack([_decode_image(cell, path) for cell in table.column(key).to_pylist()])
        return Episode(images=images, actions=actions, instructions=instructions, state=state)

    def _video_frames(self, path: str, timestamps: np.ndarray) -> np.ndarray:
        """The frames nearest ``timestamps`` (seconds into the file), decoded from the keyframe before the
        first one up to the last (a v3 file holds many episodes: never decode all of it per episode)."""
        av = _require("av")
        if not os.path.isfile(path):
            raise DataError(f"{self.layout.source}: video {path} not found")
        fps = float(self.info.get("fps", 30))
        tolerance = 0.5 / fps
        first, last = float(timestamps.min()), float(timestamps.max())
        frames, times = [], []
        with av.open(path) as container:
            stream = container.streams.video[0]
            if first > 1.0 and stream.time_base:
                container.seek(int((first - 1.0) / stream.time_base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(times) / fps
                if t < first - tolerance:
                    continue
                if t > last + tolerance:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(t)
        if not frames:
            raise DataError(f"{path}: no video frames between {first:.3f} s and {last:.3f} s")
        times = np.asarray(times)
        nearest = np.abs(times[None, :] - timestamps[:, None]).argmin(1)
        off = np.abs(times[nearest] - timestamps).max()
        if off > tolerance + 1e-6:
            raise DataError(f"{path}: no frame within {tolerance * 1e3:.1f} ms of a parquet timestamp (off by "
                            f"{off * 1e3:.1f} ms)")
        return np.stack([frames[i] for i in nearest])


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading LeRobot datasets needs pyarrow: pip install 'ovla-jax[import]'") from None
    return pq


def _decode_image(cell, where: str) -> np.ndarray:
    import tensorflow as tf

    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise DataError(f"{where}: an image cell holds no bytes (path-only images are not supported)")
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
