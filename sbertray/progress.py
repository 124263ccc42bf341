"""Progress of a long job, from the workers' real counts: a bar on a terminal, and off a
terminal (``ray job submit`` logs, CI, cron) one line every ``SBERTRAY_PROGRESS_EVERY_S``
seconds (default 10) with the same figures."""

from __future__ import annotations

import os
import time

from sbertray.console import console_stream

EVERY_ENV = "SBERTRAY_PROGRESS_EVERY_S"
_DEFAULT_EVERY_S = 10.0


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"3m07s"``, ``"2h05m"``."""
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts ``rows`` toward ``total`` (plus bad rows) and shows rate and ETA."""

    def __init__(self, total: int, *, what: str = "rows", stream=None):
        self.total, self.what = total, what
        self.done = self.bad = 0
        self.started = self._last = time.monotonic()
        self.stream = stream or console_stream()
        self.every_s = float(os.environ.get(EVERY_ENV) or _DEFAULT_EVERY_S)
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=" " + what, file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = format_duration(eta) if eta == eta else "?"
        return (
            f"[sbertray] {self.done:,}/{self.total:,} {self.what} ({pct:.0f}%), "
            f"{rate:,.1f} {self.what}/s, ETA {eta_text}, bad {self.bad:,}"
        )

    def update(self, rows: int, bad: int = 0) -> None:
        self.done += rows
        self.bad += bad
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix(bad=self.bad, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.line(), file=self.stream, flush=True)
