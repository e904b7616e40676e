import numpy as np
import pytest
import torch

from pocketgpt.config import DataConfig
from pocketgpt.data import DataError, TokenWindows, load_corpus


def test_windows_default_stride_tiles_targets():
    w = TokenWindows(np.arange(20), block_size=4)
    assert len(w) == 4  # windows start at 0, 4, 8, 12; 16 would need token 20
    assert w[0].tolist() == [0, 1, 2, 3, 4]
    assert w[3].tolist() == [12, 13, 14, 15, 16]
    targets = np.concatenate([w[i][1:] for i in range(len(w))])
    assert targets.tolist() == list(range(1, 17))  # every target exactly once


def test_windows_with_stride_and_batch():
    w = TokenWindows(np.arange(20), block_size=4, stride=2)
    assert len(w) == 8
    x, y = w.batch([0, 3])
    assert x.dtype == torch.int64 and x.shape == (2, 4)
    assert x.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert y.tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]


def test_windows_too_short():
    assert len(TokenWindows(np.arange(4), block_size=4)) == 0
    with pytest.raises(IndexError):
        TokenWindows(np.arange(4), block_size=4)[0]


def test_epoch_batches_are_seeded_and_resumable():
    w = TokenWindows(np.arange(200), block_size=4)
    a = [x.tolist() for x, _ in w.epoch_batches(3, epoch=1, seed=7)]
    b = [x.tolist() for x, _ in w.epoch_batches(3, epoch=1, seed=7)]
    c = [x.tolist() for x, _ in w.epoch_batches(3, epoch=2, seed=7)]
    assert a == b and a != c
    assert [x.tolist() for x, _ in w.epoch_batches(3, epoch=1, seed=7, start_batch=5)] == a[5:]


def test_sequential_batches_cover_every_window():
    w = TokenWindows(np.arange(50), block_size=4)
    batches = list(w.sequential_batches(5))
    assert sum(x.shape[0] for x, _ in batches) == len(w)


def test_embedded_corpus(tmp_path):
    corpus = load_corpus(DataConfig(), tmp_path)
    assert corpus.train.startswith(" \n = Homarus gammarus = \n")
    assert len(corpus.train.encode()) == 1_146_846
    assert corpus.test.startswith(" = ")
    assert len(corpus.validation.encode()) + len(corpus.test.encode()) == 1_290_590
    assert len(corpus.fingerprint) == 64


def test_files_source(small_text_files, tmp_path):
    cfg = DataConfig(source="files", **{k: str(v) for k, v in small_text_files.items()})
    corpus = load_corpus(cfg, tmp_path / "cache")
    assert corpus.train == small_text_files["train"].read_text()
    assert corpus.test == small_text_files["test"].read_text()


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = {}
    for split in ("train", "validation", "test"):
        paths[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.table({"text": [f"{split} one", f"{split} two"]}), paths[split])
    corpus = load_corpus(DataConfig(source="files", **paths), tmp_path / "cache")
    assert corpus.train == "train one\ntrain two"


def test_files_source_errors(small_text_files, tmp_path):
    files = {k: str(v) for k, v in small_text_files.items()}
    with pytest.raises(DataError, match="no such file"):
        load_corpus(DataConfig(source="files", **{**files, "test": "missing.txt"}), tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(DataConfig(source="files", **{**files, "validation": str(empty)}), tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_corpus(DataConfig(source="files", **{**files, "train": str(latin1)}), tmp_path)


def test_hub_source_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="data=wikitext2_mini") as e:
        load_corpus(DataConfig(source="wikitext2"), tmp_path)
    assert "data=files" in str(e.value) and "\n" not in str(e.value)


def test_token_cache_is_written_in_chunks_and_read_back(small_text_files, tmp_path, monkeypatch):
    """The cache file holds exactly the per-line encodings, written a few lines at a time (the
    whole stream is never in memory), and a second call only memory-maps it."""
    import pocketgpt.data as data
    from pocketgpt.tokenizer import BPETokenizer

    cfg = DataConfig(source="files", **{k: str(v) for k, v in small_text_files.items()})
    corpus = load_corpus(cfg, tmp_path / "cache")
    tok = BPETokenizer(vocab_size=300)
    tok.train([corpus.train])
    batches = []
    encode_batch = tok.encode_batch

    def recording(lines):
        batches.append(len(lines))
        return encode_batch(lines)

    monkeypatch.setattr(data, "ENCODE_CHUNK_LINES", 7)
    monkeypatch.setattr(tok, "encode_batch", recording)
    splits = data.tokenize_corpus(corpus, tok, tmp_path / "cache")
    assert batches and max(batches) == 7
    for name in ("train", "validation", "test"):
        text = getattr(corpus, name)
        expected = [t for line in text.splitlines(keepends=True) for t in tok.encode(line)]
        tokens = splits[name].tokens
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert tokens.tolist() == expected
        assert splits[name].n_bytes == len(text.encode("utf-8"))
    files = sorted(p.name for p in (tmp_path / "cache" / "tokens").rglob("*") if p.is_file())
    assert files == ["test.npy", "train.npy", "validation.npy"]  # no temporary file left
    batches.clear()
    again = data.tokenize_corpus(corpus, tok, tmp_path / "cache")
    assert batches == [] and again["train"].tokens.tolist() == splits["train"].tokens.tolist()
