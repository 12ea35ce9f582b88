"""Tokenizers behind one small interface: a local HF tokenizer dir (the Llama-2 tokenizer shipped with
openvla-7b), or a tiny character tokenizer built in code for tests and the demo (no downloads).

Either way the action tokens are the last 256 ids below ``vocab_size`` (see ``ovla_jax.actions``).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int  # ids in [0, vocab_size); action tokens are the last n_action_bins of them
    bos_id: int
    eos_id: int
    pad_id: int
    empty_token_id: Optional[int]  # the lone "▁" appended after "Out:" (29871 for Llama-2); None = none

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with BOS prepended, no EOS."""


class CharTokenizer:
    """Lower-cased characters -> ids below ``vocab_size - n_action_bins``; specials 0 unk, 1 BOS, 2 EOS.

    The pad token is ``vocab_size`` (one past the vocabulary, as OpenVLA's 32000 for a 32000 vocab).
    """

    CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'\"-_/()\n"

    def __init__(self, vocab_size: int = 320, n_action_bins: int = 256):
        if 3 + len(self.CHARS) > vocab_size - n_action_bins:
            raise ValueError(f"vocab_size {vocab_size} leaves no room for {len(self.CHARS)} characters "
                             f"below the {n_action_bins} action tokens")
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, 1, 2, vocab_size
        self._ids = {c: i + 3 for i, c in enumerate(self.CHARS)}
        self.empty_token_id = self._ids[" "]

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [self._ids.get(c, 0) for c in text.lower()]

    def decode(self, ids: Sequence[int]) -> str:
        chars = {i: c for c, i in self._ids.items()}
        return "".join(chars.get(i, "") for i in ids)


class HFTokenizer:
    """A tokenizer dir readable by ``transformers.AutoTokenizer`` (local files only)."""

    def __init__(self, path: str, vocab_size: Optional[int] = None, empty_token_id: Optional[int] = 29871):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = vocab_size or self._tok.vocab_size
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.vocab_size
        self.empty_token_id = empty_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])
