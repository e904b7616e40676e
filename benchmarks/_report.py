"""Shared by the benchmark scripts: the machine description and appending results to
BENCHMARKS.md (the one place for results).

``append_section(heading, markdown)`` inserts at the end of the ``## heading`` section of
BENCHMARKS.md (creating the section at the end if it is missing); ``set_summary(key, result,
met)`` rewrites one row of the summary table at the top. Both hold an exclusive lock on a
lock file (in the temp folder) and replace the file atomically (write a temporary file, then rename), so
benchmarks running at the same time do not lose each other's rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from pocketgpt.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "BENCHMARKS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine(extra: str = "") -> str:
    """CPU model, cores, load average (1, 5, 15 min), OS, Python and torch versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [
        f"{cpu_model()}, {os.cpu_count()} CPUs ({usable} usable)",
        f"load average {load_average()}",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
    ]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name()}")
        else:
            parts.append("no GPU")
    if extra:
        parts.append(extra)
    return ", ".join(parts)


def now() -> str:
    return f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this script, relative to the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *argv[1:]])


def header(title: str, argv: list[str] | None = None, extra: str = "") -> str:
    """The first lines of a dated result: a ### title with the date, the command, the machine."""
    return f"### {now()}: {title}\n\n- command: `{command(argv)}`\n- machine: {machine(extra)}\n"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


@contextlib.contextmanager
def _locked(path: Path):
    # The lock file lives in the temp folder, keyed by the results file, not in the checkout.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"pocketgpt-benchmarks-{key}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_worker(script: str, name: str, argv: list[str]) -> dict:
    """Run ``script --worker name --json OUT *argv`` in a fresh Python process (no allocator or
    thread-pool state shared with the caller) and return the JSON it wrote to OUT."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, script, "--worker", name, "--json", str(out), *argv]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _find_heading(lines: list[str], heading: str) -> int | None:
    """Index of the ``## heading`` line: an exact title, else the first that starts with it."""
    titles = [(i, ln[3:].strip()) for i, ln in enumerate(lines) if ln.startswith("## ")]
    for i, title in titles:
        if title == heading:
            return i
    for i, title in titles:
        if title.startswith(heading):
            return i
    return None


def insert_section(text: str, heading: str, markdown: str) -> str:
    """``text`` with ``markdown`` added at the end of its ``## heading`` section."""
    lines = text.splitlines()
    block = markdown.strip("\n").splitlines()
    at = _find_heading(lines, heading)
    if at is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", f"## {heading}", "", *block, ""]
        return "\n".join(lines) + "\n"
    end = next((j for j in range(at + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    before = lines[:end]
    while before and not before[-1].strip():
        before.pop()
    return "\n".join([*before, "", *block, "", *lines[end:]]).rstrip("\n") + "\n"


def append_section(heading: str, markdown: str, path: str | os.PathLike = RESULTS) -> Path:
    """Append ``markdown`` under the ``## heading`` section of BENCHMARKS.md, atomically."""
    path = Path(path)
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
        atomic_write_text(path, insert_section(text, heading, markdown))
    return path


def update_summary_row(text: str, key: str, result: str, met: str) -> str:
    """Rewrite the summary-table row whose first cell is ``key``: its last two cells become
    ``result`` and ``met`` (a row ``| key | script | result | target | met |``)."""
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and cells and cells[0] == key and len(cells) >= 5:
            cells[2], cells[-1] = result, met
            lines[i] = "| " + " | ".join(cells) + " |"
            return "\n".join(lines) + "\n"
    return text


def set_summary(key: str, result: str, met: str, path: str | os.PathLike = RESULTS) -> None:
    """Put the latest ``result`` and ``met`` into the summary row ``key`` of BENCHMARKS.md."""
    path = Path(path)
    if not path.exists():
        return
    with _locked(path):
        text = path.read_text(encoding="utf-8")
        new = update_summary_row(text, key, result, met)
        if new != text:
            atomic_write_text(path, new)
