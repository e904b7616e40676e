"""Load any tokenizer file, and build (train or reuse from cache) the configured tokenizer.

>>> tok, path = build_tokenizer(cfg, train_text, ".cache")  # doctest: +SKIP
>>> str(path)  # doctest: +SKIP
'.cache/tokenizers/<sha256 key>/tokenizer.json'

A second call with the same text and settings loads that file instead of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pocketgpt.config import TokenizerConfig, TokenizerKind

from .base import Tokenizer, TokenizerError, read_json
from .bpe import FORMAT, FORMAT_VERSION, BPETokenizer
from .hf import HFTokenizer

log = logging.getLogger(__name__)

# Bump when training changes its result for the same inputs, so stale caches are not reused.
TRAINER_VERSION = 1


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load our JSON format or a Hugging Face tokenizer.json, told apart by their content."""
    data = read_json(path)
    return tokenizer_from_json(data, str(path))


def tokenizer_from_json(data: Any, where: str) -> Tokenizer:
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return BPETokenizer.from_dict(data, where=where)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return HFTokenizer.from_json_dict(data, where=where)
    raise TokenizerError(
        f"{where}: not a tokenizer file (neither pocketgpt's {FORMAT!r} format nor a Hugging "
        "Face tokenizer.json)"
    )


def cache_key(cfg: TokenizerConfig, train_text: str) -> str:
    """sha256 of everything that decides the trained result: the text and the settings."""
    text_digest = hashlib.sha256(train_text.encode("utf-8", "surrogatepass")).hexdigest()
    blob = json.dumps(
        {
            "text": text_digest,
            "kind": cfg.kind,
            "vocab_size": cfg.vocab_size,
            "pattern": cfg.pattern,
            "special_tokens": list(cfg.special_tokens),
            "format_version": FORMAT_VERSION,
            "trainer_version": TRAINER_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def build_tokenizer(
    cfg: TokenizerConfig, train_text: str, cache_dir: str | os.PathLike, progress: bool = False
) -> tuple[Tokenizer, Path]:
    """The configured tokenizer and the path of its file (for the caller to log).

    ``kind=hf_file``: ``HFTokenizer.from_file(cfg.path)``. ``kind=bpe`` with ``cfg.path``: that
    saved file. Otherwise train on ``train_text`` (one training text per line) unless
    ``cache_dir/tokenizers/<key>/tokenizer.json`` exists already; a corrupt cache entry is
    retrained and overwritten.
    """
    try:
        kind = TokenizerKind(cfg.kind)
    except ValueError:
        allowed = ", ".join(TokenizerKind)
        raise TokenizerError(
            f"tokenizer.kind={cfg.kind!r} is unknown; expected one of {allowed}"
        ) from None
    if kind == TokenizerKind.hf_file:
        if not cfg.path:
            raise TokenizerError("tokenizer.kind=hf_file needs tokenizer.path (a tokenizer.json)")
        path = Path(cfg.path)
        return HFTokenizer.from_file(path), path
    if kind == TokenizerKind.bpe and cfg.path:
        path = Path(cfg.path)
        return BPETokenizer.load(path), path

    path = Path(cache_dir) / "tokenizers" / cache_key(cfg, train_text) / "tokenizer.json"
    cls = BPETokenizer if kind == TokenizerKind.bpe else HFTokenizer
    if path.exists():
        try:
            tok = cls.load(path)
            log.info("tokenizer: reusing %s", path)
            return tok, path
        except TokenizerError as e:
            log.warning("tokenizer: cached file unusable, retraining (%s)", e)
    tok = cls(
        vocab_size=cfg.vocab_size,
        pattern=cfg.pattern,
        special_tokens=list(cfg.special_tokens),
        progress=progress,
    )
    log.info("tokenizer: training %s, vocab_size=%d", kind, cfg.vocab_size)
    tok.train(train_text.splitlines(keepends=True))
    tok.save(path)
    if isinstance(tok, BPETokenizer):
        tok.save_hf(path.with_name("hf_tokenizer.json"))  # the same tokenizer, for HF tools
    return tok, path
