"""The interface both tokenizers share, the error type, and small file helpers.

Id layout (ours, and our exported tokenizer.json): the special tokens first, in the configured
order (by default ``<unk>``=0, ``<pad>``=1, ``<bos>``=2, ``<eos>``=3), then the 256 byte tokens,
then one id per merge in the order the merges were learned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pocketgpt.errors import TokenizerError

DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<pad>", "<bos>", "<eos>")


class Tokenizer:
    """Text <-> token ids. Subclasses: ``BPETokenizer`` (ours) and ``HFTokenizer`` (HF tokenizers).

    >>> tok = BPETokenizer(vocab_size=300); tok.train(["aaabdaaabac"])  # doctest: +SKIP
    >>> tok.decode(tok.encode("aaab"))  # doctest: +SKIP
    'aaab'
    """

    vocab_size: int
    special_tokens: tuple[str, ...]
    unk_id: int | None = None
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None

    # --- to implement -------------------------------------------------------------------------
    def train(self, texts: Iterable[str]) -> None:
        raise NotImplementedError

    def encode(
        self, text: str, add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[int]:
        """``encode("hi") -> [ids]``; ``add_special_tokens=True`` -> ``[bos, *ids, eos]``.

        A special token's text inside ``text`` (say ``"<eos>"``) is ordinary text unless
        ``allow_special=True``, which turns it into that special id.
        """
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """``decode(encode(s)) == s`` for any ``s``; invalid UTF-8 becomes U+FFFD."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    def save_hf(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face ``tokenizer.json`` that gives the same ids."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Hex sha256 of everything that decides the ids; equal tokenizers, equal fingerprints."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """``encode_batch(["a", "b"]) -> [encode("a"), encode("b")]``."""
        return [self.encode(t, add_special_tokens, allow_special) for t in texts]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a file this class saved; ``pocketgpt.tokenizer.load_tokenizer`` loads any kind."""
        raise NotImplementedError

    def _set_special_ids(self, lookup: dict[str, int]) -> None:
        self.unk_id = lookup.get("<unk>")
        self.pad_id = lookup.get("<pad>")
        self.bos_id = lookup.get("<bos>")
        self.eos_id = lookup.get("<eos>")

    def _wrap(self, ids: list[int]) -> list[int]:
        """Add ``<bos>``/``<eos>`` around ids, each only when the tokenizer has it."""
        if self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


def check_special_tokens(special_tokens: Sequence[str]) -> tuple[str, ...]:
    """Validate and freeze the special tokens: non-empty, distinct strings."""
    specials = tuple(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise TokenizerError(f"special tokens must be non-empty strings, got {s!r}")
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"special tokens must be distinct, got {list(specials)}")
    return specials


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; any failure is a one-line ``TokenizerError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such tokenizer file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e})") from None
    if not text.strip():
        raise TokenizerError(f"{path}: tokenizer file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{path}: not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno} "
            f"column {e.colno}"
        ) from None
