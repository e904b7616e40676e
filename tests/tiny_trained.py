"""A tiny GPTMini trained for a few seconds on the package corpus, saved as a model folder
(``model_io.save_model`` + the tokenizer), for the export and evaluation tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

from pocketgpt.config import ModelConfig
from pocketgpt.data import TokenWindows, embedded_corpus_dir
from pocketgpt.model import GPTMini
from pocketgpt.model_io import TOKENIZER_FILE, save_model
from pocketgpt.tokenizer import BPETokenizer


def corpus_text(split: str) -> str:
    with gzip.open(embedded_corpus_dir() / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def shared_tiny_model(tmp_path_factory):
    """-> (folder, model, tokenizer): trained once per test session, in its base temp folder."""
    from pocketgpt.loading import load

    folder = tmp_path_factory.getbasetemp() / "tiny-trained-model"
    if (folder / TOKENIZER_FILE).is_file():
        return (folder, *load(folder))
    model, tokenizer = train_tiny_model(folder)
    return folder, model, tokenizer


def train_tiny_model(folder: Path, steps: int = 80, max_len: int = 96):
    """-> (model, tokenizer), also saved in ``folder``. Trained enough that its greedy choices
    are not near-ties (an untrained model's logits are all alike). One thread: a model this
    small trains several times faster so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(folder, steps, max_len)
    finally:
        torch.set_num_threads(threads)


def _train(folder: Path, steps: int, max_len: int):
    torch.manual_seed(0)
    lines = corpus_text("train").splitlines(keepends=True)[:800]
    tokenizer = BPETokenizer(vocab_size=384)
    tokenizer.train(lines)
    ids = [t for row in tokenizer.encode_batch(lines) for t in row]
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=48,
        n_heads=4,
        d_ff=96,
        num_layers=2,
        max_len=max_len,
    )
    model = GPTMini(cfg)
    windows = TokenWindows(torch.tensor(ids).numpy(), max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = windows.batch(torch.randint(len(windows), (8,)).numpy())
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model(model, folder)
    tokenizer.save(folder / TOKENIZER_FILE)
    return model, tokenizer
