"""Frames -> model inputs: the one data-to-model contract (``Batch``).

Per example: ``input_ids`` = BOS + prompt + [empty token] + 7 action tokens + EOS, right-padded to a
fixed length (static shapes under jit); ``labels`` = the action tokens and EOS, IGNORE elsewhere;
``pixel_values`` float32[S, S, 3 * towers]; ``actions`` the normalized actions; ``dataset_name``.
Tokenization runs on the host in Python with a per-instruction cache (instructions repeat), after
tf.data has done the image work.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from ovla_jax import actions as A
from ovla_jax.data.errors import DataError
from ovla_jax.prompts import vla_prompt
from ovla_jax.tokenizer import Tokenizer

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Batch:
    """Host-local batch. B examples, L tokens, S image side, C = 3 * towers, A action dims."""

    input_ids: np.ndarray  # int32[B, L]
    attention_mask: np.ndarray  # bool[B, L]
    labels: np.ndarray  # int32[B, L], IGNORE outside action tokens + EOS
    pixel_values: np.ndarray  # float32[B, S, S, C]
    actions: np.ndarray  # float32[B, A] normalized (what the tokens encode)
    dataset_name: np.ndarray  # object[B] of str


def prompt_ids(tokenizer: Tokenizer, instruction: str) -> list[int]:
    """BOS + the OpenVLA prompt + the empty token: what training and inference both feed the model."""
    ids = tokenizer.encode(vla_prompt(instruction))
    if tokenizer.empty_token_id is not None and ids[-1] != tokenizer.empty_token_id:
        ids.append(tokenizer.empty_token_id)
    return ids


class BatchTransform:
    """Turns a dict of numpy frame arrays (from the tf.data pipeline) into a :class:`Batch`."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, n_action_bins: int = A.N_ACTION_BINS, window: int = 1):
        self.tokenizer, self.max_length, self.n_action_bins = tokenizer, max_length, n_action_bins
        self.window = window  # with action chunks [W + F, A], the current step is index W - 1
        self._prompt_ids = functools.lru_cache(maxsize=65536)(self._encode_prompt)

    def _encode_prompt(self, instruction: str) -> tuple:
        return tuple(prompt_ids(self.tokenizer, instruction))

    def example(self, instruction: str, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (input_ids int32[L], attention_mask bool[L], labels int32[L])."""
        prompt = self._prompt_ids(instruction)
        action_ids = A.encode_actions(action, self.tokenizer.vocab_size, self.n_action_bins).tolist()
        ids = list(prompt) + action_ids + [self.tokenizer.eos_id]
        if len(ids) > self.max_length:
            raise DataError(f"prompt for {instruction!r} needs {len(ids)} tokens; max_length is {self.max_length} "
                            f"(raise max_length)")
        n = len(ids)
        input_ids = np.full(self.max_length, self.tokenizer.pad_id, np.int32)
        input_ids[:n] = ids
        mask = np.zeros(self.max_length, bool)
        mask[:n] = True
        labels = np.full(self.max_length, IGNORE, np.int32)
        labels[len(prompt):n] = ids[len(prompt):]
        return input_ids, mask, labels

    def __call__(self, frames: dict, instruction_key: str = "language_instruction") -> Batch:
        instructions = [s.decode() if isinstance(s, bytes) else str(s) for s in frames["task"][instruction_key]]
        action = np.asarray(frames["action"], np.float32)
        if action.ndim == 3:  # [B, W + F, A] chunk: OpenVLA predicts the current step's action
            action = action[:, self.window - 1]
        rows = [self.example(i, a) for i, a in zip(instructions, action)]
        names = np.array([n.decode() if isinstance(n, bytes) else str(n) for n in frames["dataset_name"]], object)
        return Batch(input_ids=np.stack([r[0] for r in rows]), attention_mask=np.stack([r[1] for r in rows]),
                     labels=np.stack([r[2] for r in rows]), pixel_values=np.asarray(frames["pixel_values"], np.float32),
                     actions=action, dataset_name=names)


def decode_label_actions(batch: Batch, vocab_size: int, n_action_bins: int = A.N_ACTION_BINS,
                         action_dim: Optional[int] = None) -> np.ndarray:
    """The normalized actions that the labels encode: float32[B, A] (the EOS label is skipped)."""
    action_dim = action_dim or batch.actions.shape[-1]
    out = []
    for labels in batch.labels:
        ids = labels[labels != IGNORE][:action_dim]
        out.append(A.decode_action_tokens(ids, vocab_size, n_action_bins))
    return np.stack(out)


def batch_spec(batch_size: int, max_length: int, image_size: int, channels: int, action_dim: int = A.ACTION_DIM,
               sharding=None) -> dict:
    """``jax.ShapeDtypeStruct``s of the global arrays :func:`to_global_arrays` makes (for ahead-of-time
    compilation: the same keys, shapes and dtypes as real batches)."""
    import jax

    shapes = {"input_ids": ((batch_size, max_length), np.int32), "attention_mask": ((batch_size, max_length), bool),
              "labels": ((batch_size, max_length), np.int32),
              "pixel_values": ((batch_size, image_size, image_size, channels), np.float32),
              "actions": ((batch_size, action_dim), np.float32), "dataset_id": ((batch_size,), np.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def to_global_arrays(batch: Batch, sharding, dataset_names: Optional[list] = None) -> dict:
    """Host-local Batch -> dict of global ``jax.Array`` sharded on the batch axis over all processes
    (each process passes its own shard; ``jax.make_array_from_process_local_data`` stitches them).
    ``dataset_name`` becomes ``dataset_id`` (index into ``dataset_names``) since arrays hold no strings."""
    import jax

    arrays = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "dataset_name"}
    if dataset_names is not None:
        index = {n: i for i, n in enumerate(dataset_names)}
        arrays["dataset_id"] = np.array([index[n] for n in batch.dataset_name], np.int32)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in arrays.items()}
