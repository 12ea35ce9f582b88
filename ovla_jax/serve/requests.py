"""One inference request, validated before it joins a batch: every field a client sends is checked here
(type, dtype, rank, shape, known statistics), so a bad request is answered with a message naming the
field and never reaches, or fails, a batch of good ones."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

MAX_SIDE = 2048  # pixels per image side the server accepts


class BadRequest(ValueError):
    """The client's fault: answered 4xx (REST) or with an error frame (websocket), never a crash.
    ``status``: 400 for a body that does not parse, 422 for fields that are missing or wrong."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Example:
    image: np.ndarray  # uint8[H, W, 3]
    instruction: str
    unnorm_key: Optional[str] = None
    wrist_image: Optional[np.ndarray] = None
    proprio: Optional[np.ndarray] = None

    def group(self) -> tuple:
        """Examples with the same group run in one batched call."""
        return (self.unnorm_key, self.image.shape, None if self.wrist_image is None else self.wrist_image.shape)


def _image(value: Any, field: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise BadRequest(f"{field}: expected a uint8[H, W, 3] array, got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise BadRequest(f"{field}: expected dtype uint8, got {value.dtype}")
    if value.ndim != 3 or value.shape[-1] != 3:
        raise BadRequest(f"{field}: expected shape [H, W, 3], got {list(value.shape)}")
    if not (1 <= value.shape[0] <= MAX_SIDE and 1 <= value.shape[1] <= MAX_SIDE):
        raise BadRequest(f"{field}: image sides must be 1..{MAX_SIDE} pixels, got {list(value.shape[:2])}")
    return np.ascontiguousarray(value)


def validate(policy, *, image: Any, instruction: Any, unnorm_key: Any = None, wrist_image: Any = None,
             proprio: Any = None) -> Example:
    """Client fields -> an Example the policy accepts, or BadRequest naming the field."""
    cfg = policy.config
    image = _image(image, "image")
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest(f"instruction: expected a non-empty string, got {type(instruction).__name__}")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise BadRequest(f"unnorm_key: expected a string or null, got {type(unnorm_key).__name__}")
    try:
        policy.action_stats(unnorm_key)
    except ValueError as e:
        raise BadRequest(f"unnorm_key: {e}") from None
    if cfg.num_images > 1:
        if wrist_image is None:
            raise BadRequest(f"wrist_image: this model reads {cfg.num_images} images (third-person, then wrist)")
        wrist_image = _image(wrist_image, "wrist_image")
    elif wrist_image is not None:
        raise BadRequest("wrist_image: this model reads one image")
    if cfg.proprio_dim:
        if proprio is None:
            raise BadRequest(f"proprio: this model reads a {cfg.proprio_dim}-D state")
        proprio = np.asarray(proprio)
        if proprio.dtype.kind not in "fiu" or proprio.shape != (cfg.proprio_dim,):
            raise BadRequest(f"proprio: expected a float[{cfg.proprio_dim}] array, got {proprio.dtype}{list(proprio.shape)}")
        proprio = proprio.astype(np.float32)
        if not np.all(np.isfinite(proprio)):
            raise BadRequest("proprio: holds a non-finite value")
    elif proprio is not None:
        raise BadRequest("proprio: this model reads no proprio state")
    try:
        policy.prompts([instruction])
    except ValueError as e:
        raise BadRequest(f"instruction: {e}") from None
    return Example(image, instruction, unnorm_key, wrist_image, proprio)


def warmup_example(policy, unnorm_key=None) -> Example:
    """A valid request of blank images for compiling the batch buckets before serving."""
    cfg = policy.config
    image = np.zeros((policy.image_size, policy.image_size, 3), np.uint8)
    return validate(policy, image=image, instruction="warm up", unnorm_key=unnorm_key,
                    wrist_image=image if cfg.num_images > 1 else None,
                    proprio=np.zeros(cfg.proprio_dim, np.float32) if cfg.proprio_dim else None)
