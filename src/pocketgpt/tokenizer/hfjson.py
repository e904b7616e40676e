"""Build a Hugging Face ``tokenizer.json`` (as a dict) for a byte-level BPE with our id layout.

The pipeline reproduces ours exactly:

* special tokens are ``added_tokens`` and model-vocab entries with their ids (0..n-1); training
  never learns a token spelled like a special (see ``special_spellings``), so no clash;
* pre-tokenizer = ``Split(our regex, Isolated)`` then ``ByteLevel(use_regex=False)``, so HF's own
  GPT-2 regex and its prefix space are off and the pieces are exactly ours;
* model = BPE with vocab in GPT-2's byte->char alphabet and merges as string pairs; HF applies the
  lowest-rank pair first, leftmost first, as we do;
* post-processor adds ``<bos> ... <eos>`` (each when it exists), like our ``add_special_tokens=True``
  (and the default of ``tokenizers``' and ``transformers``' ``encode``).

Known limit: both regex engines class characters by their own Unicode tables. Characters that
Python 3.11's ``unicodedata`` (Unicode 14) calls unassigned but newer tables call letters or
digits (about 17k code points, e.g. new CJK extensions) may be split differently, so ids can
differ on text containing them. Every assigned character (and all of WikiText-2) agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import TokenizerError
from .pretokenize import bytes_to_unicode


def special_spellings(special_tokens: Sequence[str]) -> set[bytes]:
    """Bytes whose byte-level spelling equals a special token's text: ``{b"<eos>", ...}``.

    A learned token with these bytes would share its tokenizer.json vocab key with the special.
    """
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(inverse[c] for c in t) for t in special_tokens if all(c in inverse for c in t)}


def _byte_level_str(token: bytes, table: dict[int, str]) -> str:
    """``b" hi" -> "Ġhi"``: bytes spelled in GPT-2's printable alphabet."""
    return "".join(table[b] for b in token)


def pre_tokenizer_json(regex_source: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": regex_source},
                "behavior": "Isolated",
                "invert": False,
            },
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            },
        ],
    }


def decoder_json() -> dict[str, Any]:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }


def post_processor_json(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> Any:
    """A template adding ``<bos>``/``<eos>``; None when the tokenizer has neither."""
    if bos is None and eos is None:
        return None

    def special(pair: tuple[str, int]) -> dict[str, Any]:
        return {"SpecialToken": {"id": pair[0], "type_id": 0}}

    def seq(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    def around(name: str, type_id: int) -> list[dict[str, Any]]:
        body = [seq(name, type_id)]
        if bos is not None:
            body.insert(0, special(bos))
        if eos is not None:
            body.append(special(eos))
        return body

    used = [p for p in (bos, eos) if p is not None]
    return {
        "type": "TemplateProcessing",
        "single": around("A", 0),
        "pair": around("A", 0) + around("B", 1),
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in used},
    }


def tokenizer_json(
    special_tokens: Sequence[str],
    regex_source: str,
    id_to_bytes: Sequence[bytes],
    merges: Sequence[tuple[int, int]],
) -> dict[str, Any]:
    """The whole tokenizer.json. ``id_to_bytes[i]`` is the token's bytes for non-special ids."""
    n_special = len(special_tokens)
    table = bytes_to_unicode()
    strs = [_byte_level_str(b, table) if i >= n_special else "" for i, b in enumerate(id_to_bytes)]
    # Specials are in the model vocab too: without that, tokenizers re-numbers added tokens.
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for i in range(n_special, len(id_to_bytes)):
        if strs[i] in vocab:
            raise TokenizerError(
                f"cannot export to tokenizer.json: token {i} ({id_to_bytes[i]!r}) is spelled "
                f"like {strs[i]!r}, which is also id {vocab[strs[i]]}"
            )
        vocab[strs[i]] = i
    ids = {t: i for i, t in enumerate(special_tokens)}
    bos = ("<bos>", ids["<bos>"]) if "<bos>" in ids else None
    eos = ("<eos>", ids["<eos>"]) if "<eos>" in ids else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(special_tokens)
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_json(regex_source),
        "post_processor": post_processor_json(bos, eos),
        "decoder": decoder_json(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[strs[a], strs[b]] for a, b in merges],
        },
    }
