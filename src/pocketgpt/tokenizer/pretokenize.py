"""Pre-tokenization: the regexes that cut text into pieces before BPE, and GPT-2's byte<->char map.

BPE never merges across a piece boundary, so "dog." can become ["dog", "."] but never "g.".
``splitter(name)`` is the fast way to cut: Python's own ``re`` on ASCII text, ``regex`` otherwise.

    >>> split_pieces("Hello world!!", "gpt2")
    ['Hello', ' world', '!!']
"""

from __future__ import annotations

import re
from collections.abc import Callable

import regex

# GPT-2's split pattern (Radford et al. 2019): contractions, letters, numbers, other symbols, each
# optionally led by one space, then whitespace runs that leave their last space to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's (tiktoken cl100k_base): case-insensitive contractions, numbers in groups of at most three
# digits, and newlines kept apart from other whitespace. Possessive quantifiers (?+ ++) stop
# backtracking, which both regex engines (Python `regex` and Oniguruma in `tokenizers`) support.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same patterns for pure-ASCII text, in Python's own `re` (about twice as fast as `regex`,
# which is most of a cold encode's time). On ASCII, \p{L} is exactly [A-Za-z], \p{N} is [0-9],
# and `regex`'s \s is exactly re.ASCII's [\t\n\v\f\r ]; case-insensitive matching of ASCII
# letters agrees too. tests/test_tokenizer.py checks each twin against its pattern on ASCII text.
ASCII_TWINS: dict[str, str] = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""",
    "gpt4": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]++[\r\n]*"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
    ),
}


def pattern_regex(name: str) -> str:
    """The regex source for a pattern name: ``pattern_regex("gpt2") -> "'s|'t|..."``."""
    try:
        return PATTERNS[name]
    except KeyError:
        raise ValueError(
            f"unknown pre-tokenization pattern {name!r}; expected one of {sorted(PATTERNS)}"
        ) from None


def compiled(name: str) -> regex.Pattern[str]:
    """The compiled regex for a pattern name (`regex` keeps its own cache of compiled patterns)."""
    return regex.compile(pattern_regex(name))


def splitter(name: str) -> Callable[[str], list[str]]:
    """``splitter("gpt2")("a  b") -> ['a', ' ', ' b']``: the pieces ``compiled(name)`` finds,
    found by the ASCII twin when the text is ASCII (``str.isascii`` is O(1): a flag of the str)."""
    unicode_findall = compiled(name).findall
    ascii_findall = re.compile(ASCII_TWINS[name], re.ASCII).findall

    def pieces(text: str) -> list[str]:
        return ascii_findall(text) if text.isascii() else unicode_findall(text)

    return pieces


def split_pieces(text: str, name: str = "gpt2") -> list[str]:
    """Cut ``text`` into pre-tokens: ``split_pieces("a  b", "gpt2") -> ['a', ' ', ' b']``."""
    return compiled(name).findall(text)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to
    U+0100 upwards, in byte order. So ``bytes_to_unicode()[ord(" ")] -> "Ġ"``. Hugging Face's
    ByteLevel pre-tokenizer uses this same map, which is why an exported vocab uses it too.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
