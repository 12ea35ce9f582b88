"""Tokenizers behind one small interface: a local HF tokenizer dir (the Llama-2 tokenizer shipped with
openvla-7b), or a tiny character tokenizer built in code for tests and the demo (no downloads).

Either way the action tokens are the last 256 ids below ``vocab_size`` (see ``ovla_jax.actions``).
"""
from __future__ import annotations

import os
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
    """A local HF tokenizer dir (the openvla-7b download carries one). ``tokenizer.json`` is read with the
    ``tokenizers`` library, the engine of transformers' fast tokenizers: no PyTorch (0.6 GB of memory a
    7B run on one machine cannot spare), no remote-code prompt. Llama tokenizers get BOS / EOS as
    ``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` say, which is what
    ``LlamaTokenizerFast`` did on loading in the transformers 4.x that OpenVLA was trained with (4.40;
    transformers 5 rebuilds Llama tokenizers its own way). A dir with only a slow (sentencepiece)
    tokenizer goes through transformers.

    ``empty_token_id``: the lone "▁" token the OpenVLA prompt ends with (29871 for Llama-2), looked up
    in this tokenizer; None when it has none (then nothing is appended)."""

    def __init__(self, path: str, vocab_size: Optional[int] = None, empty_token_id: Optional[int] = -1):
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        config.update({k: v for k, v in _read_json(os.path.join(path, "special_tokens_map.json")).items()
                       if k not in config or config[k] is None})
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            self._from_json(path, config)
        else:
            self._from_transformers(path)
        self.vocab_size = vocab_size or self._base_vocab
        if self.pad_id is None:
            self.pad_id = self.vocab_size
        self.empty_token_id = self._id("\u2581") if empty_token_id == -1 else empty_token_id

    def _from_json(self, path: str, config: dict) -> None:
        from tokenizers import Tokenizer, processors

        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        bos, eos, pad = (_token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        if "Llama" in str(config.get("tokenizer_class", "")):
            add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
            single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
            pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
            special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
        self._tok, self._id = tok, tok.token_to_id
        self._base_vocab = tok.get_vocab_size(with_added_tokens=False)
        self.bos_id, self.eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
        self.pad_id = tok.token_to_id(pad) if pad else None
        self._encode = lambda text: tok.encode(text, add_special_tokens=True).ids

    def _from_transformers(self, path: str) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        self._base_vocab = tok.vocab_size
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self._id = lambda t: tok.convert_tokens_to_ids(t) if t in tok.get_vocab() else None
        self._encode = lambda text: list(tok(text, add_special_tokens=True)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))


def write_llama_style_tokenizer(path: str, texts: Sequence[str], vocab_size: int = 512) -> None:
    """A small tokenizer dir shaped like Llama-2's (BPE over "▁"-joined words, "▁" prepended, <unk> <s>
    </s> as ids 0-2, BOS added by tokenizer_config.json), trained on ``texts``: for tests, benches and
    models trained from scratch, where the real one cannot be downloaded. Loads with :class:`HFTokenizer`
    and with transformers' ``AutoTokenizer`` alike."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048, "legacy": True}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _read_json(path: str) -> dict:
    import json

    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(token) -> Optional[str]:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def make_tokenizer(spec: str, vocab_size: int, n_action_bins: int = 256) -> Tokenizer:
    """``char`` / ``words`` (the built-in tiny tokenizers over a model's ``vocab_size``) or a local HF
    tokenizer dir (what a training config's ``tokenizer`` and a checkpoint record)."""
    if spec in ("char", "words"):
        cls = CharTokenizer if spec == "char" else WordTokenizer
        return cls(vocab_size=vocab_size, n_action_bins=n_action_bins)
    if not os.path.isdir(spec):
        raise ValueError(f"{spec!r} is neither 'char', 'words' nor a tokenizer directory")
    return HFTokenizer(spec, vocab_size=vocab_size)
