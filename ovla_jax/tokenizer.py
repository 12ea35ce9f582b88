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


class WordTokenizer:
    """Lower-cased words and punctuation -> ids from a fixed built-in word list (the demo's language):
    one token per word, so a tiny model sees "red" as one symbol and prompts stay ~20 tokens long.

    Specials: 0 unk, 1 BOS, 2 EOS, 3 the "▁" empty token after "Out:"; pad = ``vocab_size``.
    """

    WORDS = tuple(
        "in out what action should the robot take to ? : . , ! a an and of on onto into in at from with "
        "pick up put place push move lift grasp grab open close the block cube plate bowl target left right "
        "red green blue yellow orange purple white black".split())

    def __init__(self, vocab_size: int = 320, n_action_bins: int = 256):
        words = list(dict.fromkeys(self.WORDS))
        if 4 + len(words) > vocab_size - n_action_bins:
            raise ValueError(f"vocab_size {vocab_size} leaves no room for {len(words)} words "
                             f"below the {n_action_bins} action tokens")
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, 1, 2, vocab_size
        self.empty_token_id = 3
        self._ids = {w: i + 4 for i, w in enumerate(words)}

    def encode(self, text: str) -> list[int]:
        import re

        return [self.bos_id] + [self._ids.get(w, 0) for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())]

    def decode(self, ids: Sequence[int]) -> str:
        words = {i: w for w, i in self._ids.items()}
        return " ".join(words[i] for i in ids if i in words)


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


def make_tokenizer(spec: str, vocab_size: int, n_action_bins: int = 256) -> Tokenizer:
    """``char`` / ``words`` (the built-in tiny tokenizers over a model's ``vocab_size``) or a local HF
    tokenizer dir (what a training config's ``tokenizer`` and a checkpoint record)."""
    import os

    if spec in ("char", "words"):
        cls = CharTokenizer if spec == "char" else WordTokenizer
        return cls(vocab_size=vocab_size, n_action_bins=n_action_bins)
    if not os.path.isdir(spec):
        raise ValueError(f"{spec!r} is neither 'char', 'words' nor a tokenizer directory")
    return HFTokenizer(spec, vocab_size=vocab_size)
