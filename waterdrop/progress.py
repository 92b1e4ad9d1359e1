"""One progress line for every long step: done/total, rate, time left, failures so far.

On a terminal the line is redrawn in place (at most 4 times a second); when stderr goes to
a log file, a plain line is written every 10 seconds and once at the end, because a batch
job's log would turn carriage returns into one unreadable line. Every tool takes
``--quiet``, which sets :func:`set_quiet`; ``WATERDROP_QUIET=1`` does the same for library
use. Torch-free (the runtime uses it).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

_quiet = os.environ.get("WATERDROP_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress line of this process."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether progress lines are silenced (``--quiet``, ``WATERDROP_QUIET``)."""
    return _quiet


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Progress:
    """``with Progress("eval val", total=800) as bar: ... bar.update(16)``.

    Args:
        label: what is being done, first on the line.
        total: how many units in all, when known (then the line shows a share and time left).
        unit: what is counted (``images``, ``batches``, ``epochs``).
        quiet: None follows :func:`set_quiet`; the counts are kept either way.
        stream: where the line goes (stderr).
        announce: write a line when the step begins, also into a log file (a step that
            reports nothing until it ends); on a terminal the line is always drawn at once.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "images", quiet: bool | None = None,
                 stream: TextIO | None = None, announce: bool = False):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.quiet = _quiet if quiet is None else quiet
        self.terminal = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.every = 0.25 if self.terminal else 10.0
        self.done = self.failed = 0
        self.started = self.shown = time.perf_counter()
        self.closed, self.announce = False, announce

    def __enter__(self) -> Progress:
        if self.terminal or self.announce:
            self._show(self.started)
        return self

    def __exit__(self, error_type, *exc) -> None:
        if error_type is None:
            self.close()
        else:  # the step failed: its error says so, a final count would only hide it
            self.clear()
            self.closed = True

    def update(self, done: int = 1, failed: int = 0) -> None:
        """``done`` more units finished, ``failed`` of them (or others) could not be used."""
        self.done += done
        self.failed += failed
        now = time.perf_counter()
        if now - self.shown >= self.every:
            self.shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [self.label]
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit} ({self.done / self.total:.0%})")
        else:
            parts.append(f"{self.done} {self.unit}")
        slow = 0 < rate < 1  # "12.0 s per epoch" reads better than "0.1 epochs/s"
        parts.append(f"{1 / rate:.1f} s per {self.unit.rstrip('s')}" if slow else f"{rate:.1f} {self.unit}/s")
        parts.append(f"elapsed {clock(elapsed)}")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"left ~{clock((self.total - self.done) / rate)}")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return "  ".join(parts)

    def _show(self, now: float, final: bool = False) -> None:
        if self.quiet:
            return
        if self.terminal:
            self.stream.write("\r\033[K" + self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the redrawn line before other output is printed (a terminal only)."""
        if self.terminal and not self.quiet:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def close(self) -> None:
        """The final line (always written, unless quiet, so a log shows how long it took)."""
        if not self.closed:
            self.closed = True
            self._show(time.perf_counter(), final=True)
