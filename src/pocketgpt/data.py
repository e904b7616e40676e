"""Corpus loading (through ``datasets``), cached tokenization, and training windows.

Every source ends up as three strings (train, validation, test); with ``data=files`` the test
split is optional (None: no test evaluation) and the validation split may be held out of the
training file (``data.validation_fraction``). Tokenized splits are cached as
``.npy`` token arrays keyed by the corpus and tokenizer fingerprints, and read back memory-mapped,
so a second run neither re-tokenizes nor copies the token stream.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from pocketgpt.atomic import atomic_path
from pocketgpt.config import DataConfig
from pocketgpt.errors import DataError

SPLITS = ("train", "validation", "test")
CACHE_FORMAT = 1  # bump when the cached token layout changes


@dataclass(frozen=True)
class Corpus:
    """Raw text of the three splits; ``test`` is None when the source has no test split."""

    name: str
    train: str
    validation: str
    test: str | None = None

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            text = getattr(self, split)
            if text is None:
                h.update(f"{split}:none:".encode())
                continue
            data = text.encode("utf-8")
            h.update(f"{split}:{len(data)}:".encode())
            h.update(data)
        return h.hexdigest()


# --------------------------------------------------------------------------- loading


def embedded_corpus_dir() -> Path:
    return Path(str(resources.files("pocketgpt") / "corpus" / "wikitext2_mini"))


def _hf_cache(cache_dir: str | os.PathLike) -> str:
    return str(Path(cache_dir) / "hf_datasets")


def _join_lines(rows: list[str]) -> str:
    """Rows from the ``text`` builder keep their line breaks; add one where a row lacks it."""
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _load_files(data_files: dict[str, str], cache_dir: str | os.PathLike, column: str) -> dict:
    import datasets

    datasets.disable_progress_bars()
    kinds = {Path(p).suffix for p in data_files.values()}
    builder = "parquet" if kinds == {".parquet"} else "text"
    if builder == "text" and ".parquet" in kinds:
        raise DataError("data=files: mix of parquet and text files; use one kind for all splits")
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(
            builder, data_files=data_files, cache_dir=_hf_cache(cache_dir), **kwargs
        )
    except Exception as e:  # datasets wraps the real cause in DatasetGenerationError
        cause = _root_cause(e)
        files = ", ".join(sorted(set(data_files.values())))
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"one of {files} is not UTF-8 text ({cause.reason} at byte {cause.start}); "
                f"convert it, e.g. iconv -t UTF-8"
            ) from None
        raise DataError(f"could not read {files}: {type(cause).__name__}: {cause}") from None
    out = {}
    for split in data_files:
        if column not in ds[split].column_names:
            raise DataError(
                f"{data_files[split]} has no column {column!r} "
                f"(columns: {ds[split].column_names}); set data.text_column"
            )
        out[split] = (
            _join_lines(ds[split][column]) if builder == "text" else "\n".join(ds[split][column])
        )
    return out


def _check_manifest(directory: Path, texts: dict[str, str]) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for split, text in texts.items():
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != manifest[split]["sha256"]:
            raise DataError(
                f"embedded corpus {directory / manifest[split]['file']} is corrupt "
                f"(sha256 mismatch); reinstall pocketgpt or rebuild it with "
                f"scripts/build_wikitext2_mini.py"
            )


def _load_hub(cfg: DataConfig, cache_dir: str | os.PathLike) -> dict[str, str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, cache_dir=_hf_cache(cache_dir))
    except Exception as e:  # the Hub client raises many kinds when it is offline
        raise DataError(
            f"data=wikitext2 could not load {cfg.hub_name}/{cfg.hub_config} from the Hugging Face "
            f"Hub ({type(e).__name__}); offline, use data=wikitext2_mini (embedded) or "
            f"data=files data.train=... data.validation=... data.test=..."
        ) from None
    # The Hub stores a blank raw line as "" and every other line with its "\n": map "" back to
    # the raw " \n" so the text matches the original wiki.*.raw files byte for byte.
    return {split: "".join(row if row else " \n" for row in ds[split]["text"]) for split in SPLITS}


def hold_out_tail(text: str, fraction: float, path: str) -> tuple[str, str]:
    r"""Split ``text`` into (train, validation): validation is the last ``round(n * fraction)``
    of its n lines, a contiguous block, so a document (a run of lines) never lands in both
    splits and the held-out text reads as the file does. Deterministic: no seed involved.

    >>> hold_out_tail("a\nb\nc\nd\n", 0.25, "t.txt")
    ('a\nb\nc\n', 'd\n')
    """
    lines = text.splitlines(keepends=True)
    k = round(len(lines) * fraction)
    if not 0 < k < len(lines):
        raise DataError(
            f"data.train={path} has {len(lines)} lines, too few to hold out "
            f"data.validation_fraction={fraction} of them; give data.validation=PATH, "
            f"a larger fraction or a larger file"
        )
    return "".join(lines[:-k]), "".join(lines[-k:])


def load_corpus(cfg: DataConfig, cache_dir: str | os.PathLike) -> Corpus:
    """Load the configured source into a Corpus of three text splits (test possibly None)."""
    if cfg.source == "wikitext2_mini":
        directory = embedded_corpus_dir()
        files = {split: str(directory / f"{split}.txt.gz") for split in SPLITS}
        texts = _load_files(files, cache_dir, "text")
        _check_manifest(directory, texts)
        name = "wikitext2_mini"
    elif cfg.source == "wikitext2":
        texts = _load_hub(cfg, cache_dir)
        name = f"{cfg.hub_name}/{cfg.hub_config}"
    elif cfg.source == "files":
        # DataConfig checked that train is given, and validation or validation_fraction.
        paths = {split: getattr(cfg, split) for split in SPLITS if getattr(cfg, split)}
        for split, p in paths.items():
            matches = glob.glob(p)
            if not matches:
                raise DataError(f"data.{split}={p}: no such file")
            if all(os.path.getsize(m) == 0 for m in matches):
                raise DataError(
                    f"data.{split}={p}: the file is empty; the {split} split needs text"
                )
        texts = _load_files(paths, cache_dir, cfg.text_column)
        if "validation" not in texts:
            texts["train"], texts["validation"] = hold_out_tail(
                texts["train"], cfg.validation_fraction, cfg.train
            )
        name = "files"
    else:
        raise DataError(f"data.source={cfg.source!r} is not wikitext2_mini, wikitext2 or files")
    for split, text in texts.items():
        if not text.strip():
            held_out = name == "files" and split == "validation" and not cfg.validation
            how = f" (held out with data.validation_fraction={cfg.validation_fraction})"
            raise DataError(f"the {split} split of {name} is empty{how if held_out else ''}")
    return Corpus(name=name, **texts)


def split_sources(cfg: DataConfig) -> tuple[str, dict[str, str]]:
    """Where each split's text comes from: (source type, {split: source}), as MLflow records a
    dataset's origin (``local`` paths, ``hugging_face`` datasets).

    ``data=files`` with ``validation_fraction``: the validation split's source is the training
    file, with the held-out fraction named.
    """
    if cfg.source == "wikitext2_mini":
        directory = embedded_corpus_dir()
        return "local", {split: str(directory / f"{split}.txt.gz") for split in SPLITS}
    if cfg.source == "wikitext2":
        hub = f"hf://datasets/{cfg.hub_name}/{cfg.hub_config}"
        return "hugging_face", {split: f"{hub}/{split}" for split in SPLITS}
    sources = {
        split: os.path.abspath(getattr(cfg, split)) for split in SPLITS if getattr(cfg, split)
    }
    if "validation" not in sources:
        sources["validation"] = (
            f"{sources['train']} (last {cfg.validation_fraction:g} of its lines)"
        )
    return "local", sources


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedSplit:
    tokens: np.ndarray  # (N,) token ids, memory-mapped from the cache
    n_bytes: int  # UTF-8 bytes of the text the tokens encode (for bits per byte)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(len(self.tokens), 1)


ENCODE_CHUNK_LINES = 1024  # lines encoded per batch while writing a split's token file


def _write_token_file(path: Path, text: str, tokenizer) -> None:
    """Encode ``text`` into the .npy token file at ``path``, atomically, without ever holding
    the whole token stream in memory: chunks of lines are encoded (the tokenizer's batch path
    and per-word cache do the work) and appended to a raw temporary file, which is then copied
    behind an .npy header. Lines are encoded separately: pre-tokens never cross a line break.
    """
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    lines = text.splitlines(keepends=True)
    # the raw ids first (an anonymous file, gone when closed): the header needs their count
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        n = 0
        for start in range(0, len(lines), ENCODE_CHUNK_LINES):
            ids = tokenizer.encode_batch(lines[start : start + ENCODE_CHUNK_LINES])
            chunk = np.fromiter((t for line in ids for t in line), dtype=dtype)
            raw.write(chunk.tobytes())
            n += len(chunk)
        raw.seek(0)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (n,)})
            while block := raw.read(1 << 20):
                f.write(block)


def tokenize_corpus(
    corpus: Corpus, tokenizer, cache_dir: str | os.PathLike
) -> dict[str, TokenizedSplit]:
    """Tokenize every split, or read them back from the cache; a split the corpus lacks
    (test None) is absent from the result."""
    key = hashlib.sha256(
        f"{CACHE_FORMAT}:{corpus.fingerprint}:{tokenizer.fingerprint}".encode()
    ).hexdigest()[:24]
    directory = Path(cache_dir) / "tokens" / key
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in SPLITS:
        if getattr(corpus, split) is None:  # no test split: nothing to tokenize
            continue
        path = directory / f"{split}.npy"
        if not path.exists():
            _write_token_file(path, getattr(corpus, split), tokenizer)
        tokens = np.load(path, mmap_mode="r")
        out[split] = TokenizedSplit(tokens, len(getattr(corpus, split).encode("utf-8")))
    return out


# --------------------------------------------------------------------------- windows


class TokenWindows:
    """Windows of ``block_size + 1`` tokens, starting every ``stride`` tokens.

    With the default stride (= block_size) the targets of consecutive windows tile the stream
    without overlap: window i covers tokens[i*B : i*B + B + 1].

    >>> w = TokenWindows(np.arange(10), block_size=4)
    >>> len(w), w[0].tolist(), w[1].tolist()
    (2, [0, 1, 2, 3, 4], [4, 5, 6, 7, 8])
    """

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int | None = None):
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride or block_size
        span = block_size + 1
        self.n = 0 if len(tokens) < span else (len(tokens) - span) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.stride
        return np.asarray(self.tokens[start : start + self.block_size + 1])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack windows into inputs and targets, each (len(indices), block_size) int64."""
        starts = np.asarray(indices, dtype=np.int64) * self.stride
        rows = starts[:, None] + np.arange(self.block_size + 1)  # (b, block+1)
        xy = torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.int64))
        return xy[:, :-1], xy[:, 1:]

    def epoch_batches(
        self, batch_size: int, epoch: int, seed: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled full batches for one epoch; the order depends only on (seed, epoch)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g).numpy()
        for b in range(start_batch, self.n // batch_size):
            yield self.batch(order[b * batch_size : (b + 1) * batch_size])

    def sequential_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every window in order, the last batch possibly short (for evaluation)."""
        for start in range(0, self.n, batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, self.n)))
