"""Tokenizer: text <-> token ids through a Hugging Face tokenizer.json, and streaming decode.

    tok = Tokenizer.from_file(ckpt.tokenizer_path)
    ids = tok.encode("Hello")            # [bos, ...]
    dec = IncrementalDecoder(tok)
    for t in ids[1:]: print(dec.feed(t), end="")
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers

# Replacement character: what a byte-level decode yields for an incomplete UTF-8 sequence.
_INCOMPLETE = "\ufffd"


def tokenizer_file(model_dir: str | Path) -> Path | None:
    """The model directory's tokenizer.json, or None when it has none."""
    path = Path(model_dir) / "tokenizer.json"
    return path if path.is_file() else None


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None = None, eos_id: int | None = None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json; bos/eos come from tokenizer_config.json or special_tokens_map.json beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        special = _special_tokens(path.parent)
        return cls(tok, _token_id(tok, special.get("bos_token"), path), _token_id(tok, special.get("eos_token"), path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The tokenizer.json post-processor is bypassed: some add bos themselves (Llama 3), which
        # would double it; bos is ours to add.
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class IncrementalDecoder:
    """Decode a token stream piece by piece, never splitting a UTF-8 character.

    Each feed decodes a short window (the tokens since the last emitted text, plus the ones before
    them for context, so that tokenizers that drop a leading space at the start of a decode still
    give the right text) and emits what the newest token added once it is complete; while a
    multi-byte character is still partial, feed returns "".
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens already emitted
        self._read = 0  # tokens before this are emitted
        self._text = ""

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self._text += new
        return new

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


def _special_tokens(folder: Path) -> dict:
    """bos_token / eos_token as tokenizer_config.json (first) or special_tokens_map.json state them."""
    found: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))
            found.update({k: data[k] for k in ("bos_token", "eos_token") if data.get(k) is not None})
    return found


def _token_id(tok: tokenizers.Tokenizer, token, source: Path) -> int | None:
    if token is None:
        return None
    content = token["content"] if isinstance(token, dict) else token  # AddedToken dicts carry "content"
    token_id = tok.token_to_id(content)
    if token_id is None:
        raise ValueError(f"{source.parent}: special token {content!r} named in the tokenizer config "
                         f"is not in {source.name}")
    return token_id
