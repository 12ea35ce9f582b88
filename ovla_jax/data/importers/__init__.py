"""``ovla-jax import``: robot data in the formats users have -> an RLDS dataset and its spec file.

A reader (``lerobot.py``, ``hdf5.py``) yields ``Episode``s one at a time; ``write`` streams them into
``DATA_DIR/NAME/1.0.0`` (images PNG, so nothing is lost), prints a summary and writes ``DATA_DIR/NAME.yaml``:
the dataset spec every verb takes with ``--dataset-spec``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from ovla_jax.data.errors import DataError


@dataclasses.dataclass
class Episode:
    images: dict  # camera -> uint8[T, H, W, 3]
    actions: np.ndarray  # float32[T, A]
    instructions: list  # one per step
    state: Optional[np.ndarray] = None  # float32[T, S]


@dataclasses.dataclass
class Layout:
    """What a reader found before reading any episode: the features of the RLDS it will write."""

    cameras: dict  # camera -> (H, W, 3)
    action_dim: int
    state_dim: int
    num_episodes: int
    source: str


class Reader:
    """One input format. Subclasses set ``layout`` and implement ``episode(i)``."""

    layout: Layout

    def episode(self, index: int) -> Episode:
        raise NotImplementedError

    def episodes(self, indices: Sequence[int]) -> Iterator[Episode]:
        for i in indices:
            yield self.checked(i, self.episode(i))

    def checked(self, index: int, ep: Episode) -> Episode:
        """Every episode must match the layout: a mismatch names the episode and what differs."""
        where = f"{self.layout.source}: episode {index}"
        length = len(ep.actions)
        if ep.actions.ndim != 2 or ep.actions.shape[1] != self.layout.action_dim:
            raise DataError(f"{where}: action shape {ep.actions.shape}, expected [T, {self.layout.action_dim}]")
        if length == 0:
            raise DataError(f"{where}: no steps")
        for cam, shape in self.layout.cameras.items():
            frames = ep.images.get(cam)
            if frames is None or frames.shape != (length, *shape) or frames.dtype != np.uint8:
                got = None if frames is None else (frames.shape, str(frames.dtype))
                raise DataError(f"{where}: camera {cam!r} has {got}, expected uint8{[length, *shape]}")
        if self.layout.state_dim and (ep.state is None or ep.state.shape != (length, self.layout.state_dim)):
            raise DataError(f"{where}: state shape {None if ep.state is None else ep.state.shape}, "
                            f"expected [{length}, {self.layout.state_dim}]")
        if len(ep.instructions) != length:
            raise DataError(f"{where}: {len(ep.instructions)} instructions for {length} steps")
        return ep


class Summary:
    """Running totals of what was written (for the closing report)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.episodes = self.steps = 0
        self.low = np.full(layout.action_dim, np.inf)
        self.high = np.full(layout.action_dim, -np.inf)
        self.instructions: set = set()

    def add(self, ep: Episode) -> Episode:
        self.episodes += 1
        self.steps += len(ep.actions)
        self.low = np.minimum(self.low, ep.actions.min(0))
        self.high = np.maximum(self.high, ep.actions.max(0))
        self.instructions.update(ep.instructions)
        return ep

    def text(self, target: str, spec_path: str) -> str:
        cams = ", ".join(f"{c} {h}x{w}" for c, (h, w, _) in self.layout.cameras.items())
        lines = [f"wrote {target}",
                 f"  episodes {self.episodes}, steps {self.steps}, instructions {len(self.instructions)}",
                 f"  cameras: {cams}",
                 f"  action: {self.layout.action_dim}-D, per-dim min {np.round(self.low, 4).tolist()}",
                 f"                 max {np.round(self.high, 4).tolist()}",
                 f"  state: {self.layout.state_dim}-D" if self.layout.state_dim else "  state: none",
                 f"spec: {spec_path} (check its camera roles and action.gripper, then pass it with --dataset-spec)"]
        return "\n".join(lines)


def spec_text(name: str, layout: Layout, primary: str, wrist: Optional[str], gripper: Optional[dict]) -> str:
    """The spec file of an imported dataset, as YAML with comments a user can edit."""
    cams = f"{{primary: {primary}" + (f", wrist: {wrist}" if wrist else "") + "}"
    if gripper:
        grip = (f"{{dim: {gripper['dim']}, open: {gripper['open']}, closed: {gripper['closed']}, "
                f"binarize: {str(gripper.get('binarize', False)).lower()}}}")
    else:
        grip = "none  # or {dim: -1, open: 1.0, closed: 0.0}: mapped to OpenVLA's 1 = open"
    lines = [f"# Written by ovla-jax import from {layout.source}",
             f"name: {name}",
             f"cameras: {cams}  # all cameras: {', '.join(layout.cameras)}",
             "language_key: language_instruction",
             "action:",
             "  key: action",
             "  encoding: eef_delta  # eef_delta | eef_r6 | joint_pos | joint_pos_bimanual",
             f"  gripper: {grip}",
             "  normalize: auto  # every dim but the gripper",
             f"state: [state]  # {layout.state_dim}-D" if layout.state_dim else "state: []"]
    return "\n".join(lines) + "\n"


def write(reader: Reader, data_dir: str, name: str, *, val_episodes: int = 0, primary: Optional[str] = None,
          wrist: Optional[str] = None, gripper: Optional[dict] = None, spec_path: Optional[str] = None,
          version: str = "1.0.0", progress: bool = True) -> tuple[str, str, Summary]:
    """Stream every episode of ``reader`` into RLDS; write the spec file. -> (dataset dir, spec path, summary)."""
    from ovla_jax import fileio
    from ovla_jax.data import rlds_writer as W

    layout = reader.layout
    cameras = list(layout.cameras)
    primary = primary or next((c for c in cameras if not _looks_like_wrist(c)), cameras[0])
    if wrist is None:
        wrist = next((c for c in cameras if _looks_like_wrist(c) and c != primary), None)
    for role, cam in (("primary", primary), ("wrist", wrist)):
        if cam is not None and cam not in layout.cameras:
            raise DataError(f"{layout.source}: --{role} {cam!r} is not a camera of this dataset ({cameras})")
    n = layout.num_episodes
    if not 0 <= val_episodes < n:
        raise DataError(f"{layout.source}: --val-episodes {val_episodes} must leave training episodes (of {n})")
    summary = Summary(layout)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"importing {name}", unit="episode")

    def stream(indices):
        for ep in reader.episodes(indices):
            summary.add(ep)
            if bar is not None:
                bar.update(1)
            yield W.episode(ep.images, ep.actions.astype(np.float32), ep.instructions,
                            None if ep.state is None else ep.state.astype(np.float32))

    splits = {"train": stream(range(n - val_episodes))}
    if val_episodes:
        splits["val"] = stream(range(n - val_episodes, n))
    try:
        target = W.write_rlds(data_dir, name, splits, cameras, layout.cameras, action_dim=layout.action_dim,
                              state_dim=layout.state_dim, version=version, image_encoding="png")
    finally:
        if bar is not None:
            bar.close()
    spec_path = spec_path or os.path.join(data_dir, f"{name}.yaml")
    fileio.write_text(spec_path, spec_text(name, layout, primary, wrist, gripper))
    return target, spec_path, summary


def _looks_like_wrist(camera: str) -> bool:
    return any(w in camera.lower() for w in ("wrist", "eye_in_hand", "hand_image", "gripper"))


FORMATS = ("lerobot", "hdf5")


def open_reader(fmt: str, source: str, **options) -> Reader:
    if fmt == "lerobot":
        from ovla_jax.data.importers.lerobot import LeRobotReader

        return LeRobotReader(source, **options)
    if fmt == "hdf5":
        from ovla_jax.data.importers.hdf5 import open_hdf5

        return open_hdf5(source, **options)
    raise DataError(f"unknown format {fmt!r}; choose from {FORMATS}")
