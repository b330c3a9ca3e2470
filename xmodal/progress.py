"""Progress of slow work, on stderr only: a tqdm bar on a terminal, plain lines when stderr is piped.

One helper for every slow loop (extraction, augmented views, each method's fit and its epochs, sweeps,
predict), so the behaviour is the same everywhere:

* stderr is a terminal: a tqdm bar (nested bars for nested work);
* stderr is a pipe or a file: one line per step (``fit tip-adapter-f: epoch 3/20``), at most one every
  ``min_interval`` seconds for fast loops, the last step always;
* disabled (``--json`` sets ``enabled=False`` where progress would otherwise go to a terminal it shares):
  nothing at all. stdout is never written to.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

EpochHook = Callable[[int, int], None]  # (epochs done, total): what a trained method reports per epoch


class Progress:
    """A counter over ``total`` steps that reports itself; use as a context manager or call ``close``."""

    def __init__(self, total: int | None, desc: str, unit: str = "step", enabled: bool = True,
                 initial: int = 0, stream: TextIO | None = None, min_interval: float = 2.0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._bar: Any = None
        self._last_line = float("-inf")  # the first step always shows
        self._last_shown = -1
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False,
                             dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps done; ``note`` (e.g. ``epoch 3/20``) is shown beside the count."""
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        last = self.total is not None and self.n >= self.total
        if last or now - self._last_line >= self.min_interval:
            self._line(note)
            self._last_line = now

    def _line(self, note: str) -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        self.stream.write(f"{self.desc}: {count} {self.unit}{' · ' + note if note else ''}\n")
        self.stream.flush()
        self._last_shown = self.n

    def write(self, text: str) -> None:
        """A note line that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._last_shown and self.n > 0 and self.total is None:
            self._line("")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "step", enabled: bool = True, initial: int = 0,
             min_interval: float = 2.0) -> Progress:
    """A ``Progress`` on stderr (see the module docstring)."""
    return Progress(total, desc, unit=unit, enabled=enabled, initial=initial, min_interval=min_interval)


def epoch_reporter(desc: str, enabled: bool = True) -> tuple[EpochHook, Callable[[], None]]:
    """(hook, close) for a trained method's epochs: the bar is made on the first call, when the total is known."""
    holder: dict[str, Progress] = {}

    def hook(done: int, total: int) -> None:
        bar = holder.get("bar")
        if bar is not None and (done <= bar.n or total != bar.total):  # a new fit (next fold or stage) begins
            holder.pop("bar").close()
            bar = None
        if bar is None:
            bar = holder["bar"] = Progress(total, desc, unit="epoch", enabled=enabled)
        bar.update(done - bar.n)

    def close() -> None:
        if "bar" in holder:
            holder.pop("bar").close()

    return hook, close


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
