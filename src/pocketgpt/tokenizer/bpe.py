"""Our byte-level BPE: training, encoding, decoding, and the versioned JSON file format.

    >>> tok = BPETokenizer(vocab_size=256 + 3, special_tokens=())  # no specials: bytes are 0..255
    >>> tok.train(["aaabdaaabac"])
    >>> tok.merges          # (a, a) -> 256, (a, b) -> 257, (256, 257) -> 258
    [(97, 97), (97, 98), (256, 257)]
    >>> tok.encode("aaabdaaabac")
    [258, 100, 258, 97, 99]

Merge order: the most frequent pair first; a tie goes to the smallest pair of ids, compared as
(left id, right id). A merge whose bytes already have a token (reached by another path, e.g.
(ab, c) after (a, bc)) reuses that id instead of adding a duplicate, like Hugging Face's trainer;
so ``vocab_size`` counts distinct tokens and merges may outnumber new tokens. No token is learned
whose bytes spell a special token (``b"<eos>"``): in tokenizer.json they would share one key.

Encoding has two engines with identical ids. Both cut the text into pieces (``pretokenize``)
and keep a cache of each piece's ids. A piece not seen before is merged by the small compiled
core ``_bpe_core`` (C, built by ``pip install``; it also runs the loop over the pieces) when it
is there, else by ``_bpe_python``, the readable reference. ``BPETokenizer(native=False)`` (or
``tok.native = False``) selects the reference; ``NATIVE_AVAILABLE`` says whether the core was
built; tests/test_tokenizer_equivalence.py checks that the two give the same ids.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from typing import Any

from pocketgpt.atomic import atomic_write_text

from . import hfjson
from .base import (
    DEFAULT_SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    check_special_tokens,
    read_json,
)
from .pretokenize import pattern_regex, splitter

try:  # the optional compiled merge loop (setup.py); without it, the pure-Python reference runs
    from ._bpe_core import Merger
except ImportError:
    Merger = None
NATIVE_AVAILABLE = Merger is not None

FORMAT = "pocketgpt-bpe"
FORMAT_VERSION = 1
# The encode cache keeps at most this many pieces, and no piece longer than _CACHE_MAX_CHARS:
# natural text has a few tens of thousands of distinct pieces, so this holds them all.
_CACHE_MAX_ENTRIES = 1 << 18
_CACHE_MAX_CHARS = 256
# Pieces longer than this (in tokens) use the O(n log n) heap merge instead of the O(n^2) scan.
_LONG_PIECE = 64
_NO_RANK = 1 << 62  # "no merge for this pair": above any real rank


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained by us. Untrained, it is a plain byte tokenizer (no merges).

    ``BPETokenizer(vocab_size=8192, pattern="gpt2", special_tokens=("<unk>", "<pad>", "<bos>",
    "<eos>"))``: specials get ids 0..3, bytes 4..259, learned tokens 260.. up to vocab_size - 1.
    ``native=False`` encodes with the pure-Python reference even where the C core is built.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        pattern: str = "gpt2",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        progress: bool = False,
        native: bool = True,
    ) -> None:
        self.special_tokens = check_special_tokens(special_tokens)
        try:
            self.pattern_regex = pattern_regex(pattern)
        except ValueError as e:
            raise TokenizerError(str(e)) from None
        self.pattern = pattern
        self._n_special = len(self.special_tokens)
        minimum = self._n_special + 256
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise TokenizerError(
                f"vocab_size={vocab_size!r} is too small: it counts the {self._n_special} special "
                f"tokens and the 256 byte tokens, so it must be at least {minimum}"
            )
        self.target_vocab_size = vocab_size
        self.progress = progress
        self._pieces = splitter(pattern)  # text -> pre-tokens
        self._special_ids = {t: i for i, t in enumerate(self.special_tokens)}
        self._set_special_ids(self._special_ids)
        self._native = native and NATIVE_AVAILABLE
        self._set_merges([])

    # --- state ---------------------------------------------------------------------------------
    def _set_merges(self, merges: Sequence[tuple[int, int]], where: str = "merges") -> None:
        """Replay merges into the tables; raise TokenizerError (prefixed by ``where``) if invalid."""
        n = self._n_special
        id_to_bytes: list[bytes] = [t.encode("utf-8") for t in self.special_tokens]
        id_to_bytes += [bytes([b]) for b in range(256)]
        bytes_to_id = {b: i for i, b in enumerate(id_to_bytes) if i >= n}
        ranks: dict[tuple[int, int], tuple[int, int]] = {}
        banned = hfjson.special_spellings(self.special_tokens)
        for rank, pair in enumerate(merges):
            a, b = pair
            size = len(id_to_bytes)
            if not (n <= a < size and n <= b < size):
                raise TokenizerError(
                    f"{where}: merge #{rank} {[a, b]} uses an id that is a special token or not "
                    f"defined yet (valid ids here: {n}..{size - 1})"
                )
            if (a, b) in ranks:
                raise TokenizerError(f"{where}: merge #{rank} {[a, b]} is a duplicate")
            new_bytes = id_to_bytes[a] + id_to_bytes[b]
            if new_bytes in banned:
                raise TokenizerError(
                    f"{where}: merge #{rank} {[a, b]} makes {new_bytes!r}, reserved because it "
                    "is spelled like a special token in tokenizer.json"
                )
            new_id = bytes_to_id.get(new_bytes)
            if new_id is None:
                new_id = size
                id_to_bytes.append(new_bytes)
                bytes_to_id[new_bytes] = new_id
            ranks[(a, b)] = (rank, new_id)
        self.merges = [(a, b) for a, b in merges]
        self._id_to_bytes = id_to_bytes
        self._ranks = ranks
        self._rank_of = {p: r for p, (r, _) in ranks.items()}
        self._merge_ids = [new_id for _, new_id in ranks.values()]  # ranks is in rank order
        self.vocab_size = len(id_to_bytes)
        self._cache: dict[str, list[int]] = {}
        self._fingerprint: str | None = None
        self._build_merger()

    def _build_merger(self) -> None:
        """The C core's copy of the merge table (None: the pure-Python reference encodes)."""
        self._merger = None
        if self._native:
            table = [(a, b, new_id) for (a, b), (_, new_id) in self._ranks.items()]
            self._merger = Merger(self._n_special, table, _CACHE_MAX_CHARS, _CACHE_MAX_ENTRIES)

    @property
    def native(self) -> bool:
        """Whether encode uses the compiled core; setting it to False selects the reference."""
        return self._merger is not None

    @native.setter
    def native(self, value: bool) -> None:
        if value and not NATIVE_AVAILABLE:
            raise TokenizerError(
                "native=True: the compiled BPE core (pocketgpt.tokenizer._bpe_core) is not "
                "built here; reinstall with a C compiler (pip install -e .) or use native=False"
            )
        self._native = bool(value)
        self._build_merger()
        self._cache.clear()  # ids are the same either way; a benchmark wants a cold start

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Neither the C object nor the splitter (a closure) pickles; __setstate__ rebuilds both.
        state["_merger"] = state["_pieces"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pieces = splitter(self.pattern)
        self._native = self._native and NATIVE_AVAILABLE
        self._build_merger()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            blob = json.dumps(
                {
                    "format": FORMAT,
                    "regex": self.pattern_regex,
                    "special_tokens": list(self.special_tokens),
                    "merges": self.merges,
                },
                separators=(",", ":"),
            )
            self._fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return self._fingerprint

    def token_bytes(self, token_id: int) -> bytes:
        """``token_bytes(4 + 97) -> b"a"`` (with the 4 default specials); a special's UTF-8 text."""
        return self._id_to_bytes[token_id]

    # --- training ------------------------------------------------------------------------------
    def train(self, texts: Iterable[str], progress: bool | None = None) -> None:
        """Learn merges from ``texts`` until ``vocab_size`` tokens exist (or no pair is left).

        Counts each distinct pre-token once with its frequency, then keeps pair counts up to
        date incrementally: a merge only revisits the words that contain its pair.
        """
        from tqdm.auto import tqdm  # here, not at the top: loading to encode skips its import

        show = self.progress if progress is None else progress
        piece_counts = Counter(chain.from_iterable(map(self._pieces, texts)))
        n = self._n_special
        words: list[list[int]] = []
        freqs: list[int] = []
        for piece, count in piece_counts.items():
            raw = piece.encode("utf-8", "surrogatepass")
            if len(raw) > 1:  # a one-byte word has no pair to merge
                words.append([n + b for b in raw])
                freqs.append(count)
        del piece_counts

        pair_counts: dict[tuple[int, int], int] = {}
        where: dict[tuple[int, int], set[int]] = {}
        for wi, w in enumerate(words):
            f = freqs[wi]
            for p in zip(w, w[1:], strict=False):
                pair_counts[p] = pair_counts.get(p, 0) + f
                s = where.get(p)
                if s is None:
                    where[p] = {wi}
                else:
                    s.add(wi)
        # Max-heap on count, then min on pair: entries are (-count, pair). An entry is stale when
        # its count no longer equals pair_counts[pair]; stale entries are skipped when popped.
        heap = [(-c, p) for p, c in pair_counts.items()]
        heapq.heapify(heap)

        id_to_bytes: list[bytes] = [t.encode("utf-8") for t in self.special_tokens]
        id_to_bytes += [bytes([b]) for b in range(256)]
        bytes_to_id = {b: i for i, b in enumerate(id_to_bytes) if i >= n}
        merges: list[tuple[int, int]] = []
        banned = hfjson.special_spellings(self.special_tokens)
        banned_pairs: set[tuple[int, int]] = set()
        target = self.target_vocab_size
        bar = tqdm(
            total=target - len(id_to_bytes), desc="BPE merges", disable=not show, leave=False
        )
        heappop, heappush = heapq.heappop, heapq.heappush
        while len(id_to_bytes) < target and heap:
            negc, pair = heappop(heap)
            if pair_counts.get(pair) != -negc:
                continue  # stale
            if pair in banned_pairs:
                continue
            a, b = pair
            new_bytes = id_to_bytes[a] + id_to_bytes[b]
            if new_bytes in banned:
                banned_pairs.add(pair)  # never learn a token spelled like a special token
                continue
            new = bytes_to_id.get(new_bytes)
            if new is None:
                new = len(id_to_bytes)
                id_to_bytes.append(new_bytes)
                bytes_to_id[new_bytes] = new
                bar.update(1)
            merges.append(pair)

            changed: set[tuple[int, int]] = set()
            for wi in where.pop(pair):
                w = words[wi]
                f = freqs[wi]
                # Rewrite the word, and update only the pairs that touch a merge: the old
                # neighbours (x, a) and (b, y) go; (x, new) and (new, y) come.
                nw: list[int] = []
                merged_at: list[int] = []  # positions of the new token in nw
                i, last, prev_end = 0, len(w) - 1, -2
                while i <= last:
                    if i < last and w[i] == a and w[i + 1] == b:
                        if i > 0 and prev_end != i - 1:  # (x, a), unless x was just merged
                            p = (w[i - 1], a)
                            pair_counts[p] -= f
                            changed.add(p)
                        if i + 2 <= last:  # (b, y); a following merge will not count it again
                            p = (b, w[i + 2])
                            pair_counts[p] -= f
                            changed.add(p)
                        merged_at.append(len(nw))
                        nw.append(new)
                        prev_end = i + 1
                        i += 2
                    else:
                        nw.append(w[i])
                        i += 1
                if not merged_at:
                    continue  # the word lost this pair to an earlier merge
                words[wi] = nw
                last_new = len(nw) - 1
                for k, j in enumerate(merged_at):
                    added = []
                    if j > 0:
                        added.append((nw[j - 1], new))
                    # (new, y), unless y is merged too: then it adds (new, new) as its left pair.
                    if j < last_new and not (k + 1 < len(merged_at) and merged_at[k + 1] == j + 1):
                        added.append((new, nw[j + 1]))
                    for p in added:
                        pair_counts[p] = pair_counts.get(p, 0) + f
                        changed.add(p)
                        s = where.get(p)
                        if s is None:
                            where[p] = {wi}
                        else:
                            s.add(wi)
            pair_counts.pop(pair, None)
            changed.discard(pair)
            for p in changed:
                c = pair_counts[p]
                if c > 0:
                    heappush(heap, (-c, p))
                else:
                    del pair_counts[p]
                    where.pop(p, None)
        bar.close()
        self._set_merges(merges)

    # --- encoding ------------------------------------------------------------------------------
    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-token: apply merges lowest rank first (``"aaab" -> [258]`` above)."""
        if self._merger is not None:
            ids = self._merger.merge(piece)
            if ids is not None:  # None: a piece too long for the core's scan
                return ids
        return self._bpe_python(piece)

    def _bpe_python(self, piece: str) -> list[int]:
        """The readable reference of ``_bpe`` (the C core runs the same loop)."""
        n = self._n_special
        ids = [n + b for b in piece.encode("utf-8", "surrogatepass")]
        if len(ids) > _LONG_PIECE:
            return self._bpe_long(ids)
        rank_get = self._rank_of.get
        merges, merge_ids = self.merges, self._merge_ids
        while len(ids) > 1:
            # The lowest-ranked adjacent pair, found at C speed (map/zip/min, no Python lambda).
            r = min(map(rank_get, zip(ids, ids[1:]), repeat(_NO_RANK)))
            if r == _NO_RANK:
                break
            a, b = merges[r]
            new = merge_ids[r]
            out: list[int] = []
            i, last = 0, len(ids) - 1
            while i <= last:
                if i < last and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _bpe_long(self, ids: list[int]) -> list[int]:
        """Same result as the scan in ``_bpe`` in O(n log n): a linked list and a heap of
        (rank, position) candidates, checked for staleness when popped."""
        ranks = self._ranks
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            r = ranks.get((ids[i], ids[i + 1]))
            if r is not None:
                heap.append((r[0], i, ids[i], ids[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or ids[i] != a or ids[j] != b:
                continue  # stale: a neighbour was merged away since this was pushed
            ids[i] = ranks[(a, b)][1]
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            p = prv[i]
            if p >= 0:
                r = ranks.get((ids[p], ids[i]))
                if r is not None:
                    heapq.heappush(heap, (r[0], p, ids[p], ids[i]))
            if k < n:
                r = ranks.get((ids[i], ids[k]))
                if r is not None:
                    heapq.heappush(heap, (r[0], i, ids[i], ids[k]))
        return [ids[i] for i in range(n) if alive[i]]

    def clear_cache(self) -> None:
        """Forget the per-piece encode cache (benchmarks use it to measure a cold start)."""
        self._cache.clear()

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text that holds no special tokens (any special's text is plain bytes here).

        The C core runs this same loop (``Merger.encode``, with the same cache); long pieces
        come back to ``_bpe_python``."""
        if self._merger is not None:
            return self._merger.encode(self._pieces(text), self._cache, self._bpe_python)
        cache = self._cache
        out: list[int] = []
        for piece in self._pieces(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(piece) <= _CACHE_MAX_CHARS:
                    if len(cache) >= _CACHE_MAX_ENTRIES:
                        cache.clear()  # bounded memory on adversarial input; refills fast
                    cache[piece] = ids
            out += ids
        return out

    def encode(
        self, text: str, add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[int]:
        """``encode("aaab")`` -> ids; see ``Tokenizer.encode`` for the two flags."""
        if allow_special and self.special_tokens and any(s in text for s in self.special_tokens):
            ids: list[int] = []
            for i, part in enumerate(self._special_split(text)):
                if i % 2:
                    ids.append(self._special_ids[part])
                elif part:
                    ids += self._encode_ordinary(part)
        else:
            ids = self._encode_ordinary(text)
        return self._wrap(ids) if add_special_tokens else ids

    def _special_split(self, text: str) -> list[str]:
        """``"a<eos>b" -> ["a", "<eos>", "b"]``: odd positions are special tokens."""
        import regex

        alternatives = sorted(self.special_tokens, key=len, reverse=True)  # longest match first
        return regex.split("(" + "|".join(regex.escape(s) for s in alternatives) + ")", text)

    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        if allow_special or add_special_tokens:
            return super().encode_batch(texts, add_special_tokens, allow_special)
        enc = self._encode_ordinary
        return [enc(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """``decode([258, 100]) -> "aaabd"`` (with the merges above). Unknown ids raise."""
        table = self._id_to_bytes
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError  # a negative index would silently pick a token from the end
            if skip_special_tokens:
                n = self._n_special
                raw = b"".join([table[i] for i in ids if i >= n])
            else:
                raw = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            raise ValueError(f"decode: ids must be ints in 0..{self.vocab_size - 1}") from None
        try:
            # surrogatepass: a lone surrogate that encode() let through comes back unchanged.
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")

    # --- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "regex": self.pattern_regex,
            "special_tokens": list(self.special_tokens),
            "vocab_size": self.vocab_size,
            "target_vocab_size": self.target_vocab_size,
            "fingerprint": self.fingerprint,
            "merges": [[a, b] for a, b in self.merges],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write our JSON format atomically, one merge per line (diffable, still small)."""
        d = self.to_dict()
        merges = d.pop("merges")
        head = json.dumps(d, indent=1, ensure_ascii=False)[:-2]  # drop the closing "\n}"
        body = ",\n".join(f"  [{a}, {b}]" for a, b in merges)
        text = head + ',\n "merges": [\n' + body + ("\n" if body else "") + " ]\n}\n"
        atomic_write_text(path, text)

    def save_hf(self, path: str | os.PathLike) -> None:
        """Write an equivalent Hugging Face tokenizer.json (same ids; see ``hfjson``)."""
        data = hfjson.tokenizer_json(
            self.special_tokens, self.pattern_regex, self._id_to_bytes, self.merges
        )
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a file written by ``save``; any problem is a one-line ``TokenizerError``."""
        return cls.from_dict(read_json(path), where=str(path))

    @classmethod
    def from_dict(cls, d: Any, where: str = "<dict>") -> BPETokenizer:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            kind = "a Hugging Face tokenizer.json" if isinstance(d, dict) and "model" in d else None
            raise TokenizerError(
                f"{where}: not a pocketgpt BPE tokenizer file"
                + (f" (it is {kind}; use load_tokenizer or HFTokenizer.from_file)" if kind else "")
            )
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise TokenizerError(
                f"{where}: unsupported {FORMAT} version {version!r} (this pocketgpt reads "
                f"version {FORMAT_VERSION})"
            )
        missing = [k for k in ("pattern", "special_tokens", "merges", "vocab_size") if k not in d]
        if missing:
            raise TokenizerError(f"{where}: missing field(s) {', '.join(missing)}")
        pattern, specials, merges = d["pattern"], d["special_tokens"], d["merges"]
        if not isinstance(specials, list):
            raise TokenizerError(f"{where}: special_tokens must be a list of strings")
        if not isinstance(merges, list) or not all(
            isinstance(m, list)
            and len(m) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in m)
            for m in merges
        ):
            raise TokenizerError(f"{where}: merges must be a list of [int, int] pairs")
        target = d.get("target_vocab_size")
        try:
            tok = cls(
                vocab_size=max(target if isinstance(target, int) else 0, len(specials) + 256),
                pattern=pattern,
                special_tokens=specials,
            )
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from None
        if "regex" in d and d["regex"] != tok.pattern_regex:
            raise TokenizerError(
                f"{where}: the stored regex differs from pocketgpt's {pattern!r} pattern"
            )
        tok._set_merges([(a, b) for a, b in merges], where=where)
        if d["vocab_size"] != tok.vocab_size:
            raise TokenizerError(
                f"{where}: inconsistent file: vocab_size is {d['vocab_size']!r} but the merges "
                f"give {tok.vocab_size}"
            )
        if "fingerprint" in d and d["fingerprint"] != tok.fingerprint:
            raise TokenizerError(f"{where}: fingerprint mismatch (file edited or corrupt)")
        return tok
