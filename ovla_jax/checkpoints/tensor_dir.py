"""A directory of safetensors shards (one file, or many plus a JSON index) read and written one tensor
at a time. Both checkpoint formats use it: HF names for the PyTorch layout, Flax paths for ovla-jax.
Reading works at a URL too (``gs://``: one converted checkpoint that every host of a pod reads).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional

import numpy as np

from ovla_jax import fileio
from ovla_jax.checkpoints import safetensors_io as st
from ovla_jax.checkpoints.errors import CheckpointError


def read_json(path: str):
    """A JSON file at a local path or a URL (``gs://``: a train run's meta)."""
    if not fileio.exists(path) or fileio.isdir(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(fileio.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class TensorDir:
    """Tensors of ``<stem>.safetensors`` or ``<stem>-NNNNN-of-NNNNN.safetensors`` + ``<stem>.safetensors.index.json``.

    Every file is validated on open (headers only); ``read`` memory-maps nothing and reads just one
    tensor's bytes.
    """

    def __init__(self, path: str, stem: str):
        self.path, self.stem = path, stem
        if not fileio.isdir(path):
            raise CheckpointError(f"{path}: checkpoint directory not found")
        self.headers: dict[str, dict] = {}
        self.files: dict[str, str] = {}  # key -> file path
        index = fileio.join(path, f"{stem}.safetensors.index.json")
        if fileio.exists(index):
            self._from_index(index)
        else:
            self._from_files()

    def _header(self, file: str) -> dict:
        if file not in self.headers:
            self.headers[file] = st.read_header(file)
        return self.headers[file]

    def _from_index(self, index: str) -> None:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        for key, name in weight_map.items():
            file = fileio.join(self.path, name)
            if file not in self.headers and not fileio.isfile(file):
                raise CheckpointError(f"{index}: lists {name!r} (for {key!r}), which does not exist")
            if key not in self._header(file):
                raise CheckpointError(f"{file}: the index places {key!r} here, but the file lacks it")
            self.files[key] = file
        for file, header in self.headers.items():
            for key in header:
                if key != "__metadata__" and key not in weight_map:
                    raise CheckpointError(f"{file}: holds {key!r}, which the index does not list")

    def _from_files(self) -> None:
        listing = fileio.listdir(self.path)
        names = sorted(f for f in listing if f.endswith(".safetensors") and f.startswith(self.stem))
        if not names:
            others = [f for f in listing if f.endswith((".bin", ".pt", ".pth", ".safetensors"))]
            hint = f" (found {others})" if others else ""
            raise CheckpointError(f"{self.path}: no {self.stem}*.safetensors weights{hint}")
        for name in names:
            file = fileio.join(self.path, name)
            for key in self._header(file):
                if key == "__metadata__":
                    continue
                if key in self.files:
                    raise CheckpointError(f"{file}: {key!r} also appears in {self.files[key]}")
                self.files[key] = file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.headers[self.files[key]][key]["shape"])

    def dtype_name(self, key: str) -> str:
        return self.headers[self.files[key]][key]["dtype"]

    def read(self, key: str) -> np.ndarray:
        file = self.files[key]
        return st.read_tensor(file, key, self.headers[file])


def write_tensor_dir(path: str, stem: str, items: Iterable[tuple[str, tuple, np.dtype]],
                     produce: Callable[[str], np.ndarray], max_shard_bytes: int,
                     on_tensor: Optional[Callable[[str], None]] = None) -> list[str]:
    """Write tensors into ``path`` as ``stem`` shards (+ index when more than one); returns file names."""
    items = list(items)
    shards = st.plan_shards(items, max_shard_bytes)
    names = ([f"{stem}.safetensors"] if len(shards) <= 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        st.write_file(os.path.join(path, name), shard, produce, on_tensor=on_tensor)
    if len(shards) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in items)
        weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
        with open(os.path.join(path, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names
