"""HF PyTorch checkpoint (openvla/openvla-7b layout) <-> ovla-jax params. The only module that knows
PyTorch names.

The name map is derived from the Flax parameter tree, whose module names mirror the PyTorch ones:
``blocks_3`` <-> ``blocks.3``; leaf ``kernel`` <-> ``weight`` (Linear: transposed; Conv: HWIO <-> OIHW);
``scale``/``embedding`` <-> ``weight``; anything else (``pos_embed``, ``cls_token``, ``reg_token``,
``latent``, ``scale_factor``, ``bias``) keeps its name and layout. Loading is strict like nanoGPT's
``from_pretrained``: equal key sets, a shape check per key, nothing dropped. Tensors stream one at a
time, so a 7B conversion needs memory for the result plus one tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from flax.linen import meta

from ovla_jax.checkpoints import safetensors_io as st
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.hf_config import REMOTE_CODE_FILES, config_from_hf, config_to_hf
from ovla_jax.models.config import OpenVLAConfig
from ovla_jax.models.openvla import OpenVLA

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its Flax path, its HF name, its kind of layout change and both shapes."""

    path: tuple[str, ...]
    hf_name: str
    kind: str  # "linear" | "conv" | "copy"
    jax_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return array.T
        if self.kind == "conv":
            return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        return array

    def from_hf(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return array.T
        if self.kind == "conv":
            return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        return array


_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _hf_module_name(part: str) -> str:
    match = _INDEXED.match(part)
    return f"{match.group(1)}.{match.group(2)}" if match and match.group(1) in ("blocks", "layers") else part


def _entry(path: tuple[str, ...], shape: tuple[int, ...]) -> Entry:
    *modules, leaf = path
    prefix = ".".join(_hf_module_name(m) for m in modules)
    if leaf == "kernel" and len(shape) == 2:
        kind, hf_leaf, hf_shape = "linear", "weight", shape[::-1]
    elif leaf == "kernel" and len(shape) == 4:
        kind, hf_leaf, hf_shape = "conv", "weight", (shape[3], shape[2], shape[0], shape[1])
    elif leaf in ("scale", "embedding"):
        kind, hf_leaf, hf_shape = "copy", "weight", shape
    else:
        kind, hf_leaf, hf_shape = "copy", leaf, shape
    return Entry(tuple(path), f"{prefix}.{hf_leaf}", kind, tuple(shape), tuple(hf_shape))


def abstract_params(config: OpenVLAConfig) -> dict:
    """ShapeDtypeStructs of the model's params (fp32), without allocating anything."""
    model = OpenVLA(config)
    size = config.vision[0].image_size
    channels = 3 * len(config.vision)

    def init():
        pixels = jnp.zeros((1, size, size, channels), jnp.float32)
        return model.init(jax.random.PRNGKey(0), pixels, jnp.zeros((1, 2), jnp.int32))

    variables = jax.eval_shape(init)
    return meta.unbox(variables["params"])


def name_map(config: OpenVLAConfig) -> list[Entry]:
    """Every parameter of ``config``'s model as an Entry, in a stable (HF-name-sorted) order."""
    flat = traverse_util.flatten_dict(abstract_params(config))
    entries = [_entry(path, tuple(leaf.shape)) for path, leaf in flat.items()]
    names = [e.hf_name for e in entries]
    if len(set(names)) != len(names):
        raise AssertionError("name map is not one-to-one")  # a model naming bug, not bad input
    return sorted(entries, key=lambda e: e.hf_name)


# ----------------------------------------------------------------------------------------------------
# Reading


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str) -> tuple[OpenVLAConfig, dict]:
    """(config, norm_stats) from a checkpoint directory's config.json."""
    file = os.path.join(path, CONFIG_FILE)
    return config_from_hf(_read_json(file), file)


def _tensor_files(path: str) -> dict[str, str]:
    """HF key -> safetensors file, from the index when present, else from the lone file(s)."""
    index = os.path.join(path, INDEX_FILE)
    found: dict[str, str] = {}
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        headers = {}
        for key, file in weight_map.items():
            full = os.path.join(path, file)
            if file not in headers:
                if not os.path.isfile(full):
                    raise CheckpointError(f"{index}: lists {file!r} (for {key!r}), which does not exist")
                headers[file] = st.read_header(full)
            if key not in headers[file]:
                raise CheckpointError(f"{full}: the index places {key!r} here, but the file lacks it")
            found[key] = full
        for file, header in headers.items():
            for key in header:
                if key != "__metadata__" and key not in weight_map:
                    raise CheckpointError(f"{os.path.join(path, file)}: holds {key!r}, which the index does not list")
        return found
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {others}: re-save them as safetensors)" if others else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    for file in files:
        full = os.path.join(path, file)
        for key in st.read_header(full):
            if key == "__metadata__":
                continue
            if key in found:
                raise CheckpointError(f"{full}: {key!r} also appears in {found[key]}")
            found[key] = full
    return found


def _check_key_sets(entries: list[Entry], files: dict[str, str], where: str) -> None:
    expected = {e.hf_name for e in entries}
    missing = sorted(expected - set(files))
    extra = sorted(set(files) - expected)
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if extra:
            lines.append(f"{len(extra)} unexpected tensor(s): " + ", ".join(f"{k} (in {os.path.basename(files[k])})" for k in extra[:10])
                         + (" ..." if len(extra) > 10 else ""))
        raise CheckpointError(f"{where}: tensors do not match the architecture in config.json:\n  " + "\n  ".join(lines))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def load_hf_checkpoint(path: str, dtype: Optional[str] = None, progress: bool = False) -> tuple[OpenVLAConfig, dict, dict]:
    """HF checkpoint dir -> (config, params as nested dicts of numpy arrays, norm_stats).

    Arrays keep the checkpoint's dtype unless ``dtype`` ("float32", "bfloat16", "float16") is given.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config, norm_stats = read_config(path)
    entries = name_map(config)
    files = _tensor_files(path)
    _check_key_sets(entries, files, path)
    target = DTYPES[dtype] if dtype else None
    flat, headers = {}, {}
    bar = _progress(len(entries), "reading HF tensors", progress)
    for entry in entries:
        file = files[entry.hf_name]
        header = headers.get(file) or headers.setdefault(file, st.read_header(file))
        found = tuple(header[entry.hf_name]["shape"])
        if found != entry.hf_shape:
            raise CheckpointError(f"{file}: tensor {entry.hf_name!r} has shape {found}, expected {entry.hf_shape}")
        array = entry.from_hf(st.read_tensor(file, entry.hf_name, header))
        flat[entry.path] = np.ascontiguousarray(array, dtype=target)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return config, traverse_util.unflatten_dict(flat), norm_stats


# ----------------------------------------------------------------------------------------------------
# Writing


def check_params(config: OpenVLAConfig, params: dict) -> list[Entry]:
    """Entries of ``config``, after checking ``params`` has exactly those paths and shapes."""
    entries = name_map(config)
    flat = traverse_util.flatten_dict(meta.unbox(params))
    expected = {e.path: e for e in entries}
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    if missing or extra:
        raise CheckpointError(f"params do not match the model config: missing {missing[:10]}, unexpected {extra[:10]}")
    for path, entry in expected.items():
        if tuple(np.shape(flat[path])) != entry.jax_shape:
            raise CheckpointError(f"param {'/'.join(path)} has shape {tuple(np.shape(flat[path]))}, "
                                  f"expected {entry.jax_shape}")
    return entries


def _dtype_label(dtypes: set) -> str:
    for label, dtype in DTYPES.items():
        if dtypes == {dtype}:
            return label
    return "float32" if np.dtype(np.float32) in dtypes else sorted(str(d) for d in dtypes)[0]


def carried_files(src: str) -> list[str]:
    """Files of a checkpoint dir that travel unchanged (tokenizer, processor, remote code, ...)."""
    skip = {CONFIG_FILE, INDEX_FILE}
    return sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f)) and f not in skip
                  and not f.endswith(".safetensors"))


def atomic_dir(dst: str, overwrite: bool = False):
    """Context manager: yields a temp dir beside ``dst``, renamed to ``dst`` only on success."""
    return _AtomicDir(dst, overwrite)


class _AtomicDir:
    def __init__(self, dst: str, overwrite: bool):
        self.dst, self.overwrite = os.path.abspath(dst), overwrite

    def __enter__(self) -> str:
        if os.path.exists(self.dst) and (not os.path.isdir(self.dst) or os.listdir(self.dst)) and not self.overwrite:
            raise CheckpointError(f"{self.dst}: destination exists and is not empty (pass overwrite to replace it)")
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.dst):
            old = self.tmp + ".old"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save_hf_checkpoint(path: str, config: OpenVLAConfig, params: dict, norm_stats: Optional[dict] = None, *,
                       dtype: Optional[str] = None, carry_from: Optional[str] = None, overwrite: bool = False,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> None:
    """params -> HF checkpoint dir (config.json, sharded safetensors + index, carried files).

    Written to a temp dir and renamed into place only when complete. ``dtype`` casts every tensor;
    by default each keeps its dtype.
    """
    entries = check_params(config, params)
    flat = traverse_util.flatten_dict(meta.unbox(params))
    target = DTYPES[dtype] if dtype else None
    out_dtype = {e.hf_name: target or np.dtype(flat[e.path].dtype) for e in entries}
    by_name = {e.hf_name: e for e in entries}
    items = [(e.hf_name, e.hf_shape, out_dtype[e.hf_name]) for e in entries]
    shards = st.plan_shards(items, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def produce(key: str) -> np.ndarray:
        entry = by_name[key]
        return np.asarray(entry.to_hf(np.asarray(flat[entry.path])), dtype=out_dtype[key])

    carried = carried_files(carry_from) if carry_from else []
    has_remote_code = all(f in carried for f in REMOTE_CODE_FILES)
    bar = _progress(len(entries), "writing HF tensors", progress)
    with atomic_dir(path, overwrite) as tmp:
        for name, shard in zip(names, shards):
            st.write_file(os.path.join(tmp, name), shard, produce, on_tensor=(lambda _: bar.update()) if bar else None)
        if len(shards) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in items)
            weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        torch_dtype = _dtype_label(set(out_dtype.values()))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config_to_hf(config, norm_stats, torch_dtype, has_remote_code), f, indent=2)
            f.write("\n")
        for file in carried:
            shutil.copy2(os.path.join(carry_from, file), os.path.join(tmp, file))
    if bar:
        bar.close()


def iter_hf_names(config: OpenVLAConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor: the layout check against timm/transformers uses this."""
    for entry in name_map(config):
        yield entry.hf_name, entry.hf_shape
