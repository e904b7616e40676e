"""The catalogue of bad inputs: each gets one clear line naming the value and the fix, a
non-zero exit, no traceback, no run left behind and nothing half-written."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pocketgpt.cli.train import main
from pocketgpt.data import embedded_corpus_dir

from .conftest import TINY


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _tokenizer_json(tmp: Path, kind: str) -> str:
    if kind == "truncated":
        return _write(tmp / "tok.json", '{"format": "pocketgpt-bpe", "version": 1, "merg')
    if kind == "foreign":
        return _write(tmp / "tok.json", '{"name": "not a tokenizer", "items": [1, 2, 3]}')
    return str(tmp / "missing-tokenizer.json")


def _checkpoint(tmp: Path, kind: str) -> str:
    if kind == "corrupt":
        return _write(tmp / "ckpt-0000010.pt", b"\x80\x04garbage" * 10)
    if kind == "foreign":
        path = tmp / "foreign.pt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
        return str(path)
    return str(tmp / "no-such-checkpoint.pt")


def _data(tmp: Path, kind: str) -> list[str]:
    with gzip.open(embedded_corpus_dir() / "test.txt.gz", "rt", encoding="utf-8") as f:
        good = _write(tmp / "good.txt", "".join(f.readlines()[:200]))
    train = {
        "missing": str(tmp / "missing.txt"),
        "empty": _write(tmp / "empty.txt", ""),
        "tiny": _write(tmp / "tiny.txt", "just a few words\n"),
        "latin1": _write(tmp / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1")),
    }[kind]
    return ["data=files", f"data.train={train}", f"data.validation={good}", f"data.test={good}"]


# (case id, overrides (a function of tmp_path), expected exit code, text the error must contain)
CATALOGUE = [
    ("typo", lambda t: ["model.d_modle=64"], 1, "Key 'd_modle' not in 'ModelConfig'"),
    ("wrong-type", lambda t: ["model.d_model=wide"], 1, "model.d_model"),
    ("unknown-group", lambda t: ["optim=adam"], 1, "Could not find 'optim/adam'"),
    ("lr-zero", lambda t: ["optim.lr=0"], 2, "optim.lr=0.0 must be a positive number"),
    ("lr-negative", lambda t: ["optim.lr=-1"], 2, "optim.lr=-1.0 must be a positive number"),
    ("dropout", lambda t: ["model.dropout=1.5"], 2, "model.dropout=1.5 must be in [0, 1)"),
    ("batch-zero", lambda t: ["trainer.batch_size=0"], 2, "trainer.batch_size=0"),
    (
        "context",
        lambda t: ["data.block_size=64"],
        2,
        "lower data.block_size or raise model.max_len",
    ),
    ("vocab", lambda t: ["tokenizer.vocab_size=10"], 2, "use at least 260"),
    ("heads", lambda t: ["model.n_heads=3"], 2, "not divisible by model.n_heads=3"),
    ("model-vocab", lambda t: ["model.vocab_size=999"], 2, "leave model.vocab_size null"),
    ("device", lambda t: ["trainer.device=tpu"], 1, "expected one of [auto, cpu, cuda, mps]"),
    *[
        (
            f"tokenizer-{k}",
            lambda t, k=k: ["tokenizer=hf_file", f"tokenizer.path={_tokenizer_json(t, k)}"],
            2,
            needle,
        )
        for k, needle in {
            "missing": "missing-tokenizer.json: no such tokenizer file",
            "truncated": "tok.json: not valid JSON (truncated or corrupt?)",
            "foreign": "tok.json: not a Hugging Face tokenizer.json (no 'model' object)",
        }.items()
    ],
    *[
        (f"bpe-file-{k}", lambda t, k=k: [f"tokenizer.path={_tokenizer_json(t, k)}"], 2, needle)
        for k, needle in {
            "missing": "missing-tokenizer.json: no such tokenizer file",
            "truncated": "tok.json: not valid JSON (truncated or corrupt?)",
            "foreign": "tok.json: not a pocketgpt BPE tokenizer file",
        }.items()
    ],
    *[
        (f"checkpoint-{k}", lambda t, k=k: [f"trainer.resume={_checkpoint(t, k)}"], 2, needle)
        for k, needle in {
            "missing": "no-such-checkpoint.pt is not 'auto', a checkpoint file or folder, or an",
            "corrupt": "ckpt-0000010.pt is corrupt or not a pocketgpt checkpoint",
            "foreign": "foreign.pt is not a pocketgpt checkpoint",
        }.items()
    ],
    ("data-missing", lambda t: _data(t, "missing"), 2, "missing.txt: no such file"),
    ("data-empty", lambda t: _data(t, "empty"), 2, "the file is empty"),
    ("data-too-small", lambda t: _data(t, "tiny"), 2, "fewer than one step"),
    ("data-not-utf8", lambda t: _data(t, "latin1"), 2, "is not UTF-8 text"),
    ("server-down", lambda t: ["tracking.uri=http://127.0.0.1:9"], 2, "does not answer"),
]


@pytest.mark.parametrize("case,overrides,code,needle", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(case, overrides, code, needle, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = overrides(inputs)
    before = {p: p.stat().st_mtime_ns for p in inputs.rglob("*")}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["pocketgpt-train", *TINY, *args])

    with pytest.raises(SystemExit) as exit_info:
        main()

    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in err
    if code == 2:  # our own errors: exactly one line
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    # Nothing lost: the inputs are untouched. Nothing half-written: no temporary files,
    # no checkpoints, and no MLflow run (so none left RUNNING).
    assert {p: p.stat().st_mtime_ns for p in inputs.rglob("*")} == before
    assert not list(tmp_path.rglob("*.tmp")) and not list(work.rglob("ckpt-*.pt"))
    db = work / "mlruns" / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
