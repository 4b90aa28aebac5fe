"""Progress display: a one-line bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

MODES = ("auto", "bar", "log", "none")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Shows images done/total, images/s, errors and ETA.

    Args:
        mode: "bar" (redrawn line), "log" (a line every ``log_interval_s``),
            "none", or "auto" (bar on a terminal, else log).
        log_interval_s: seconds between log lines.
        skipped: inputs already done by an earlier run (shown, not counted in the rate).
        stream: where to write (stderr by default, so stdout stays for data).
    """

    def __init__(self, mode: str, log_interval_s: float = 10.0, skipped: int = 0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.log_interval_s = log_interval_s
        self.skipped = skipped
        self.t0 = time.perf_counter()
        self._last_draw = self.t0  # first line after one interval: short jobs print only the summary
        self._last_line = ""

    def update(self, ok: int, errors: int, total: int | None) -> None:
        """New counts arrived."""
        self.tick(ok, errors, total)

    def tick(self, ok: int, errors: int, total: int | None) -> None:
        """Redraw if it is time to."""
        now = time.perf_counter()
        interval = 0.2 if self.mode == "bar" else self.log_interval_s
        if self.mode == "none" or now - self._last_draw < interval:
            return
        self._last_draw = now
        self._draw(self.line(ok, errors, total, now - self.t0))

    def line(self, ok: int, errors: int, total: int | None, elapsed_s: float) -> str:
        done = ok + errors
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        if total:
            frac = min(1.0, done / total)
            width = 24
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            eta = _fmt_duration((total - done) / rate) if rate > 0 else "?"
            head = f"[{bar}] {done}/{total} {frac:4.0%}"
        else:
            head, eta = f"{done}/?", "?"
        resumed = f" (+{self.skipped} done earlier)" if self.skipped else ""
        return (f"{head}{resumed} | {rate:6.1f} img/s | errors {errors} | "
                f"elapsed {_fmt_duration(elapsed_s)} | ETA {eta}")

    def _draw(self, line: str) -> None:
        if self.mode == "bar":
            pad = max(0, len(self._last_line) - len(line))
            self._write("\r" + line + " " * pad)
        else:
            self._write(line + "\n")
        self._last_line = line

    def _write(self, text: str) -> None:
        """Write and flush; when the stream is gone (its reader exited: EPIPE; the terminal hung
        up: EIO), stop drawing. Progress is for watching: losing the watcher must not end the job."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.mode = "none"

    def finish(self, ok: int, errors: int, total: int | None) -> None:
        """Draw the final state of the bar (log mode leaves that to the summary)."""
        if self.mode == "bar":
            self._draw(self.line(ok, errors, total, time.perf_counter() - self.t0))

    def close(self) -> None:
        """End the bar's line. Safe to call twice."""
        if self.mode == "bar" and self._last_line:
            self._write("\n")
            self._last_line = ""

