"""Files at a local path or a URL (``gs://bucket/run``, ...), for run directories on pods.

Local paths use the standard library; URLs go through ``tf.io.gfile`` (TensorFlow ships the GCS file
system), imported only when a URL is used. Orbax (tensorstore / epath), TensorBoard and tfds handle
``gs://`` themselves; this module covers ovla-jax's own files: run config, metrics, checkpoint
metadata and listings, and reading converted checkpoints (``init_checkpoint`` on GCS). Object stores cannot append or rename atomically in every case, so writes go
to a temp name and are renamed into place (GCS renames are copy + delete: readers never see a partial
file), and appending logs rewrite their file (see :class:`LineLog`).
"""
from __future__ import annotations

import os
from typing import IO


def is_url(path: str) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def join(path: str, *parts: str) -> str:
    return os.path.join(str(path), *parts)  # "/" joins URLs too


def absolute(path: str) -> str:
    return str(path) if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Entry names (no trailing slashes, which gfile adds to GCS "directories")."""
    names = _gfile().listdir(path) if is_url(path) else os.listdir(path)
    return [n.rstrip("/") for n in names]


def isfile(path: str) -> bool:
    return exists(path) and not isdir(path)


def size(path: str) -> int:
    return _gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def makedirs(path: str) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r") -> IO:
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode)


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp name renamed into place (no partial file is ever visible)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open_file(tmp, "w") as f:
        f.write(text)
    if is_url(path):
        _gfile().rename(tmp, path, overwrite=True)
    else:
        os.replace(tmp, path)


class LineLog:
    """A text file that grows by lines (``metrics.jsonl``), kept across resumed runs.

    Locally it is opened for append. An object store cannot append, so there the lines so far are
    read back, and each ``write`` re-uploads the file (gfile's flush); a metrics log is small."""

    def __init__(self, path: str):
        self.path = path
        if is_url(path):
            previous = ""
            if exists(path):
                previous = read_text(path)
                _gfile().remove(path)  # some file systems append on "w" to an existing file
            self.file = open_file(path, "w")
            self.file.write(previous)
        else:
            self.file = open(path, "a")

    def write(self, line: str) -> None:
        self.file.write(line.rstrip("\n") + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
