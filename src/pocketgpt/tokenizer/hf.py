"""``HFTokenizer``: the same interface over Hugging Face ``tokenizers`` (Rust).

>>> tok = HFTokenizer(vocab_size=300); tok.train(["low lower lowest"] * 10)
>>> tok.decode(tok.encode("lowest"))
'lowest'
>>> HFTokenizer.from_file("gpt2/tokenizer.json").encode("hi")  # doctest: +SKIP
[5303]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers  # the third-party package; ours is pocketgpt.tokenizer (singular)

from pocketgpt.atomic import atomic_write_text

from . import hfjson
from .base import (
    DEFAULT_SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    check_special_tokens,
    read_json,
)
from .pretokenize import bytes_to_unicode, pattern_regex


class HFTokenizer(Tokenizer):
    """Byte-level BPE trained by ``tokenizers``, or any ``tokenizer.json`` via ``from_file``.

    Trained here, its pre-tokenization is the same as ``BPETokenizer``'s (our regex, then bytes),
    specials come first (ids 0..n-1), then the 256 bytes in ``tokenizers``' own order, then merges.
    Merge choice and tie-breaks are ``tokenizers``', so its vocab differs from ours. Rust strings
    cannot hold lone surrogates (``"\\ud800"``), so unlike ``BPETokenizer`` it rejects them.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        pattern: str | None = "gpt2",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        progress: bool = False,
        *,
        _tokenizer: tokenizers.Tokenizer | None = None,
    ) -> None:
        self.special_tokens = check_special_tokens(special_tokens)
        self.pattern = pattern
        self.target_vocab_size = vocab_size
        self.progress = progress
        if _tokenizer is None:
            if pattern is None:
                raise TokenizerError("HFTokenizer needs a pattern to train (gpt2 or gpt4)")
            try:
                regex_source = pattern_regex(pattern)
            except ValueError as e:
                raise TokenizerError(str(e)) from None
            minimum = len(self.special_tokens) + 256
            if not isinstance(vocab_size, int) or vocab_size < minimum:
                raise TokenizerError(
                    f"vocab_size={vocab_size!r} is too small: it counts the "
                    f"{len(self.special_tokens)} special tokens and the 256 byte tokens, so it "
                    f"must be at least {minimum}"
                )
            # Untrained: a plain byte tokenizer with our layout, so it already round-trips.
            id_to_bytes = [t.encode() for t in self.special_tokens]
            id_to_bytes += [bytes([b]) for b in range(256)]
            data = hfjson.tokenizer_json(self.special_tokens, regex_source, id_to_bytes, [])
            _tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
        self._set_tokenizer(_tokenizer)

    def _set_tokenizer(self, tok: tokenizers.Tokenizer) -> None:
        self._tok = tok
        # A second copy that treats special tokens' text as plain text (allow_special=False).
        self._tok_plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self._tok_plain.encode_special_tokens = True
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        lookup = {
            t: i
            for t in ("<unk>", "<pad>", "<bos>", "<eos>")
            if (i := tok.token_to_id(t)) is not None
        }
        self._set_special_ids(lookup)
        self._fingerprint: str | None = None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    # --- training ------------------------------------------------------------------------------
    def train(self, texts: Iterable[str], progress: bool | None = None) -> None:
        """Train a fresh byte-level BPE on ``texts`` with ``tokenizers``' BpeTrainer."""
        if self.pattern is None:
            raise TokenizerError("this HFTokenizer was loaded from a file; it cannot be retrained")
        show = self.progress if progress is None else progress
        regex_source = pattern_regex(self.pattern)
        blank = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": hfjson.pre_tokenizer_json(regex_source),
            "post_processor": None,
            "decoder": hfjson.decoder_json(),
            "model": {"type": "BPE", "vocab": {}, "merges": []},
        }
        tok = tokenizers.Tokenizer.from_str(json.dumps(blank))
        alphabet = sorted(bytes_to_unicode().values())
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=self.target_vocab_size,
            min_frequency=0,
            show_progress=show,
            special_tokens=list(self.special_tokens),
            initial_alphabet=alphabet,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        data = json.loads(tok.to_str())
        ids = {t: tok.token_to_id(t) for t in self.special_tokens}
        bos = ("<bos>", ids["<bos>"]) if "<bos>" in ids else None
        eos = ("<eos>", ids["<eos>"]) if "<eos>" in ids else None
        data["post_processor"] = hfjson.post_processor_json(bos, eos)
        self._set_tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)))

    # --- encoding ------------------------------------------------------------------------------
    def encode(
        self, text: str, add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[int]:
        tok = self._tok if allow_special else self._tok_plain
        ids = tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids) if add_special_tokens else ids

    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        tok = self._tok if allow_special else self._tok_plain
        out = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        return [self._wrap(ids) for ids in out] if add_special_tokens else out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int(): numpy or torch integers are not accepted by tokenizers as they are.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer.json atomically."""
        atomic_write_text(path, self._tok.to_str(pretty=True) + "\n")

    def save_hf(self, path: str | os.PathLike) -> None:
        self.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load any Hugging Face ``tokenizer.json``; special ids are found by their text
        (``bos_id`` is the id of ``"<bos>"``, None when absent)."""
        data = read_json(path)
        return cls.from_json_dict(data, where=str(path))

    @classmethod
    def from_json_dict(cls, data: Any, where: str = "<dict>") -> HFTokenizer:
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise TokenizerError(f"{where}: not a Hugging Face tokenizer.json (no 'model' object)")
        specials = [
            t["content"]
            for t in data.get("added_tokens") or []
            if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str)
        ]
        pattern = _known_pattern(data)
        try:
            tok = tokenizers.Tokenizer.from_str(json.dumps(data))
            # Inside the try: _set_tokenizer re-reads tok.to_str(), which a file that tokenizers
            # only half-accepts can fail (a merge naming a token the vocab no longer has).
            return cls(pattern=pattern, special_tokens=specials, _tokenizer=tok)
        except TokenizerError as e:  # e.g. duplicate special tokens
            raise TokenizerError(f"{where}: {e}") from None
        except Exception as e:  # tokenizers raises a bare Exception with the serde message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{where}: tokenizers cannot load this file: {msg}") from None


def _known_pattern(data: dict[str, Any]) -> str | None:
    """``"gpt2"``/``"gpt4"`` when the file's Split regex is one of ours, else None."""
    pre = data.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers") or [pre]:
        if isinstance(step, dict) and step.get("type") == "Split":
            source = (step.get("pattern") or {}).get("Regex")
            for name in ("gpt2", "gpt4"):
                if source == pattern_regex(name):
                    return name
    return None
