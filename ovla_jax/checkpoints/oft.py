"""OpenVLA-OFT's checkpoint layout: the HF dir of the backbone (the same names as OpenVLA) plus one torch
state dict per extra component beside it, ``<component>--<step>_checkpoint.pt`` (``action_head``,
``proprio_projector``), keys possibly prefixed ``module.`` (saved from DDP).

OFT+ (FiLM) adds ``vision_backbone--<step>_checkpoint.pt``: the whole vision backbone as OFT trains it,
wrapped for FiLM and in PEFT's LoRA. Its keys are the HF names with ``.block`` after each
``blocks.<i>`` (the FiLM wrapper; its own ``scale`` / ``shift`` Linears sit beside it) and, for every
linear layer, ``base_layer.weight`` / ``base_layer.bias`` plus ``lora_A`` / ``lora_B``. OFT loads the
vision backbone from this file, not from the merged model, so ovla-jax does too (merging the LoRA with
OFT's scaling ``min(r, 16) / r``). Written the same way, with a zero LoRA of rank 32 (OFT's default
``lora_rank``, which its loader must be given), so OFT's own loader accepts it and the weights are exact.

ovla-jax reads those ``.pt`` files with ``torch.load(weights_only=True)`` (the ``[torch]`` extra) or,
preferred and torch-free, the ``.safetensors`` twin it writes next to each. Component tensor names come
from the one name map in ``hf.py`` (``action_head.model.fc1.weight`` ...): the file holds them without
the component prefix, as OFT's modules' own state dicts do.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from ovla_jax import fileio
from ovla_jax.checkpoints.errors import CheckpointError

COMPONENTS = ("action_head", "proprio_projector")
VISION = "vision_backbone"  # OFT+ only: the FiLM-wrapped vision backbone's file
FILES = COMPONENTS + (VISION,)
OFT_LORA_RANK = 32
_FILM_PARAM = re.compile(r"^vision_backbone\..*\.blocks\.\d+\.(scale|shift)\.(weight|bias)$")
_BLOCK_PARAM = re.compile(r"^(vision_backbone\..*\.blocks\.\d+)\.(?!scale\.|shift\.)")
_WRAPPED_BLOCK = re.compile(r"^(vision_backbone\..*\.blocks\.\d+)\.block\.")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$")
_FILE = re.compile(r"^(?P<component>[a-z_]+)--(?P<step>[^_]+(?:_[^_]+)*?)_checkpoint\.(?P<ext>pt|safetensors)$")


def component_of(path: tuple) -> Optional[str]:
    """The OFT component a Flax param path belongs to, or None for the backbone."""
    return path[0] if path and path[0] in COMPONENTS else None


def find_files(directory: str) -> dict:
    """{component: {"pt": path, "safetensors": path, "step": str}} of the component files in ``directory``
    (the newest step when several are present)."""
    steps: dict = {}  # component -> step -> {ext: path}
    for name in sorted(fileio.listdir(directory)) if fileio.isdir(directory) else []:
        match = _FILE.match(name)
        if match and match["component"] in FILES:
            by_step = steps.setdefault(match["component"], {})
            by_step.setdefault(match["step"], {})[match["ext"]] = fileio.join(directory, name)
    found = {}
    for component, by_step in steps.items():
        newest = max(by_step, key=_step_key)
        found[component] = {"step": newest, **by_step[newest]}
    return found


def _step_key(step: str):
    return (0, int(step)) if step.isdigit() else (1, step)


def file_name(component: str, step: str, ext: str) -> str:
    return f"{component}--{step}_checkpoint.{ext}"


def read_component(files: dict, component: str, directory: str) -> dict:
    """{key without prefix: numpy array} of one component (safetensors twin first, else the torch file)."""
    info = files.get(component)
    if not info:
        raise CheckpointError(f"{directory}: no {component}--<step>_checkpoint.pt (or .safetensors) file; the "
                              f"model config needs its {component}")
    if "safetensors" in info:
        from safetensors.numpy import load

        with fileio.open_file(info["safetensors"], "rb") as f:
            state = load(f.read())
    else:
        state = _torch_load(info["pt"])
    out = {}
    for key, value in state.items():
        plain = key[len("module."):] if key.startswith("module.") else key
        if plain in out:
            raise CheckpointError(f"{info.get('safetensors') or info['pt']}: key {plain!r} appears twice "
                                  f"(with and without 'module.')")
        out[plain] = value
    return out


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading OFT's torch files needs PyTorch (pip install 'ovla-jax[torch]'), "
                              f"or a .safetensors twin beside it") from None
    with fileio.open_file(path, "rb") as f:
        import io

        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (got {type(state).__name__})")
    return {k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()) for k, v in state.items()}


def write_component(directory: str, component: str, step: str, tensors: dict, torch_file: bool = True) -> list[str]:
    """Write one component as ``.safetensors`` and, when torch is installed (and ``torch_file``), as OFT's
    ``.pt`` state dict. Returns the files written."""
    from safetensors.numpy import save_file

    written = [os.path.join(directory, file_name(component, step, "safetensors"))]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, written[0])
    if torch_file:
        try:
            import torch
        except ImportError:
            return written
        path = os.path.join(directory, file_name(component, step, "pt"))
        torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()}, path)
        written.append(path)
    return written


def infer_fields(directory: str, files: dict) -> dict:
    """OFT settings of a checkpoint written by OFT itself (its config.json has none): the L1 head and the
    action dim from the head's output layer, the proprio dim from the projector's input layer. The chunk
    and image count are not in the weights; OFT's LIBERO settings (8, 2 images) are assumed."""
    if "action_head" not in files:
        return {}
    head = read_component(files, "action_head", directory)
    if "model.fc2.weight" not in head:
        raise CheckpointError(f"{directory}: the action_head file has no 'model.fc2.weight' (an L1 regression "
                              f"head's output layer); keys: {sorted(head)[:8]}")
    fields = {"action_head": "l1", "action_dim": int(head["model.fc2.weight"].shape[0]), "chunk": 8, "num_images": 2,
              "head_hidden": int(head["model.fc1.weight"].shape[0])}
    if VISION in files:
        fields["film"] = True
    if "proprio_projector" in files:
        fields["proprio_dim"] = int(read_component(files, "proprio_projector", directory)["fc1.weight"].shape[1])
    return fields


def is_component_file(name: str) -> bool:
    """Whether a file name is one of OFT's component files (written anew on conversion, never carried)."""
    match = _FILE.match(name)
    return bool(match) and match["component"] in FILES


# -- OFT+: the FiLM vision backbone file ---------------------------------------------------------------
def is_film_param(hf_name: str) -> bool:
    """A FiLM ``scale`` / ``shift`` tensor of a ViT block (kept only in the vision file, as OFT does)."""
    return bool(_FILM_PARAM.match(hf_name))


def is_vision_param(hf_name: str) -> bool:
    return hf_name.startswith(VISION + ".")


def vision_file_tensors(tensors: dict, linear_modules: set) -> dict:
    """{HF name: array} of the vision backbone (FiLM included) -> the file's {key: array}: ``.block``
    inside each block, PEFT names and a zero rank-32 LoRA for each module in ``linear_modules``."""
    out = {}
    for name, array in tensors.items():
        key = _BLOCK_PARAM.sub(r"\1.block.", name)
        module, leaf = name.rsplit(".", 1)
        if module in linear_modules:
            base = key.rsplit(".", 1)[0]
            out[f"{base}.base_layer.{leaf}"] = array
            if leaf == "weight":
                out[f"{base}.lora_A.default.weight"] = np.zeros((OFT_LORA_RANK, array.shape[1]), array.dtype)
                out[f"{base}.lora_B.default.weight"] = np.zeros((array.shape[0], OFT_LORA_RANK), array.dtype)
        else:
            out[key] = array
    return out


def vision_from_file(state: dict, where: str) -> dict:
    """The vision file's {key: array} -> {HF name: array}: the FiLM wrapper's ``.block`` dropped, each
    PEFT LoRA merged into its base weight (W + min(r, 16) / r * B @ A; exact when the LoRA is zero)."""
    lora: dict = {}
    plain = {}
    for key, value in state.items():
        match = _LORA.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["ab"]] = value
        else:
            plain[_WRAPPED_BLOCK.sub(r"\1.", key).replace(".base_layer.", ".")] = value
    for module, ab in lora.items():
        name = _WRAPPED_BLOCK.sub(r"\1.", module) + ".weight"
        if set(ab) != {"A", "B"} or name not in plain:
            raise CheckpointError(f"{where}: LoRA of {module!r} is incomplete (has lora_{sorted(ab)} and "
                                  f"{'a' if name in plain else 'no'} base_layer.weight)")
        a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
        delta = (b @ a) * (min(a.shape[0], 16) / a.shape[0])
        if np.any(delta):
            base = plain[name]
            plain[name] = (np.asarray(base, np.float32) + delta).astype(base.dtype)
    return plain
