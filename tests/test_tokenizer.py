"""pocketgpt.tokenizer: round trips, known merges, specials, files, caching."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pocketgpt.tokenizer import (
    BPETokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
)
from pocketgpt.tokenizer.pretokenize import PATTERNS, compiled, splitter

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "It's a lovely day, isn't it? We'll see; they've gone.\n",
    "Numbers: 12345 678 9, and 3.14159 plus 2,718.\n",
    "   indented   text\twith\ttabs\r\nand CRLF\n",
    "Café déjà vu — naïve façade; Größe; 東京タワー; مرحبا بالعالم; 😀👍🏽👨‍👩‍👧\n",
] * 20

TRICKY = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\r\n",
    "a\r\nb\r\n",
    "\t\tx\t",
    "\x00",
    "a\x00b\x01\x02\x1f\x7f",
    "\u00a0nbsp\u00a0\u00a0x",
    "👨‍👩‍👧‍👦 family",
    "👍🏽",
    "中文字符测试，日本語のテキスト",
    "שלום עולם مرحبا",
    "\u200f\u200e\u202e reversed",
    "Ǆ ǅ ǆ ﬁ ß ẞ",
    "I'M IT'S it's they'll WE'VE",
    "x" * 300,
    " " * 200 + "y",
    "<eos>",
    "a<eos>b<bos><unk><pad>",
    "\U0010ffff\ufffd\ufeff",
]

IMPLS = [BPETokenizer, HFTokenizer]


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def pattern(request):
    return request.param


@pytest.fixture(scope="module", params=IMPLS, ids=lambda c: c.__name__)
def trained(request, pattern) -> Tokenizer:
    tok = request.param(vocab_size=400, pattern=pattern)
    tok.train(CORPUS)
    return tok


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.unk_id not in ids  # byte-level: nothing is unknown


def test_untrained_is_byte_level():
    tok = BPETokenizer(vocab_size=300)
    assert tok.vocab_size == 260
    assert tok.encode("ab") == [4 + 97, 4 + 98]
    assert tok.decode(tok.encode("héllo 😀")) == "héllo 😀"


def test_classic_aaabdaaabac():
    # Wikipedia's example: aa -> Z, ab -> Y (tie with Za, smaller ids win), ZY -> X.
    tok = BPETokenizer(vocab_size=256 + 3, special_tokens=())
    tok.train(["aaabdaaabac"])
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.token_bytes(258) == b"aaab"


def test_tie_break_is_smallest_pair():
    tok = BPETokenizer(vocab_size=256 + 1, special_tokens=())
    tok.train(["ba", "ab"])  # (a,b) and (b,a) both once: (97, 98) < (98, 97)
    assert tok.merges == [(97, 98)]


def test_training_stops_when_no_pairs():
    tok = BPETokenizer(vocab_size=5000, special_tokens=())
    tok.train(["ab"])
    assert tok.vocab_size == 257


def test_layout_and_special_ids(trained):
    assert (trained.unk_id, trained.pad_id, trained.bos_id, trained.eos_id) == (0, 1, 2, 3)
    assert trained.vocab_size == 400


def test_special_tokens_behaviour(trained):
    text = "hi<eos>there"
    plain = trained.encode(text)
    assert trained.eos_id not in plain
    assert trained.decode(plain) == text
    special = trained.encode(text, allow_special=True)
    assert special.count(trained.eos_id) == 1
    assert trained.decode(special) == text
    assert trained.decode(special, skip_special_tokens=True) == "hithere"
    wrapped = trained.encode("hi", add_special_tokens=True)
    assert wrapped[0] == trained.bos_id and wrapped[-1] == trained.eos_id
    assert wrapped[1:-1] == trained.encode("hi")
    assert trained.decode(wrapped) == "<bos>hi<eos>"
    assert trained.decode(wrapped, skip_special_tokens=True) == "hi"


def test_encode_batch_matches_encode(trained):
    assert trained.encode_batch(TRICKY) == [trained.encode(t) for t in TRICKY]
    assert trained.encode_batch(TRICKY, add_special_tokens=True) == [
        trained.encode(t, add_special_tokens=True) for t in TRICKY
    ]


def test_fingerprint_stable(pattern):
    a = BPETokenizer(vocab_size=320, pattern=pattern)
    b = BPETokenizer(vocab_size=320, pattern=pattern)
    a.train(CORPUS)
    b.train(CORPUS)
    assert a.fingerprint == b.fingerprint
    c = BPETokenizer(vocab_size=321, pattern=pattern)
    c.train(CORPUS)
    assert c.fingerprint != a.fingerprint


def test_save_load(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    again = load_tokenizer(path)
    assert type(again) is type(trained)
    assert again.fingerprint == trained.fingerprint
    assert type(trained).load(path).fingerprint == trained.fingerprint
    for text in TRICKY:
        assert again.encode(text, allow_special=True) == trained.encode(text, allow_special=True)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (2, 3, trained.vocab_size)


def test_save_load_without_specials(tmp_path):
    tok = BPETokenizer(vocab_size=300, special_tokens=())
    tok.train(CORPUS)
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.special_tokens == ()
    assert again.bos_id is None and again.eos_id is None
    assert again.encode("hi", add_special_tokens=True) == tok.encode("hi")


def test_exported_hf_matches(pattern, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    ours = BPETokenizer(vocab_size=400, pattern=pattern)
    ours.train(CORPUS)
    path = tmp_path / "tokenizer.json"
    ours.save_hf(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    for text in TRICKY + CORPUS[:5]:
        mine = ours.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False).ids == mine, text
        # The export's post-processor adds <bos> ... <eos>, the tokenizers default.
        assert hf.encode(text).ids == ours.encode(text, add_special_tokens=True, allow_special=True)
        assert hf.decode(mine, skip_special_tokens=False) == text


def _naive_train(texts: list[str], vocab_size: int) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair before each merge (slow, obviously right)."""
    from collections import Counter

    from pocketgpt.tokenizer.pretokenize import split_pieces

    words = Counter(tuple(p.encode()) for t in texts for p in split_pieces(t))
    spelled = [bytes([i]) for i in range(256)]
    merges = []
    while len(spelled) < vocab_size:
        counts = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                counts[p] += c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest ids
        merged = spelled[best[0]] + spelled[best[1]]
        new = spelled.index(merged) if merged in spelled else len(spelled)
        if new == len(spelled):
            spelled.append(merged)
        merges.append(best)
        rewritten = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            rewritten[tuple(out)] += c
        words = rewritten
    return merges


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(alphabet="aab c", max_size=30), max_size=8))
def test_incremental_training_equals_naive(texts):
    tok = BPETokenizer(vocab_size=256 + 20, special_tokens=())
    tok.train(texts)
    assert tok.merges == _naive_train(texts, 256 + 20)


# Characters where an ASCII twin could part from its pattern: contractions in both cases, the
# whitespace \s knows (and \x1c-\x1f, which str.isspace() counts but \s does not), letters,
# digits, punctuation, controls.
ASCII_EDGES = "'sdmtlvreSDMTLVRE aZ09_!.-\t\n\r\x0b\x0c\x1c\x1f\x7f\x00"


@pytest.mark.parametrize("name", sorted(PATTERNS))
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ASCII_EDGES, max_size=40) | st.text(st.characters(max_codepoint=127)))
@example(text="IT'S I'LLx WE'VEr 'Dd'm'T they'RE\r\n\x1c 12345 !!\n")
def test_ascii_twin_cuts_like_its_pattern(name, text):
    assert splitter(name)(text) == compiled(name).findall(text)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ('{"format": "pocketgpt-bpe", "version": 1, "merges": [[1', "not valid JSON"),
        ("[1, 2, 3]", "not a tokenizer file"),
        ('{"hello": "world"}', "not a tokenizer file"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_version_and_merges(tmp_path):
    tok = BPETokenizer(vocab_size=300)
    tok.train(CORPUS)
    d = tok.to_dict()
    for change, message in [
        ({"version": 99}, "unsupported"),
        ({"merges": [[4, 9999]]}, "not defined yet"),
        ({"merges": [[4, 5], [4, 5]]}, "duplicate"),
        ({"merges": [[0, 5]]}, "special"),
        ({"merges": "nope"}, "list of"),
        ({"vocab_size": 7}, "vocab_size"),
        ({"fingerprint": "00"}, "fingerprint"),
        ({"pattern": "gpt9"}, "unknown pre-tokenization pattern"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**d, **change}))
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(path)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="no such"):
        load_tokenizer(tmp_path / "nope.json")


@dataclass
class _Cfg:
    kind: str = "bpe"
    vocab_size: int = 300
    pattern: str = "gpt2"
    path: str | None = None
    special_tokens: list[str] = field(default_factory=lambda: ["<unk>", "<pad>", "<bos>", "<eos>"])


@pytest.mark.parametrize("kind", ["bpe", "hf_bpe"])
def test_build_tokenizer_caches(tmp_path, monkeypatch, kind):
    text = "".join(CORPUS)
    cfg = _Cfg(kind=kind)
    tok, path = build_tokenizer(cfg, text, tmp_path)
    assert path.is_file() and path.name == "tokenizer.json"
    assert path.parent.parent == tmp_path / "tokenizers"
    cls = type(tok)
    monkeypatch.setattr(cls, "train", lambda *a, **k: pytest.fail("retrained"))
    tok2, path2 = build_tokenizer(cfg, text, tmp_path)
    assert path2 == path and tok2.fingerprint == tok.fingerprint
    # A different setting is a different cache entry.
    monkeypatch.undo()
    _, path3 = build_tokenizer(_Cfg(kind=kind, vocab_size=301), text, tmp_path)
    assert path3 != path


def test_build_tokenizer_from_files(tmp_path):
    tok = BPETokenizer(vocab_size=300)
    tok.train(CORPUS)
    tok.save(tmp_path / "ours.json")
    tok.save_hf(tmp_path / "hf.json")
    got, path = build_tokenizer(_Cfg(kind="bpe", path=str(tmp_path / "ours.json")), "", tmp_path)
    assert isinstance(got, BPETokenizer) and got.fingerprint == tok.fingerprint
    got, path = build_tokenizer(_Cfg(kind="hf_file", path=str(tmp_path / "hf.json")), "", tmp_path)
    assert isinstance(got, HFTokenizer)
    assert got.encode("hello there") == tok.encode("hello there")
    assert (got.unk_id, got.pad_id, got.bos_id, got.eos_id) == (0, 1, 2, 3)
    with pytest.raises(TokenizerError, match="unknown"):
        build_tokenizer(_Cfg(kind="nope"), "", tmp_path)


def test_truncated_and_foreign_files(tmp_path):
    tok = BPETokenizer(vocab_size=300)
    tok.train(CORPUS)
    tok.save(tmp_path / "good.json")
    text = (tmp_path / "good.json").read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError, match="truncated or corrupt"):
        load_tokenizer(tmp_path / "cut.json")
    with pytest.raises(TokenizerError, match="truncated or corrupt"):
        BPETokenizer.load(tmp_path / "cut.json")
    # A tokenizer.json given to BPETokenizer.load: told what it is.
    tok.save_hf(tmp_path / "hf.json")
    with pytest.raises(TokenizerError, match="Hugging Face"):
        BPETokenizer.load(tmp_path / "hf.json")
    # Our file given to HFTokenizer.from_file.
    with pytest.raises(TokenizerError, match="not a Hugging Face"):
        HFTokenizer.from_file(tmp_path / "good.json")
    # Looks like a tokenizer.json, but tokenizers cannot load it.
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    with pytest.raises(TokenizerError, match="tokenizers cannot load") as info:
        load_tokenizer(tmp_path / "broken.json")
    assert "\n" not in str(info.value)


def test_foreign_hf_file_without_our_specials(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert (tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id) == (None, None, None, None)
    assert tok.special_tokens == ("<|endoftext|>",)
    assert tok.pattern is None
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    assert tok.decode(tok.encode("hello wörld")) == "hello wörld"
    assert tok.encode("<|endoftext|>", allow_special=True) == [0]
    assert 0 not in tok.encode("<|endoftext|>")
    with pytest.raises(TokenizerError, match="cannot be retrained"):
        tok.train(CORPUS)


def test_bad_settings():
    with pytest.raises(TokenizerError, match="too small"):
        BPETokenizer(vocab_size=100)
    with pytest.raises(TokenizerError, match="unknown pre-tokenization pattern"):
        BPETokenizer(pattern="gpt5")
    with pytest.raises(TokenizerError, match="distinct"):
        BPETokenizer(special_tokens=["<a>", "<a>"])
    with pytest.raises(TokenizerError, match="too small"):
        HFTokenizer(vocab_size=100)


def test_never_learns_a_special_spelling(tmp_path):
    tok = BPETokenizer(vocab_size=320)
    tok.train(["<eos> <unk>"] * 50)
    spelled = {tok.token_bytes(i) for i in range(4, tok.vocab_size)}
    assert b"<eos>" not in spelled and b"<unk>" not in spelled
    tok.save_hf(tmp_path / "t.json")  # would fail on a vocab-key clash
    assert HFTokenizer.from_file(tmp_path / "t.json").encode("<eos>") == tok.encode("<eos>")


def test_reused_token_when_bytes_already_exist(tmp_path):
    # (ab, c) and (a, bc) both spell b"abc": the second merge reuses the first's id, as
    # tokenizers does, so the exported vocab has no duplicate key and ids still agree.
    tok = BPETokenizer(vocab_size=300, special_tokens=())
    a, b, c = 97, 98, 99
    tok._set_merges([(a, b), (b, c), (256, c), (a, 257)])
    assert tok.vocab_size == 256 + 3
    assert tok.token_bytes(258) == b"abc"
    assert tok.encode("abc") == [258]
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").merges == tok.merges
    tok.save_hf(tmp_path / "hf.json")
    hf = load_tokenizer(tmp_path / "hf.json")
    for text in ["abc", "bc", "xabcabc", "aabcc"]:
        assert hf.encode(text) == tok.encode(text)


def test_decode_rejects_bad_ids_and_takes_numpy(trained):
    import numpy as np

    ids = trained.encode("hello wörld")
    assert trained.decode(np.array(ids, dtype=np.uint16)) == "hello wörld"
    if isinstance(trained, BPETokenizer):
        for bad in ([-1], [trained.vocab_size]):
            with pytest.raises(ValueError, match="ids must be"):
                trained.decode(bad)


@pytest.fixture(scope="module", params=["ours", "hf"])
def saved_text(request, tmp_path_factory):
    tok = BPETokenizer(vocab_size=280)
    tok.train(CORPUS)
    path = tmp_path_factory.mktemp("fuzz") / "t.json"
    (tok.save if request.param == "ours" else tok.save_hf)(path)
    return path.read_text()


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_corruption_is_a_tokenizer_error(saved_text, tmp_path_factory, data):
    """Cut, or overwrite a few characters of, a good file: it loads or says TokenizerError."""
    text = saved_text
    if data.draw(st.booleans()):
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(text) - 1))
            text = text[:i] + data.draw(st.sampled_from('0179"[]{},:-x ')) + text[i + 1 :]
    path = tmp_path_factory.mktemp("c") / "t.json"
    path.write_text(text)
    try:
        load_tokenizer(path)
    except TokenizerError as e:
        assert "\n" not in str(e) and str(path) in str(e)
