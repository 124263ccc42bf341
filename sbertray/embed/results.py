"""What one work unit did: the stage returns it, its output footer records it, and the driver
adds them up into the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field

from sbertray.embed.shards import WorkUnit


@dataclass
class UnitResult:
    """What one work unit did, as the stage returns it and its output footer records it."""

    unit_id: str
    rows_in: int
    rows_out: int = 0
    rows_dropped: int = 0  # rows skipped as bad (+ rows_out + bad files' rows == rows_in)
    bad_rows: dict = field(default_factory=dict)  # reason -> count (a row may have two)
    bad_examples: list = field(default_factory=list)  # the first skipped rows: file, row, reason
    # Per input file (relative path): rows_out, rows_dropped and bad_rows by reason.
    files: dict = field(default_factory=dict)
    bad_files: dict = field(default_factory=dict)  # unreadable input files -> message
    truncated: int = 0  # among the texts embedded (copied vectors were counted when embedded)
    rows_reused: int = 0  # rows whose computed columns were copied from an earlier output row
    rows_embedded: int = 0  # distinct texts embedded (a text repeated in the unit counts once)
    output: str | None = None  # relative output path once committed
    run_id: str = ""  # the run that wrote ``output`` (a Lance table keys its rows by both)
    error: str | None = None  # bad rows whose policy is fail (unreadable files: bad_files)
    seconds: float = 0.0
    finished_at: float = 0.0  # unix time the unit was committed (throughput over time)
    attempt: int = 1  # the round that committed it (> 1: its actor or node was lost before)

    def footer_record(self, unit: WorkUnit) -> dict:
        """What the output footer says of the unit it completes (read back on reruns)."""
        return {
            "unit_id": unit.unit_id,
            "inputs": unit.inputs,
            "rows_in": unit.num_rows,
            "files": self.files,
            "bad_files": self.bad_files,
            "rows_dropped": self.rows_dropped,
            "bad_rows": self.bad_rows,
            "truncated": self.truncated,
            "rows_reused": self.rows_reused,
            "rows_embedded": self.rows_embedded,
        }
