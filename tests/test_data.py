import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pocketgpt.config import DataConfig
from pocketgpt.data import Corpus, DataError, TokenWindows, load_corpus, tokenize_corpus
from pocketgpt.errors import ConfigError
from pocketgpt.tokenizer import BPETokenizer


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
    """An unreachable Hub, simulated: datasets.load_dataset raises what it raises offline
    (test_hub_source_offline_error_real checks that), and we say what to do instead."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="data=wikitext2_mini") as e:
        load_corpus(DataConfig(source="wikitext2"), tmp_path)
    assert "ConnectionError" in str(e.value) and "data=files" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_hub_source_offline_error_real(tmp_path):
    """The real loader offline, whatever this machine's network: the offline variables are set
    before ``datasets`` is imported (a fresh process), with an empty Hugging Face cache."""
    code = (
        "from pocketgpt.config import DataConfig\n"
        "from pocketgpt.data import DataError, load_corpus\n"
        "try:\n"
        f"    load_corpus(DataConfig(source='wikitext2'), {str(tmp_path / 'cache')!r})\n"
        "except DataError as e:\n"
        "    print(e)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "(ConnectionError)" in out.stdout and "data=wikitext2_mini" in out.stdout


def test_files_source_without_test_split(small_text_files, tmp_path):
    files = {k: str(v) for k, v in small_text_files.items() if k != "test"}
    corpus = load_corpus(DataConfig(source="files", **files), tmp_path / "cache")
    assert corpus.test is None
    assert corpus.validation == small_text_files["validation"].read_text()
    tok = BPETokenizer(vocab_size=300)
    tok.train([corpus.train])
    splits = tokenize_corpus(corpus, tok, tmp_path / "cache")
    assert set(splits) == {"train", "validation"}
    with_test = Corpus("files", corpus.train, corpus.validation, "x\n")
    assert with_test.fingerprint != corpus.fingerprint


def test_validation_fraction_holds_out_the_last_training_lines(small_text_files, tmp_path):
    """One file: the last round(n * fraction) lines are the validation split, the rest train."""
    path = small_text_files["train"]
    lines = path.read_text().splitlines(keepends=True)  # 300 lines
    cfg = DataConfig(source="files", train=str(path), validation_fraction=0.1)
    corpus = load_corpus(cfg, tmp_path / "cache")
    assert corpus.train == "".join(lines[:270])
    assert corpus.validation == "".join(lines[270:])
    assert corpus.test is None
    again = load_corpus(cfg, tmp_path / "cache2")
    assert again.fingerprint == corpus.fingerprint  # deterministic
    with_test = load_corpus(
        DataConfig(**{**cfg.__dict__, "test": str(small_text_files["test"])}), tmp_path / "c"
    )
    assert with_test.test == small_text_files["test"].read_text()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"validation_fraction": 0.0}, r"data.validation_fraction=0.0 must be in \(0, 1\)"),
        ({"validation_fraction": 1.0}, r"must be in \(0, 1\)"),
        ({"validation_fraction": -0.2}, r"must be in \(0, 1\)"),
        ({}, r"data.validation=PATH, or data.validation_fraction=F"),
        ({"validation": "v.txt", "validation_fraction": 0.1}, "set only one"),
    ],
)
def test_validation_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        DataConfig(source="files", train="t.txt", **kwargs)
    assert "\n" not in str(e.value)


def test_validation_fraction_file_too_small(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one line only\n")
    cfg = DataConfig(source="files", train=str(tiny), validation_fraction=0.5)
    with pytest.raises(DataError, match="1 lines, too few to hold out") as e:
        load_corpus(cfg, tmp_path / "cache")
    assert "\n" not in str(e.value)
    blank_tail = tmp_path / "blank_tail.txt"
    blank_tail.write_text("some text\n \n")
    cfg = DataConfig(source="files", train=str(blank_tail), validation_fraction=0.5)
    with pytest.raises(DataError, match="validation split of files is empty .held out"):
        load_corpus(cfg, tmp_path / "cache")


@pytest.mark.slow
def test_train_with_two_files(compose_cfg, small_text_files, tmp_path, capsys):
    """data=files with train and validation only: trains, and skips the test evaluation with a
    line saying so (no test_* metrics)."""
    from mlflow.tracking import MlflowClient

    from pocketgpt.train import train

    from .conftest import TINY

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    cfg = compose_cfg(
        *TINY,
        "data=files",
        f"data.train={small_text_files['train']}",
        f"data.validation={small_text_files['validation']}",
        "data.block_size=16",
        "model.max_len=16",
        "trainer.max_steps=2",
        "trainer.eval_interval=2",
        "tracking.log_model=false",
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
    )
    val_loss = train(cfg)
    assert math.isfinite(val_loss)
    out = capsys.readouterr().out
    assert "skipping the test evaluation" in out and "no test split" in out
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("pocketgpt")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert "val_loss" in run.data.metrics
    assert not any(k.startswith("test_") for k in run.data.metrics)


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
