"""OpenVLA-OFT's checkpoint layout: the HF dir of the backbone (the same names as OpenVLA) plus one torch
state dict per extra component beside it, ``<component>--<step>_checkpoint.pt`` (``action_head``,
``proprio_projector``), keys possibly prefixed ``module.`` (saved from DDP).

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
        if match and match["component"] in COMPONENTS:
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
    if "proprio_projector" in files:
        fields["proprio_dim"] = int(read_component(files, "proprio_projector", directory)["fc1.weight"].shape[1])
    return fields


def is_component_file(name: str) -> bool:
    """Whether a file name is one of OFT's component files (written anew on conversion, never carried)."""
    match = _FILE.match(name)
    return bool(match) and match["component"] in COMPONENTS
