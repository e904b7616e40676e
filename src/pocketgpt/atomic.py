"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file pocketgpt writes (checkpoints, token caches, tokenizers, model folders, sweep
records, plots) goes through ``atomic_path``: the content is written to a temporary file in the
target's folder, flushed to disk, then renamed over the target; on any error the temporary file
is removed and the target is left as it was. The file gets the mode a plain ``open`` would give
it (0666 less the umask), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it process-wide, so a
    set-and-restore would race with other threads creating files); 0o022 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def default_file_mode() -> int:
    """The mode a new file gets from a plain ``open``: 0666 less the umask."""
    return 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = ".tmp", sync_dir: bool = False
) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``.

    ``suffix`` is the temporary file's (for writers that pick a format from the name);
    ``sync_dir`` also fsyncs the folder, making the rename itself durable.

    >>> with atomic_path(Path(tempfile.mkdtemp()) / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes it 0600
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_dir:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it is renamed to ``path``.

    ``path`` must not exist unless ``replace``; then the old folder is swapped out only once
    the new one is complete, and removed after. On any error the temporary folder is removed
    and ``path`` is left as it was.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_read_umask())  # mkdtemp makes it 0700
        yield tmp
        if path.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)  # fails if path appeared meanwhile: never merge into it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
