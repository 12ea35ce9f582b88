"""Streaming safetensors I/O on numpy: read one tensor at a time, write shards tensor by tensor.

The writer emits the standard format (8-byte little-endian header size, JSON header padded with spaces
to 8 bytes, raw little-endian data) with ``{"format": "pt"}`` metadata, which transformers requires.
Peak memory is one tensor, whatever the checkpoint size.
"""
from __future__ import annotations

import json
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from ovla_jax import fileio
from ovla_jax.checkpoints.errors import CheckpointError

_DTYPE_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_from_name(name: str) -> np.dtype:
    """numpy dtype of a safetensors dtype name ("BF16" -> ml_dtypes.bfloat16)."""
    if name not in _NAME_DTYPES:
        raise CheckpointError(f"safetensors dtype {name} is not supported")
    return _NAME_DTYPES[name]


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file: {key: {dtype, shape, data_offsets}}, validated."""
    try:
        size = fileio.size(path)
        with fileio.open_file(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (header size {n} exceeds file size {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file (unreadable header: {e})") from None
    data_size = size - 8 - n
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    try:
        _check_entries(path, header, data_size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file (malformed header entry: {e!r})") from None
    return header


def _check_entries(path: str, header: dict, data_size: int) -> None:
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * _NAME_DTYPES[info["dtype"]].itemsize if info["dtype"] in _NAME_DTYPES else None
        if end > data_size or begin > end or (expected is not None and end - begin != expected):
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {key!r} at bytes {begin}..{end}, "
                                  f"data section holds {data_size} bytes)")


def read_tensor(path: str, key: str, header: dict | None = None) -> np.ndarray:
    """One tensor as a numpy array (memory-mapped read of just its bytes)."""
    header = header if header is not None else read_header(path)
    info = header[key]
    if info["dtype"] not in _NAME_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = _NAME_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    with fileio.open_file(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + begin)
        buf = f.read(end - begin)
    if len(buf) != end - begin:
        raise CheckpointError(f"{path}: corrupt safetensors file (tensor {key!r} is truncated)")
    return np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def write_file(path: str, items: Sequence[tuple[str, tuple, np.dtype]], produce: Callable[[str], np.ndarray],
               metadata: dict | None = None, on_tensor: Callable[[str], None] | None = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time by ``produce(key)``.

    ``items`` lists (key, shape, dtype) in file order; each produced array must match its entry.
    """
    header, offset = {}, 0
    for key, shape, dtype in items:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in items:
            array = np.ascontiguousarray(produce(key))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: tensor {key!r} produced {array.shape} {array.dtype}, "
                                      f"planned {tuple(shape)} {np.dtype(dtype)}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            if on_tensor:
                on_tensor(key)


def plan_shards(items: Iterable[tuple[str, tuple, np.dtype]], max_bytes: int) -> list[list]:
    """Split (key, shape, dtype) items in order into groups of at most ``max_bytes`` (one tensor
    larger than the limit gets a shard of its own), as transformers' ``save_pretrained`` does."""
    shards, current, size = [], [], 0
    for item in items:
        nbytes = int(np.prod(item[1], dtype=np.int64)) * np.dtype(item[2]).itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        shards.append(current)
    return shards
