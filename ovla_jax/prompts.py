"""The OpenVLA prompt and the token-level rules around it.

Training text: ``In: What action should the robot take to {instruction}?\\nOut: `` + 7 action tokens +
``</s>``; the tokenizer adds BOS. At inference the prompt must end in the lone "▁" token (id 29871 in
the Llama-2 tokenizer), which the tokenizer drops at the end of a string, so it is appended when absent.
"""
from __future__ import annotations

from typing import Sequence

LLAMA2_EMPTY_TOKEN_ID = 29871  # the lone "▁" piece


def vla_prompt(instruction: str) -> str:
    """The prompt OpenVLA was trained with (instruction lower-cased, as upstream)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


def vla_prompt_with_space(instruction: str) -> str:
    """The prompt as upstream's PurePromptBuilder emits it for training (trailing space included)."""
    return vla_prompt(instruction) + " "


def ensure_trailing_empty_token(ids: Sequence[int], empty_token_id: int = LLAMA2_EMPTY_TOKEN_ID) -> list[int]:
    """Append the lone "▁" token unless the ids already end with it (upstream's predict_action rule)."""
    ids = list(ids)
    if not ids or ids[-1] != empty_token_id:
        ids.append(empty_token_id)
    return ids
