"""Byte-level BPE tokenizers: ours (``BPETokenizer``) and Hugging Face's (``HFTokenizer``).

    >>> from pocketgpt.tokenizer import BPETokenizer
    >>> tok = BPETokenizer(vocab_size=300)
    >>> tok.train(["hello world"] * 3)
    >>> tok.decode(tok.encode("hello", add_special_tokens=True))
    '<bos>hello<eos>'

Ids: special tokens first in the configured order (``<unk>``=0, ``<pad>``=1, ``<bos>``=2,
``<eos>``=3 by default), then the 256 bytes, then learned tokens. Every string encodes without
``<unk>``, and ``decode(encode(s)) == s``.
"""

from .base import DEFAULT_SPECIAL_TOKENS, Tokenizer, TokenizerError
from .bpe import FORMAT, FORMAT_VERSION, BPETokenizer
from .factory import build_tokenizer, cache_key, load_tokenizer
from .hf import HFTokenizer
from .pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "FORMAT",
    "FORMAT_VERSION",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "BPETokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "cache_key",
    "load_tokenizer",
]
