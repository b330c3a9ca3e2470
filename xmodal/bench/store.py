"""Append-only JSONL result store: one row per (method, backbone, dataset, shots, seed, identity,
method_config).

``identity`` is a digest of everything else that determines a row (backbone fingerprint, dataset content,
extraction options; see ``provenance.result_identity``), so a row is only ever found again by a request
made with the same weights, data and options; ``method_config`` is a digest of the method's parameters
(``provenance.method_config``), so a row made with other method settings is not found either. Rows
without them (older files) have "" and are never matched by a sweep.

* Each row is written with a single ``write`` of one complete line, then flushed and fsync'ed, under
  an advisory file lock, so a finished row survives a crash and two writers never interleave.
* Every row read is checked (``rowcheck.row_problem``: types, finite values, ``top1`` in [0, 100]); a bad row
  is left in the file, named by file and line in a warning, and never reused or shown.
* Opening the store reads every row; a torn last line (a process killed mid-write) is detected and
  cut off, so the file is valid JSONL again before anything new is appended.
* ``has(key)`` / ``done_keys()`` let a sweep skip rows already present, so it resumes where it stopped.
"""
from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from ..jsonio import dumps
from .rowcheck import row_problem

try:  # POSIX advisory locking; absent on Windows, where appends are still single writes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

KEY_FIELDS = ("method", "backbone", "dataset", "shots", "seed")  # required; "identity" is optional ("")

RowKey = tuple[str, str, str, int, int, str, str]


def row_key(row: dict[str, Any]) -> RowKey:
    """The key of a result row; a store holds at most one row per key."""
    if not isinstance(row, dict):
        raise TypeError(f"a result row is a JSON object, got {type(row).__name__}")
    missing = [f for f in KEY_FIELDS if f not in row]
    if missing:
        raise KeyError(f"result row lacks key field(s) {missing}; a row needs {KEY_FIELDS}")
    return (str(row["method"]), str(row["backbone"]), str(row["dataset"]), int(row["shots"]), int(row["seed"]),
            str(row.get("identity") or ""), str(row.get("method_config") or ""))


class ResultStore:
    """Rows of one results file (``results.jsonl``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.repaired: str | None = None  # what was done to a torn tail (None: nothing to repair)
        self.skipped_lines: list[int] = []  # 1-based numbers of unparsable or invalid lines (left in the file)
        self.problems: list[str] = []  # "FILE:LINE: what is wrong", one per skipped line
        self._rows: list[dict[str, Any]] = []
        self._index: dict[RowKey, int] = {}
        self._size = 0  # bytes of the file already parsed (always ends on a line boundary)
        self._lines = 0
        if self.path.exists():
            try:
                with self._locked("r+b") as fh:
                    self._catch_up(fh, repair=True)
            except PermissionError:  # a read-only results file: skip a torn tail instead of repairing it
                with open(self.path, "rb") as fh:
                    self._catch_up(fh, repair=False)
        if self.skipped_lines:
            more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
            warnings.warn(f"ignored {len(self.skipped_lines)} unreadable or invalid result row(s), left in the file: "
                          f"{'; '.join(self.problems[:3])}{more}", stacklevel=2)

    # ----- reading ----------------------------------------------------------------------
    def _catch_up(self, fh, repair: bool) -> None:
        """Parse what other writers appended since we last looked; repair a torn tail (lock held)."""
        end = fh.seek(0, os.SEEK_END)
        if end < self._size:  # replaced or truncated behind our back: start over
            self._rows, self._index, self._size, self._lines = [], {}, 0, 0
        if end == self._size:
            return
        fh.seek(self._size)
        data = fh.read(end - self._size)
        complete = data.rfind(b"\n") + 1
        tail = data[complete:]
        if tail and repair and self._repair_tail(fh, tail, cut_at=self._size + complete):
            data += b"\n"  # the tail was a whole row that only lacked its newline: keep it
            complete = len(data)
        for raw in data[:complete].split(b"\n")[:-1]:
            self._lines += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                problem = row_problem(row)
                key = row_key(row) if problem is None else None
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"not a JSON result row ({type(exc).__name__}: {exc})"
            if problem is not None:
                self.skipped_lines.append(self._lines)
                self.problems.append(f"{self.path}:{self._lines}: {problem}")
                continue
            if key in self._index:  # a duplicate (should not happen with locking): the first one wins
                continue
            self._index[key] = len(self._rows)
            self._rows.append(row)
        self._size = fh.seek(0, os.SEEK_END) if repair else self._size + complete

    def _repair_tail(self, fh, tail: bytes, cut_at: int) -> bool:
        """A file that does not end with a newline was torn by a writer killed mid-line.

        A tail that is nevertheless a complete row gets its newline back (returns True); otherwise
        it is cut off (returns False).
        """
        try:
            row_key(json.loads(tail))
        except (ValueError, KeyError, TypeError):
            fh.truncate(cut_at)
            _fsync(fh)
            self.repaired = f"removed a torn last line of {len(tail)} bytes"
            warnings.warn(f"{self.path}: {self.repaired} (a run was interrupted mid-write)", stacklevel=4)
            return False
        fh.seek(0, os.SEEK_END)
        fh.write(b"\n")
        _fsync(fh)
        self.repaired = "added the missing newline after the last row"
        return True

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def has(self, key: RowKey) -> bool:
        return key in self._index

    def get(self, key: RowKey) -> dict[str, Any] | None:
        i = self._index.get(key)
        return None if i is None else self._rows[i]

    def done_keys(self) -> set[RowKey]:
        return set(self._index)

    # ----- writing ----------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> bool:
        """Write one row durably. Returns False (and writes nothing) if its key is already stored."""
        key = row_key(row)
        problem = row_problem(row)
        if problem is not None:  # never write a row that a reader would refuse
            raise ValueError(f"refusing to store a result row for {self.path}: {problem}")
        if key in self._index:
            return False
        line = (dumps(row, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked("a+b") as fh:  # "a": every write lands at the end, whatever the position
            self._catch_up(fh, repair=True)  # rows another process appended meanwhile, a torn tail
            if key in self._index:
                return False
            start = fh.seek(0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:  # one write() almost always suffices; loop in case of a short write
                    written = fh.write(view)
                    if not written:  # never spin: a device that accepts nothing is full
                        raise OSError(errno.ENOSPC, "no bytes written (disk full?)", str(self.path))
                    view = view[written:]
                _fsync(fh)
            except BaseException:  # disk full, interrupted: leave no partial line behind
                try:
                    fh.truncate(start)
                    _fsync(fh)
                except OSError:
                    pass  # the next open cuts the torn tail instead
                raise
            self._size = fh.seek(0, os.SEEK_END)
        self._lines += 1
        self._index[key] = len(self._rows)
        self._rows.append(json.loads(line))  # exactly what a later reader will see
        return True

    def extend(self, rows: Iterable[dict[str, Any]]) -> int:
        return sum(self.append(r) for r in rows)

    # ----- helpers ----------------------------------------------------------------------
    def _locked(self, mode: str):
        return _LockedFile(self.path, mode)


class _LockedFile:
    def __init__(self, path: Path, mode: str) -> None:
        self.path, self.mode = path, mode

    def __enter__(self):
        self.fh = open(self.path, self.mode, buffering=0)
        if fcntl is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self.fh

    def __exit__(self, *exc) -> None:
        try:
            if fcntl is not None:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        finally:
            self.fh.close()


def _fsync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a results file (torn tail repaired, duplicates dropped)."""
    return ResultStore(path).rows
