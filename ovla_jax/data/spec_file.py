"""Datasets declared in data, not code: a small YAML or JSON file (or the same dict inside a train
config) that says which observation keys are the cameras and the state, where the action is and what
its gripper means. ``load`` turns it into a registry ``DatasetSpec`` with a standardization transform
built from those fields; ``register`` adds it to the one registry every verb reads.

    name: my_robot
    cameras: {primary: image, wrist: wrist_image}   # observation keys; primary is required
    language_key: language_instruction            # step field holding the instruction
    action:
      key: action                                 # step field ("a/b": a field of a dict action)
      encoding: eef_delta                         # eef_delta | eef_r6 | joint_pos | joint_pos_bimanual
      gripper: {dim: -1, open: 1.0, closed: 0.0, binarize: false}   # or `gripper: none`
      normalize: auto                             # auto: every dim but the gripper | a list of booleans
    state: [state]                                # observation keys (or "key[0:6]" columns), concatenated
    normalization: bounds_q99                     # optional: bounds_q99 | bounds | normal
    transform: my_transforms.py:standardize       # optional Python for what the fields cannot say

The gripper is mapped to OpenVLA's convention (1 = open, 0 = closed): ``(g - closed) / (open - closed)``,
then thresholded at 0.5 when ``binarize``. A custom ``transform`` (``file.py:function``, relative to the
spec file, or ``package.module:function``) runs first, on the raw trajectory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ovla_jax.data.errors import DataError
from ovla_jax.data.oxe import registry
from ovla_jax.data.oxe.recipes import obs

ENCODINGS = {
    "eef_delta": registry.ActionEncoding.EEF_POS,
    "eef_r6": registry.ActionEncoding.EEF_R6,
    "joint_pos": registry.ActionEncoding.JOINT_POS,
    "joint_pos_bimanual": registry.ActionEncoding.JOINT_POS_BIMANUAL,
}
NORMALIZATIONS = ("bounds_q99", "bounds", "normal")
_TOP = {"name", "cameras", "language_key", "action", "state", "normalization", "transform", "drop_zero_motion"}
_ACTION = {"key", "encoding", "gripper", "normalize"}
_GRIPPER = {"dim", "open", "closed", "binarize"}
_COLUMNS = re.compile(r"^(?P<key>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")

SpecSource = Union[str, Mapping[str, Any]]


def read(path: str) -> dict:
    """A spec file (.yaml / .yml / .json) -> its dict, or a DataError naming the file."""
    from ovla_jax import fileio

    if not fileio.exists(path):
        raise DataError(f"dataset spec {path}: file not found")
    text = fileio.read_text(path)
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise DataError(f"dataset spec {path}: reading YAML needs PyYAML (pip install pyyaml), or write it "
                        f"as JSON") from None
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: name the file and the parser's message
        raise DataError(f"dataset spec {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                        f"{e}") from None
    if not isinstance(data, dict):
        raise DataError(f"dataset spec {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def load(source: SpecSource, base_dir: Optional[str] = None) -> registry.DatasetSpec:
    """A spec file path or dict -> DatasetSpec (every field checked, errors name the file and field)."""
    if isinstance(source, str):
        where, fields, base_dir = source, read(source), os.path.dirname(os.path.abspath(source))
    else:
        fields = dict(source)
        where = f"dataset spec {fields.get('name', '?')!r} (inline)"
        base_dir = base_dir or os.getcwd()
    label = where if not isinstance(source, str) else f"dataset spec {where}"

    def fail(msg):
        raise DataError(f"{label}: {msg}")

    unknown = sorted(set(fields) - _TOP)
    if unknown:
        fail(f"unknown field(s) {unknown}; a spec has {sorted(_TOP)}")
    name = fields.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
        fail(f"'name' must be the dataset's directory name under the data dir (letters, digits, _ . -), got {name!r}")
    cameras = fields.get("cameras")
    if not isinstance(cameras, Mapping) or not cameras.get("primary"):
        fail("'cameras' must map 'primary' (and optionally 'secondary', 'wrist') to observation image keys")
    bad_cams = sorted(set(cameras) - set(("primary", "secondary", "wrist")))
    if bad_cams:
        fail(f"unknown camera role(s) {bad_cams}; the roles are primary, secondary, wrist")
    action = dict(fields.get("action") or {})
    unknown = sorted(set(action) - _ACTION)
    if unknown:
        fail(f"action: unknown field(s) {unknown}; it has {sorted(_ACTION)}")
    encoding = action.get("encoding", "eef_delta")
    if encoding not in ENCODINGS:
        fail(f"action.encoding {encoding!r}: choose from {sorted(ENCODINGS)}")
    gripper = _gripper(action.get("gripper", {"dim": -1}), fail)
    mask = _mask(action.get("normalize", "auto"), fail)
    normalization = fields.get("normalization")
    if normalization is not None and normalization not in NORMALIZATIONS:
        fail(f"normalization {normalization!r}: choose from {NORMALIZATIONS}")
    state = fields.get("state") or []
    if isinstance(state, str):
        state = [state]
    if not isinstance(state, Sequence) or not all(isinstance(k, str) for k in state):
        fail(f"'state' must list observation keys (or 'key[start:stop]' columns), got {state!r}")
    custom = _custom_transform(fields.get("transform"), base_dir, fail) if fields.get("transform") else None
    standardize = _standardize(action.get("key", "action"), gripper, custom)
    standardize.recipe = _recipe(fields, custom)  # the statistics cache key follows the spec's content
    return registry.DatasetSpec(
        name=name, cameras={role: cameras.get(role) for role in ("primary", "secondary", "wrist")},
        state_encoding=registry.StateEncoding.NONE, action_encoding=ENCODINGS[encoding], standardize=standardize,
        language_key=fields.get("language_key", "language_instruction"), action_normalization_mask=mask,
        drop_zero_motion=bool(fields.get("drop_zero_motion", False)),
        state_keys=tuple(_state_piece(k) for k in state), declared_in=where if isinstance(source, str) else "inline spec",
        gripper_dim=gripper["dim"] if gripper else None, normalization=normalization)


def register(sources: Sequence[SpecSource]) -> list[registry.DatasetSpec]:
    """Load and register every spec (a later one of the same name replaces an earlier one)."""
    return [registry.register(load(s)) for s in sources]


def _gripper(value, fail) -> Optional[dict]:
    if value in (None, "none", False):
        return None
    if not isinstance(value, Mapping):
        fail(f"action.gripper must be a mapping {sorted(_GRIPPER)} or 'none', got {value!r}")
    unknown = sorted(set(value) - _GRIPPER)
    if unknown:
        fail(f"action.gripper: unknown field(s) {unknown}; it has {sorted(_GRIPPER)}")
    g = {"dim": int(value.get("dim", -1)), "open": float(value.get("open", 1.0)),
         "closed": float(value.get("closed", 0.0)), "binarize": bool(value.get("binarize", False))}
    if g["open"] == g["closed"]:
        fail("action.gripper: 'open' and 'closed' must differ")
    return g


def _mask(value, fail) -> Optional[tuple]:
    """auto -> None (every dim but the gripper's, for whatever width the actions have)."""
    if value == "auto":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, bool) for v in value):
        return tuple(value)
    fail(f"action.normalize must be 'auto' or a list of booleans (one per action dim), got {value!r}")


def _state_piece(key: str):
    match = _COLUMNS.match(key)
    if not match:
        return key
    to_int = lambda s: int(s) if s else None  # noqa: E731
    return obs(match["key"], to_int(match["start"]), to_int(match["stop"]))


def _custom_transform(ref: str, base_dir: str, fail) -> Callable:
    if not isinstance(ref, str) or ":" not in ref:
        fail(f"transform {ref!r}: write it as 'file.py:function' or 'package.module:function'")
    target, func = ref.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = target if os.path.isabs(target) else os.path.join(base_dir, target)
            if not os.path.isfile(path):
                fail(f"transform file {path} not found")
            module_spec = importlib.util.spec_from_file_location(f"ovla_user_transform_{abs(hash(path))}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except DataError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why
        fail(f"transform {ref!r} could not be imported: {type(e).__name__}: {e}")
    fn = getattr(module, func, None)
    if not callable(fn):
        fail(f"transform {ref!r}: {target} has no function {func!r}")
    return fn


def _standardize(action_key: str, gripper: Optional[dict], custom: Optional[Callable]) -> Callable:
    import tensorflow as tf

    def standardize(traj):
        if custom is not None:
            traj = custom(dict(traj))
        traj = dict(traj)
        value = traj
        for part in action_key.split("/"):
            if not isinstance(value, Mapping) or part not in value:
                have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise DataError(f"the spec's action key {action_key!r}: no field {part!r} (there: {have})")
            value = value[part]
        action = tf.cast(value, tf.float32)
        action = action[:, None] if action.shape.rank == 1 else action
        if gripper is not None:
            width = action.shape[-1]
            dim = gripper["dim"] % width
            g = (action[:, dim] - gripper["closed"]) / (gripper["open"] - gripper["closed"])
            if gripper["binarize"]:
                g = tf.cast(g > 0.5, tf.float32)
            action = tf.concat([action[:, :dim], g[:, None], action[:, dim + 1:]], axis=1)
        traj["action"] = action
        return traj

    return standardize


def _recipe(fields: Mapping, custom: Optional[Callable]) -> str:
    text = json.dumps({k: fields.get(k) for k in ("action", "language_key", "state", "transform")}, sort_keys=True,
                      default=str)
    if custom is not None:
        try:
            text += inspect.getsource(custom)
        except (OSError, TypeError):
            text += repr(custom)
    return "spec:" + hashlib.sha256(text.encode()).hexdigest()[:16]
