"""Text tokenizer: a Hugging Face `tokenizer.json` read with the `tokenizers` library (no hub).

As the original (docs/architecture.md#tokenizer): the vocabulary is padded with filler tokens `|<EXTRA_TOKENS_i>|` up to
the model's `vocab_size`, then the five Molmo tokens follow at `vocab_size + 0..4`. BOS is the
tokenizer's BOS if it has one, else its EOS (Qwen2 and OLMo tokenizers have no BOS). Text is
encoded without special tokens, one message at a time.

The fillers and image tokens are not added to the `tokenizers` object (adding ~150k added tokens
is slow and makes every encode scan for them); instead `encode` splits the text at the five Molmo
token strings and the filler names itself, which gives the same ids (the `tokenizers` library
also encodes the pieces between added tokens independently).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import tokenizers

MOLMO_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
IMAGE_PROMPT = "<|image|>"
FILLER = "|<EXTRA_TOKENS_{}>|"
_FILLER_RE = r"\|<EXTRA_TOKENS_(\d+)>\|"


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used (missing file, no EOS, too large a vocabulary)."""


def _special_token(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer_file(path: str) -> tuple[tokenizers.Tokenizer, str, str]:
    """(the `tokenizers` object, its tokenizer.json, the folder holding it) of a folder or a tokenizer.json."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TokenizerError(f"no tokenizer.json at {file!r}")
    try:
        return tokenizers.Tokenizer.from_file(file), file, folder
    except Exception as e:  # tokenizers raises its own Exception type
        raise TokenizerError(f"{file}: cannot be loaded by the tokenizers library ({e})") from None


def read_special_names(folder: str) -> dict:
    """eos/bos/pad token strings from tokenizer_config.json and special_tokens_map.json, if present."""
    names = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: unreadable JSON ({e})") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            tok = _special_token(d.get(key))
            if tok and key not in names:
                names[key] = tok
    return names


class MolmoTokenizer:
    """Encode/decode with Molmo's padded vocabulary.

    Attributes: vocab_size (padded size, image tokens start here), base_size (the file's own
    vocabulary), eos_id, bos_id, and the image token ids im_start, im_end, im_patch, im_col, image.
    """

    def __init__(self, path: str, vocab_size: int):
        self._tok, file, folder = load_tokenizer_file(path)
        self.path = file
        self.base_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.base_size > vocab_size:
            raise TokenizerError(f"{file}: the tokenizer has {self.base_size} tokens, more than the "
                                 f"model's vocab_size {vocab_size}")
        self.vocab_size = int(vocab_size)
        names = read_special_names(folder)
        eos_name = names.get("eos_token")
        if eos_name is None and self._tok.token_to_id("<|endoftext|>") is not None:
            eos_name = "<|endoftext|>"
        self.eos_id = self._tok.token_to_id(eos_name) if eos_name else None
        if self.eos_id is None:
            raise TokenizerError(f"{folder}: cannot find the EOS token (looked for eos_token in "
                                 "special_tokens_map.json / tokenizer_config.json and <|endoftext|>)")
        bos_name = names.get("bos_token")
        bos = self._tok.token_to_id(bos_name) if bos_name else None
        self.bos_id = bos if bos is not None else self.eos_id
        (self.im_start, self.im_end, self.im_patch, self.im_col,
         self.image) = (self.vocab_size + k for k in range(len(MOLMO_TOKENS)))
        self._special = {name: self.vocab_size + k for k, name in enumerate(MOLMO_TOKENS)}
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in MOLMO_TOKENS) + "|" + _FILLER_RE + ")")

    def __len__(self):
        return self.vocab_size + len(MOLMO_TOKENS)

    def __repr__(self):
        return (f"MolmoTokenizer({self.path!r}, base_size={self.base_size}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id})")

    # -- encoding -------------------------------------------------------------------------------
    def _special_id(self, piece: str) -> int | None:
        if piece in self._special:
            return self._special[piece]
        m = re.fullmatch(_FILLER_RE, piece)
        if m:
            tid = self.base_size + int(m.group(1))
            return tid if tid < self.vocab_size else None
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added; Molmo token strings map to their ids."""
        out: list[int] = []
        pos = 0
        for m in self._split_re.finditer(text):
            tid = self._special_id(m.group(0))
            if tid is None:
                continue  # a filler name beyond the padding: plain text
            if m.start() > pos:
                out.extend(self._tok.encode(text[pos:m.start()], add_special_tokens=False).ids)
            out.append(tid)
            pos = m.end()
        if pos < len(text):
            out.extend(self._tok.encode(text[pos:], add_special_tokens=False).ids)
        return out

    # -- decoding -------------------------------------------------------------------------------
    def token_string(self, tid: int) -> str:
        if tid < self.base_size:
            return self._tok.id_to_token(tid)
        if tid < self.vocab_size:
            return FILLER.format(tid - self.base_size)
        k = tid - self.vocab_size
        if k < len(MOLMO_TOKENS):
            return MOLMO_TOKENS[k]
        raise ValueError(f"token id {tid} is outside the vocabulary of {len(self)} tokens")

    def decode(self, ids, skip_special_tokens: bool = True, truncate_at_eos: bool = True) -> str:
        """Text of generated ids: a leading BOS is dropped, decoding stops at the first EOS (docs/architecture.md#p12-eos-as-bos).
        With skip_special_tokens, filler and image tokens are left out."""
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if truncate_at_eos and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        pieces: list[str] = []
        run: list[int] = []
        for t in ids:
            if 0 <= t < self.base_size:
                run.append(t)
                continue
            if t < 0:
                continue  # padding
            if run:
                pieces.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if not skip_special_tokens:
                pieces.append(self.token_string(t))
        if run:
            pieces.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(pieces)
