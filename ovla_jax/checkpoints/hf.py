"""HF PyTorch checkpoint (openvla/openvla-7b layout) <-> ovla-jax params. The only module that knows
PyTorch names.

Both checkpoint layouts are directories of safetensors shards plus the official ``config.json``: the HF
layout keys tensors by PyTorch name in PyTorch layout (``model*.safetensors``), the ovla-jax layout by
Flax path in Flax layout (``params*.safetensors``). Conversion streams between them tensor by tensor
(peak memory: one tensor), which a whole-tree writer such as orbax (which copies the tree) cannot.

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
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from flax.linen import meta

from ovla_jax import fileio
from ovla_jax.checkpoints.safetensors_io import dtype_from_name
from ovla_jax.checkpoints.tensor_dir import TensorDir, read_json, write_tensor_dir
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints import oft
from ovla_jax.checkpoints.hf_config import OFT_KEY, REMOTE_CODE_FILES, RUN_KEY, config_from_hf, config_to_hf
from ovla_jax.models.config import OpenVLAConfig
from ovla_jax.models.openvla import OpenVLA

CONFIG_FILE = "config.json"
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


_HEAD_MODULES = {"norm": "ffn.0", "fc": "ffn.1"}  # OFT's MLPResNetBlock: ffn = [LayerNorm, Linear, ReLU]


def _module_prefix(modules: list[str]) -> str:
    """Flax module path -> PyTorch module path (OFT's L1 head nests its MLPResNet under ``model``)."""
    if modules and modules[0] == "action_head":
        rest = []
        for m in modules[1:]:
            block = re.match(r"^block_(\d+)$", m)
            rest.append(f"mlp_resnet_blocks.{block.group(1)}" if block else _HEAD_MODULES.get(m, m))
        return ".".join(["action_head", "model"] + rest)
    return ".".join(_hf_module_name(m) for m in modules)


def _entry(path: tuple[str, ...], shape: tuple[int, ...]) -> Entry:
    *modules, leaf = path
    prefix = _module_prefix(modules)
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
    channels = 3 * len(config.vision) * config.num_images

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


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one checkpoint format names and lays out each Entry."""

    name: str  # "hf" | "jax"
    stem: str  # shard file stem

    def key(self, e: Entry) -> str:
        return e.hf_name if self.name == "hf" else "/".join(e.path)

    def shape(self, e: Entry) -> tuple[int, ...]:
        return e.hf_shape if self.name == "hf" else e.jax_shape

    def from_flax(self, e: Entry, array: np.ndarray) -> np.ndarray:
        return e.to_hf(array) if self.name == "hf" else array

    def to_flax(self, e: Entry, array: np.ndarray) -> np.ndarray:
        return e.from_hf(array) if self.name == "hf" else array


HF = Layout("hf", "model")
JAX = Layout("jax", "params")
LAYOUTS = {"hf": HF, "jax": JAX}
INDEX_FILE = f"{HF.stem}.safetensors.index.json"


# ----------------------------------------------------------------------------------------------------
# Reading


def read_config(path: str) -> tuple[OpenVLAConfig, dict]:
    """(config, norm_stats) from a checkpoint directory's config.json. A dir written by OFT itself (its
    config.json is OpenVLA's, the head files lie beside it) gets its OFT settings from those files."""
    if not fileio.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    file = fileio.join(path, CONFIG_FILE)
    raw = read_json(file)
    if OFT_KEY not in raw:
        inferred = oft.infer_fields(path, oft.find_files(path))
        if inferred:
            raw = dict(raw, **{OFT_KEY: inferred})
    return config_from_hf(raw, file)


def open_checked(path: str, layout: Layout, entries: list[Entry]) -> TensorDir:
    """Open a checkpoint's tensors, requiring exactly ``entries``' keys with their shapes."""
    tensors = TensorDir(path, layout.stem)
    expected = {layout.key(e): e for e in entries}
    missing = sorted(set(expected) - set(tensors.files))
    extra = sorted(set(tensors.files) - set(expected))
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if extra:
            lines.append(f"{len(extra)} unexpected tensor(s): " + ", ".join(
                f"{k} (in {os.path.basename(tensors.files[k])})" for k in extra[:10]) + (" ..." if len(extra) > 10 else ""))
        raise CheckpointError(f"{path}: tensors do not match the architecture in config.json:\n  " + "\n  ".join(lines))
    for key, entry in expected.items():
        found, want = tensors.shape(key), layout.shape(entry)
        if found != want:
            raise CheckpointError(f"{tensors.files[key]}: tensor {key!r} has shape {found}, expected {want}")
    return tensors


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def _side_files(layout: Layout, entries: list[Entry]) -> tuple[bool, set]:
    """(whether the model has FiLM, paths of the entries kept outside the HF model files): in the HF
    layout, OFT's components and (OFT+) the FiLM layers live in OFT's per-component files."""
    if layout.name != "hf":
        return False, set()
    film = any(oft.is_film_param(e.hf_name) for e in entries)
    return film, {e.path for e in entries if oft.component_of(e.path) is not None
                  or (film and oft.is_film_param(e.hf_name))}


class Source:
    """Every tensor of a checkpoint dir, checked against the name map: in one safetensors set, or (HF
    layout of an OFT model) the backbone there and each OFT component in its own file (``oft.py``)."""

    def __init__(self, path: str, layout: Layout, entries: list[Entry]):
        self.layout = layout
        split = layout.name == "hf"
        film, side = _side_files(layout, entries)
        backbone = [e for e in entries if e.path not in side]
        self.tensors = open_checked(path, layout, backbone)
        self.parts: dict = {}
        groups = {c: [e for e in entries if oft.component_of(e.path) == c] for c in oft.COMPONENTS} if split else {}
        if film:  # OFT+: the whole vision backbone comes from its own file, as OFT loads it
            groups[oft.VISION] = [e for e in entries if oft.is_vision_param(e.hf_name)]
        groups = {c: group for c, group in groups.items() if group}
        files = oft.find_files(path) if groups else {}
        for component, group in groups.items():
            state = oft.read_component(files, component, path)
            where = files[component].get("safetensors") or files[component]["pt"]
            if component == oft.VISION:
                state, want = oft.vision_from_file(state, where), {e.hf_name: e for e in group}
            else:
                want = {e.hf_name[len(component) + 1:]: e for e in group}
            missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
            if missing or extra:
                raise CheckpointError(f"{where}: tensors do not match the {component} in config.json: missing "
                                      f"{missing[:10]}, unexpected {extra[:10]}")
            for key, e in want.items():
                if tuple(state[key].shape) != e.hf_shape:
                    raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(state[key].shape)}, expected "
                                          f"{e.hf_shape}")
                self.parts[e.path] = state[key]

    def read(self, entry: Entry) -> np.ndarray:
        """The tensor in the source's layout."""
        if entry.path in self.parts:
            return self.parts[entry.path]
        return self.tensors.read(self.layout.key(entry))

    def dtype(self, entry: Entry) -> np.dtype:
        if entry.path in self.parts:
            return np.dtype(self.parts[entry.path].dtype)
        return dtype_from_name(self.tensors.dtype_name(self.layout.key(entry)))


def load_checkpoint(path: str, layout: Layout, dtype: Optional[str] = None,
                    progress: bool = False) -> tuple[OpenVLAConfig, dict, dict]:
    """Checkpoint dir -> (config, params as nested dicts of numpy arrays, norm_stats)."""
    config, norm_stats = read_config(path)
    entries = name_map(config)
    source = Source(path, layout, entries)
    target = DTYPES[dtype] if dtype else None
    flat = {}
    bar = _progress(len(entries), f"reading {path}", progress)
    for entry in entries:
        flat[entry.path] = np.ascontiguousarray(layout.to_flax(entry, source.read(entry)), dtype=target)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return config, traverse_util.unflatten_dict(flat), norm_stats


def load_hf_checkpoint(path: str, dtype: Optional[str] = None, progress: bool = False) -> tuple[OpenVLAConfig, dict, dict]:
    """HF checkpoint dir -> (config, params, norm_stats). Arrays keep the checkpoint's dtype unless
    ``dtype`` ("float32", "bfloat16", "float16") is given."""
    return load_checkpoint(path, HF, dtype, progress)


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
    def is_weights(name):
        return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
    return sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f)) and f != CONFIG_FILE
                  and not is_weights(f))


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


def write_checkpoint(path: str, layout: Layout, config: OpenVLAConfig, norm_stats: Optional[dict],
                     entries: list[Entry], dtypes: dict, produce_flax: Callable[[Entry], np.ndarray], *,
                     carry_from: Optional[str] = None, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
                     run: Optional[dict] = None) -> None:
    """Write a checkpoint dir atomically: tensors (``produce_flax(entry)`` gives each in Flax layout,
    called once, in order), config.json, carried files. ``dtypes`` maps entry path -> stored dtype.
    HF layout of an OFT model: its components go to OFT's per-component files (``oft.py``)."""
    film, side = _side_files(layout, entries)
    components = [e for e in entries if e.path in side]
    entries = [e for e in entries if e.path not in side]
    by_key = {layout.key(e): e for e in entries}
    items = [(layout.key(e), layout.shape(e), dtypes[e.path]) for e in entries]
    vision: dict = {}  # OFT+: the vision backbone also goes to its own file, FiLM layers included

    def produce(key: str) -> np.ndarray:
        entry = by_key[key]
        array = np.asarray(layout.from_flax(entry, np.asarray(produce_flax(entry))), dtype=dtypes[entry.path])
        if film and oft.is_vision_param(entry.hf_name):
            vision[entry.hf_name] = array
        return array

    carried = carried_files(carry_from) if carry_from else []
    has_remote_code = all(f in carried for f in REMOTE_CODE_FILES)
    bar = _progress(len(entries), f"writing {path}", progress)
    with atomic_dir(path, overwrite) as tmp:
        write_tensor_dir(tmp, layout.stem, items, produce, max_shard_bytes, on_tensor=(lambda _: bar.update()) if bar else None)
        by_component: dict = {}
        for e in components:  # after the backbone: produce_flax is called once per entry
            array = np.asarray(layout.from_flax(e, np.asarray(produce_flax(e))), dtype=dtypes[e.path])
            if oft.component_of(e.path) is None:
                vision[e.hf_name] = array
            else:
                by_component.setdefault(oft.component_of(e.path), {})[e.hf_name.split(".", 1)[1]] = array
        if film:
            linear = {e.hf_name.rsplit(".", 1)[0] for e in entries if e.kind == "linear" and oft.is_vision_param(e.hf_name)}
            by_component[oft.VISION] = oft.vision_file_tensors(dict(sorted(vision.items())), linear)
        for component, tensors in by_component.items():
            oft.write_component(tmp, component, "latest", tensors)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config_to_hf(config, norm_stats, _dtype_label(set(dtypes.values())), has_remote_code, run), f,
                      indent=2)
            f.write("\n")
        for file in carried:
            if oft.is_component_file(file):
                continue
            shutil.copy2(os.path.join(carry_from, file), os.path.join(tmp, file))
    if bar:
        bar.close()


def save_checkpoint(path: str, layout: Layout, config: OpenVLAConfig, params: dict, norm_stats: Optional[dict] = None, *,
                    dtype: Optional[str] = None, **kwargs) -> None:
    """In-memory params -> checkpoint dir of ``layout``. ``dtype`` casts every tensor; by default each
    keeps its own dtype."""
    entries = check_params(config, params)
    flat = traverse_util.flatten_dict(meta.unbox(params))
    dtypes = {e.path: DTYPES[dtype] if dtype else np.dtype(flat[e.path].dtype) for e in entries}
    write_checkpoint(path, layout, config, norm_stats, entries, dtypes, lambda e: flat[e.path], **kwargs)


def save_hf_checkpoint(path: str, config: OpenVLAConfig, params: dict, norm_stats: Optional[dict] = None,
                       **kwargs) -> None:
    """params -> HF checkpoint dir (config.json, sharded model*.safetensors + index, carried files),
    written to a temp dir and renamed into place only when complete."""
    save_checkpoint(path, HF, config, params, norm_stats, **kwargs)


def convert_checkpoint(src: str, dst: str, src_layout: Layout, dst_layout: Layout, *, dtype: Optional[str] = None,
                       **kwargs) -> None:
    """Stream every tensor of ``src`` into ``dst`` (any layout to any layout), one at a time."""
    config, norm_stats = read_config(src)
    entries = name_map(config)
    source = Source(src, src_layout, entries)
    dtypes = {e.path: DTYPES[dtype] if dtype else source.dtype(e) for e in entries}
    write_checkpoint(dst, dst_layout, config, norm_stats, entries, dtypes,
                     lambda e: src_layout.to_flax(e, source.read(e)), carry_from=src, run=read_run(src), **kwargs)


def read_run(path: str) -> Optional[dict]:
    """The training run's settings recorded in a checkpoint dir's config.json (ovla-jax exports), or None."""
    return read_json(fileio.join(path, CONFIG_FILE)).get(RUN_KEY)


def iter_hf_names(config: OpenVLAConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor: the layout check against timm/transformers uses this."""
    for entry in name_map(config):
        yield entry.hf_name, entry.hf_shape
