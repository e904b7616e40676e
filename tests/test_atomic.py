"""Atomic writes: the target gets the usual file mode, and a failed write leaves it untouched."""

from __future__ import annotations

import os
import stat

import pytest

from pocketgpt.atomic import _read_umask, atomic_path, atomic_write_text, default_file_mode


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o027)  # the test's own process; restored below
    try:
        assert _read_umask() == 0o027 or not os.path.exists("/proc/self/status")
        atomic_write_text(tmp_path / "a.txt", "hello")
        with atomic_path(tmp_path / "b.png", suffix=".png") as tmp:
            tmp.write_bytes(b"png")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.png") == _mode(plain)
    if os.path.exists("/proc/self/status"):
        assert _mode(tmp_path / "a.txt") == 0o640
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_default_mode_follows_the_umask():
    assert default_file_mode() == 0o666 & ~_read_umask()
    if os.path.exists("/proc/self/status"):
        old = os.umask(0o077)
        try:
            assert default_file_mode() == 0o600
        finally:
            os.umask(old)


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
