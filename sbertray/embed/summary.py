"""What an embed run reports: its summary (the closing line, the CLI's and jobs' return value)
and the clock of its phases, both recorded in the manifest."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from sbertray import storage
from sbertray.report import REPORT_DIR, REPORT_MD, format_rate, plural


@dataclass
class EmbedSummary:
    output_url: str  # the Parquet prefix or the Lance dataset
    records_url: str  # where the manifest and report are (the Lance dataset's `_sbertray`)
    input_files: int
    input_rows: int
    output_rows: int
    bad_rows: int
    bad_files: list[str]
    truncated: int
    seconds: float
    skipped_units: int = 0  # committed by an earlier run (resume / incremental)
    units_written: int = 0  # units this run embedded and committed
    embedded_rows: int = 0  # rows this run wrote (output_rows counts earlier runs' too)
    reused_rows: int = 0  # of those, rows whose vectors were copied from earlier output
    texts_embedded: int = 0  # distinct texts this run ran the model on
    superseded_parts: int = 0  # outputs of changed input files that no longer exist, removed
    orphaned_parts: int = 0  # outputs of deleted input files, removed
    retried_units: int = 0  # units run again after their actor or node was lost for good
    units_span_s: float = 0.0  # this run's first unit started to its last committed
    phases: dict = field(default_factory=dict)  # seconds in plan, embed, commit, report

    @property
    def rows_per_s(self) -> float:
        return self.embedded_rows / self.seconds if self.seconds else 0.0

    def closing_line(self) -> str:
        bad_files = f", {plural(len(self.bad_files), 'bad file')} skipped" if self.bad_files else ""
        resumed = (
            f" ({plural(self.skipped_units, 'unit')} already committed earlier)"
            if self.skipped_units
            else ""
        )
        copied = self.embedded_rows - self.texts_embedded
        model_runs = (
            f" ({self.texts_embedded:,} texts through the model, the other {copied:,} rows' "
            f"vectors copied: {self.reused_rows:,} from earlier output, "
            f"{copied - self.reused_rows:,} repeated texts)"
            if copied
            else ""
        )
        return (
            f"[sbertray] embedded {format_rate(self.embedded_rows, self.seconds)}{model_runs} from "
            f"{plural(self.input_files, 'file')}; bad rows: {self.bad_rows}{bad_files}; truncated: "
            f"{self.truncated}; output: {self.output_url}{resumed}; report: "
            f"{storage.join(self.records_url, REPORT_DIR, REPORT_MD)}"
        )


def units_span(results: Iterable) -> float:
    """Seconds from the first of ``results`` starting to the last one committing (0 if none)."""
    timed = [(r.finished_at - r.seconds, r.finished_at) for r in results if r.finished_at]
    return round(max(e for _, e in timed) - min(s for s, _ in timed), 2) if timed else 0.0


class PhaseClock:
    """Seconds spent in each phase of a run (the manifest's ``timings.phases``)."""

    def __init__(self) -> None:
        self.started = self._last = time.time()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """Ends ``phase`` now; it began where the previous one ended."""
        now = time.time()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._last, 2)
        self._last = now

    def elapsed(self) -> float:
        return round(time.time() - self.started, 2)

    def describe(self) -> str:
        return "time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
