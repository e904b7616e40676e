"""Tracking calls that outlive a tracking-server outage.

During training, every metric, tag and checkpoint upload goes into an ``Outbox``: one
background thread sends its records in order, so a server that stops answering delays the
figures, never the training loop. The thread retries with backoff until the server answers
again. At the end of the run ``close`` waits up to ``tracking.outage_timeout`` seconds for the
queue to drain; what is still unsent then (and anything spilled from a full queue) is written to
a journal, ``tracking_outbox.jsonl`` in the job's output folder, one JSON record a line, which
``pocketgpt-import-journal PATH`` sends once the server is back.

    >>> box = Outbox(send=print, journal=Path("outbox.jsonl"), header={"run_id": "abc"})
    >>> box.put({"op": "tags", "tags": {"a": "1"}})
    >>> box.close(timeout=5.0)  # everything sent: no journal
    {'op': 'tags', 'tags': {'a': '1'}}
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = "tracking_outbox.jsonl"
IMPORT_COMMAND = "pocketgpt-import-journal"
# MLflow error codes that say a request is wrong, not that the server is away: retrying such a
# record would never succeed, so it is dropped with a warning.
PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def is_transient(error: BaseException) -> bool:
    """Whether a failed send is worth retrying (the server is away), not a bad request."""
    if isinstance(error, FileNotFoundError):  # a checkpoint rotated away before its upload
        return False
    return getattr(error, "error_code", None) not in PERMANENT_CODES


class Outbox:
    """An ordered queue of tracking records and the one thread that sends them.

    ``send(record)`` delivers one record or raises. ``capacity`` bounds the records held in
    memory; beyond it the oldest unsent ones go to the journal (at most a few hundred bytes a
    logged step, so a day-long outage fits in the default).
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        journal: Path,
        header: dict[str, Any],
        capacity: int = 100_000,
        min_backoff: float = 0.5,
        max_backoff: float = 15.0,
    ):
        self._send, self.journal, self._header = send, Path(journal), header
        self._capacity, self._min_backoff, self._max_backoff = capacity, min_backoff, max_backoff
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._in_flight = False
        self.down_since: float | None = None  # time.time() of the first failed send, while down
        self.spilled = 0  # records written to the journal because the queue was full
        self._thread = threading.Thread(target=self._run, name="pocketgpt-outbox", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) >= self._capacity:
                # Keep the record being sent (index 0); the next oldest goes to disk.
                index = 1 if self._in_flight else 0
                self._write_journal([self._queue[index]])
                del self._queue[index]
                self.spilled += 1
            self._queue.append(record)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float) -> bool:
        """Wait until every record is sent; False when ``timeout`` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout=timeout)

    def settle(self, timeout: float) -> None:
        """Wait until what is queued is sent, unless the server is away (then return at once):
        a checkpoint written after this has its figures in the store, so a job killed after it
        and resumed loses none, and an outage still never holds training up."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue or self.down_since, timeout=timeout)

    def close(self, timeout: float) -> Path | None:
        """Send what is left (waiting up to ``timeout`` s), stop the thread; -> the journal
        when records could not be sent (they are in it), else None."""
        drained = self.flush(timeout)
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if drained:
            self._thread.join(timeout=5.0)
        if left:
            # A record in flight may still reach the server; importing it again is harmless
            # for metrics (same key, step, time and value) and tags.
            self._write_journal(left)
        return self.journal if (left or self.spilled) else None

    def _write_journal(self, records: list[dict[str, Any]]) -> None:
        """Append records to the journal, its header first; each line is a whole record."""
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        new = not self.journal.exists()
        with open(self.journal, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"op": "header", **self._header}) + "\n")
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _run(self) -> None:
        backoff = self._min_backoff
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                record = self._queue[0]
                self._in_flight = True
            try:
                self._send(record)
            except Exception as e:  # the server's or the network's; classified below
                if not is_transient(e):
                    log.warning(
                        "tracking: dropped a %s record the server refused: %s",
                        record.get("op"),
                        _one_line(e),
                    )
                    self._done(record)
                    continue
                if self.down_since is None:
                    with self._cond:
                        self.down_since = time.time()
                        self._cond.notify_all()  # settle() stops waiting
                    log.warning(
                        "tracking server unreachable (%s); training goes on, its figures wait "
                        "in memory until the server answers",
                        _one_line(e),
                    )
                with self._cond:
                    self._in_flight = False
                    self._cond.wait_for(lambda: self._stopping, timeout=backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            self._done(record)
            if self.down_since is not None:
                log.warning(
                    "tracking server back after %.0f s; buffered figures sent",
                    time.time() - self.down_since,
                )
                self.down_since, backoff = None, self._min_backoff

    def _done(self, record: dict[str, Any]) -> None:
        with self._cond:
            self._in_flight = False
            if self._queue and self._queue[0] is record:
                self._queue.popleft()
            self._cond.notify_all()


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """-> (header, records) of a journal; a last line cut short by a crash is skipped."""
    from pocketgpt.errors import TrackingError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TrackingError(f"cannot read the tracking journal {path} ({e.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                log.warning("%s: skipped its last line, cut short", path)
                continue
            raise TrackingError(f"{path}:{n} is not a JSON record; is it a journal?") from None
    if not records or records[0].get("op") != "header" or "run_id" not in records[0]:
        raise TrackingError(
            f"{path} is not a pocketgpt tracking journal (no header line); expected the "
            f"{JOURNAL_NAME} of a run's output folder"
        )
    return records[0], records[1:]
