"""Property tests (hypothesis) and id-for-id equivalence: our tokenizer with its HF export, and
our compiled merge loop (the C core) with the pure-Python reference."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pocketgpt
from pocketgpt.tokenizer import BPETokenizer, HFTokenizer, TokenizerError
from pocketgpt.tokenizer import bpe as bpe_module
from pocketgpt.tokenizer.bpe import NATIVE_AVAILABLE

try:
    from pocketgpt.tokenizer import _bpe_core
except ImportError:  # built without a C compiler: the tests of the core skip
    _bpe_core = None

from .test_tokenizer import TRICKY

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = ROOT / "../shared/data/wikitext-2-raw"
EMBEDDED_DIR = Path(pocketgpt.__file__).parent / "corpus" / "wikitext2_mini"

TRAIN_TEXT = [
    "Hello world! It's 2024, isn't it? Numbers 1234567 and 3.5%.\n",
    "  Spaces,\ttabs\r\nand newlines\n\n; Ünïcödé façade — 東京 — مرحبا — 😀👍🏽\n",
    "aaaa bbbb aaaa <eos> <bos>x<unk>\n",
] * 30

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _wikitext_texts() -> list[tuple[str, str]]:
    """(name, text): raw WikiText-2 validation + test from shared/ when present, else the
    project's embedded mini corpus, which is built from exactly those two splits (so either
    covers the same text, and the test runs without shared/ too). Empty when neither is here."""
    shared = [WIKITEXT_DIR / n for n in ("wiki.valid.raw", "wiki.test.raw")]
    if all(p.is_file() for p in shared):
        return [(p.name, p.read_text(encoding="utf-8")) for p in shared]
    return [
        (p.name, gzip.open(p, "rt", encoding="utf-8").read())
        for p in sorted(EMBEDDED_DIR.glob("*.txt.gz"))
    ]


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def pair(request, tmp_path_factory):
    """(ours, the same tokenizer loaded by `tokenizers` from our export)."""
    ours = BPETokenizer(vocab_size=420, pattern=request.param)
    ours.train(TRAIN_TEXT)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    ours.save_hf(path)
    return ours, tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module", params=[BPETokenizer, HFTokenizer], ids=lambda c: c.__name__)
def any_tok(request):
    tok = request.param(vocab_size=400)
    tok.train(TRAIN_TEXT)
    return tok


@SETTINGS
@given(text=st.text())
def test_round_trip_any_unicode(any_tok, text):
    assert any_tok.decode(any_tok.encode(text)) == text
    assert any_tok.decode(any_tok.encode(text, allow_special=True)) == text


@SETTINGS
@given(text=st.text(alphabet="ab <eos>\n", max_size=40))
def test_specials_only_with_allow_special(any_tok, text):
    assert any_tok.eos_id not in any_tok.encode(text)
    assert (any_tok.eos_id in any_tok.encode(text, allow_special=True)) == ("<eos>" in text)


@SETTINGS
@given(text=st.text(st.characters(blacklist_categories=("Cs", "Cn"))))
def test_export_matches_on_any_assigned_unicode(pair, text):
    # Cn (unassigned in Python's Unicode tables) is left out: characters added in later Unicode
    # versions are letters to `regex` but not yet to tokenizers' Oniguruma, so they split apart.
    ours, hf = pair
    assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text, allow_special=True)


def test_long_piece_merge_equals_scan():
    """Every merge loop gives the simple scan's result: the O(n log n) heap for long pieces,
    the reference's scan, and the C core (None above its MAX_BYTES: the heap takes over)."""
    tok = BPETokenizer(vocab_size=330, special_tokens=())
    tok.train(["abababbbaaab aaaa abba " * 5, "aaaaaaaaaa", "bbbbbbbbbbbbbbbbbb"])
    import random

    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice("ab") for _ in range(rng.randint(2, 400)))
        expected = _scan(tok, list(s.encode()))
        assert tok._bpe_long(list(s.encode())) == expected
        assert tok._bpe_python(s) == expected
        assert tok._bpe(s) == expected
        if NATIVE_AVAILABLE:
            native = tok._merger.merge(s)
            assert native == (expected if len(s) <= _bpe_core.MAX_BYTES else None)


def _scan(tok: BPETokenizer, ids: list[int]) -> list[int]:
    """Reference: repeatedly merge the lowest-rank pair everywhere (minbpe's loop)."""
    while True:
        ranked = [(tok._ranks[p][0], p) for p in zip(ids, ids[1:]) if p in tok._ranks]
        if not ranked:
            return ids
        _, (a, b) = min(ranked)
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                out.append(tok._ranks[(a, b)][1])
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out


@pytest.fixture(scope="module")
def wikitext_pair(tmp_path_factory):
    texts = _wikitext_texts()
    if not texts:
        pytest.skip("no WikiText-2 text here (shared data or embedded corpus)")
    train = texts[0][1].splitlines(keepends=True)
    ours = BPETokenizer(vocab_size=2048)
    ours.train(train)
    path = tmp_path_factory.mktemp("wt") / "tokenizer.json"
    ours.save_hf(path)
    return ours, path, texts


def test_export_matches_on_all_wikitext(wikitext_pair):
    ours, path, texts = wikitext_pair
    hf = tokenizers.Tokenizer.from_file(str(path))
    wrapped = HFTokenizer.from_file(path)
    for name, text in texts:
        lines = text.splitlines(keepends=True)
        mine = ours.encode_batch(lines)
        theirs = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
        assert mine == theirs, name
        assert ours.decode([i for ids in mine for i in ids]) == text
    head = texts[0][1][:100_000]
    assert wrapped.encode(head) == ours.encode(head)


def test_export_matches_in_transformers(wikitext_pair):
    transformers = pytest.importorskip("transformers")
    ours, path, texts = wikitext_pair
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for name, text in texts[:2]:  # the shared valid + test files when present (time)
        lines = text.splitlines(keepends=True)
        assert fast(lines, add_special_tokens=False)["input_ids"] == ours.encode_batch(lines), name
    sample = lines[:50]
    # transformers' default adds the template's <bos> ... <eos>, like add_special_tokens=True.
    assert fast(sample)["input_ids"] == ours.encode_batch(sample, add_special_tokens=True)


# --- the C core against the pure-Python reference ------------------------------------------------
needs_core = pytest.mark.skipif(
    not NATIVE_AVAILABLE, reason="the C core is not built here (no C compiler at install)"
)

ENGINE_TRICKY = [
    *TRICKY,
    "\ud800",  # lone surrogates: both engines encode them with surrogatepass (3 bytes)
    "a\udfffb \udc80\ud800x",
    "x" * 255 + " " + "x" * 256 + " " + "x" * 257,  # around the core's MAX_BYTES
    "😀" * 64 + " " + "😀" * 65,  # 256 and 260 bytes in one piece each
    "\n" * 1000,
    " " * 5000 + "x",
    "1" * 300 + " 1234567 3.5%",
    "aaaa" * 100 + " <eos><eos> bbbb" * 20,
]


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def engines(request) -> tuple[BPETokenizer, BPETokenizer]:
    """(C core, reference): the same merges, one tokenizer per engine. The training text has
    long runs, so long pieces have merges to apply."""
    tok = BPETokenizer(vocab_size=520, pattern=request.param)
    tok.train([*TRAIN_TEXT, "x" * 300 + "\n", "😀" * 40 + "\n", " " * 64 + "1" * 64 + "\n"])
    reference = BPETokenizer.from_dict(tok.to_dict())
    reference.native = False
    return tok, reference


@needs_core
def test_each_engine_is_the_one_selected(engines):
    core, reference = engines
    assert core.native and core._merger is not None
    assert not reference.native and reference._merger is None
    assert BPETokenizer(native=False).native is False


@needs_core
@pytest.mark.parametrize("text", ENGINE_TRICKY)
def test_core_matches_reference_on_tricky(engines, text):
    core, reference = engines
    for flags in ({}, {"allow_special": True}, {"add_special_tokens": True}):
        ids = core.encode(text, **flags)
        assert ids == reference.encode(text, **flags), flags
    assert core.decode(core.encode(text)) == text


@needs_core
@SETTINGS
@given(text=st.text() | st.text(alphabet="x😀 \n1<eos>é", max_size=700))
def test_core_matches_reference_on_any_text(engines, text):
    core, reference = engines
    core.clear_cache()  # the core's merge loop runs on every piece, not its cached ids
    assert core.encode(text) == reference.encode(text)


@needs_core
def test_core_matches_reference_on_the_embedded_corpus():
    with gzip.open(EMBEDDED_DIR / "validation.txt.gz", "rt", encoding="utf-8") as f:
        train = f.read().splitlines()[:3000]
    with gzip.open(EMBEDDED_DIR / "test.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    core = BPETokenizer(vocab_size=1024)
    core.train(train)
    reference = BPETokenizer.from_dict(core.to_dict())
    reference.native = False
    sample = lines[:3000]
    assert core.encode_batch(sample) == reference.encode_batch(sample)


@needs_core
def test_core_merges_directly():
    merger = _bpe_core.Merger(0, [(97, 97, 256), (256, 97, 257), (98, 99, 258)], 256, 1 << 18)
    assert merger.merge("aaa") == [257]  # (a, a) first, then (aa, a)
    assert merger.merge("aaaa") == [256, 256]  # left to right, no overlap
    assert merger.merge("bcaab") == [258, 256, 98]
    assert merger.merge("") == []
    assert merger.merge("é") == [0xC3, 0xA9]
    assert merger.merge("a" * (_bpe_core.MAX_BYTES + 1)) is None  # Python's heap takes it
    with pytest.raises(TypeError):
        merger.merge(b"aa")
    with pytest.raises(ValueError, match="merge #0"):
        _bpe_core.Merger(0, [(-1, 97, 256)], 256, 1 << 18)


@needs_core
def test_core_encode_keeps_the_cache_rules():
    """Merger.encode: cached ids first; long pieces from the Python callback; only pieces of at
    most cache_max_chars cached; the cache emptied when full (here: 3 chars, 2 entries)."""
    merger = _bpe_core.Merger(0, [(97, 97, 256)], 3, 2)
    cache = {"b": [7]}  # a planted entry wins over the merge loop
    long_pieces = []

    def long_merge(piece):
        long_pieces.append(piece)
        return [-1]

    long = "a" * (_bpe_core.MAX_BYTES + 1)
    assert merger.encode(["aa", "b", "aaaa", long], cache, long_merge) == [256, 7, 256, 256, -1]
    assert long_pieces == [long]
    assert cache == {"b": [7], "aa": [256]}  # "aaaa" (4 chars) and the long piece not cached
    assert merger.encode(["c"], cache, long_merge) == [99]
    assert cache == {"c": [99]}  # it held 2 entries: emptied before adding "c"
    with pytest.raises(TypeError):
        merger.encode(("aa",), cache, long_merge)
    with pytest.raises(ZeroDivisionError):
        merger.encode([long], cache, lambda piece: 1 / 0)


@needs_core
def test_core_survives_pickle(engines):
    import pickle

    core, _ = engines
    copy = pickle.loads(pickle.dumps(core))
    assert copy.native and copy.encode("aaaa xxxx") == core.encode("aaaa xxxx")


def test_native_without_the_core(monkeypatch):
    """Where the core was not built: native=True quietly runs the reference; asking for the
    core after construction is a one-line TokenizerError."""
    monkeypatch.setattr(bpe_module, "NATIVE_AVAILABLE", False)
    tok = BPETokenizer(vocab_size=300)
    tok.train(TRAIN_TEXT)
    assert not tok.native and tok.encode("aaaa") == tok._bpe_python("aaaa")
    with pytest.raises(TokenizerError, match="native=False"):
        tok.native = True
