"""Texts out of a unit's Arrow columns under the ``bad_input`` policies: every row that cannot be
embedded is counted by reason, and the first few are named by file, row and column."""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from sbertray.config import EmbedConfig
from sbertray.embed.shards import FileSlice, WorkUnit

_MAX_ERRORS_SHOWN = 5


class BadRows:
    """The rows of one unit that cannot be embedded: counts by reason (in all and per input
    file), the first few named by file and row. Row indexes run over ``slices`` in order."""

    def __init__(self, slices: Sequence[FileSlice]):
        self.slices = slices
        self.starts = [0]
        for piece in slices[:-1]:
            self.starts.append(self.starts[-1] + piece.num_rows)
        self.counts: Counter = Counter()
        self.by_file: dict[str, Counter] = {}
        self.examples: list[str] = []

    def add(self, index: int, column: str, reason: str, value=None) -> None:
        which = bisect_right(self.starts, index) - 1
        piece = self.slices[which]
        self.counts[reason] += 1
        self.by_file.setdefault(piece.file.rel, Counter())[reason] += 1
        if len(self.examples) < _MAX_ERRORS_SHOWN:
            shown = "" if value is None else f" (got {value!r:.60})"
            row = piece.first_row + index - self.starts[which]
            self.examples.append(f"{piece.file.url}: row {row}: column `{column}`: {reason}{shown}")

    def failure(self, config: EmbedConfig) -> str | None:
        """The error that fails the run, if a bad row's policy is `fail`, naming the first few."""
        policy = config.bad_input
        fails = self.counts["invalid UTF-8"] or (
            policy.on_null_text == "fail"
            and self.counts["null text"] + self.counts["non-string text"]
        )
        if not fails:
            return None
        return "bad rows (or set the `bad_input` policies to skip/replace):\n  " + "\n  ".join(
            self.examples
        )


def _decode(values: list, column: str, policy_utf8: str, bad: BadRows) -> list:
    """Binary values to str per the UTF-8 policy (a failed decode becomes None + a bad row)."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                if policy_utf8 == "replace":
                    v = v.decode("utf-8", errors="replace")
                else:
                    bad.add(i, column, "invalid UTF-8", v)
                    v = _INVALID
        out.append(v)
    return out


_INVALID = object()  # marks a value already counted as bad


def column_texts(table: pa.Table, column: str, config: EmbedConfig, bad: BadRows) -> list:
    """Python texts for one column; None where the row cannot be embedded (already counted)."""
    policy = config.bad_input
    arr = table.column(column).combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr.validate(full=True)
            values = arr.to_pylist()
        except pa.ArrowInvalid:  # invalid UTF-8 inside a string column: decode row by row
            values = _decode(
                arr.cast(pa.large_binary()).to_pylist(), column, policy.on_invalid_utf8, bad
            )
    elif pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        values = _decode(arr.to_pylist(), column, policy.on_invalid_utf8, bad)
    else:  # a non-text column (only reaches here with on_null_text skip/empty)
        values = [v if v is None else _NON_STRING for v in arr.to_pylist()]
    texts = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            texts.append(v)
        elif v is _INVALID:
            texts.append(None)
        elif policy.on_null_text == "empty":
            texts.append("")
        else:
            reason = "null text" if v is None else "non-string text"
            bad.add(i, column, reason)
            texts.append(None)
    return texts


_NON_STRING = object()


def sample_texts(config: EmbedConfig, units: list[WorkUnit], rows: int) -> list[str]:
    """Up to ``rows`` embeddable texts from the first units (estimates, int8 calibration)."""
    import pyarrow.parquet as pq

    from sbertray import storage

    column, texts = config.input.text_column, []
    for piece in (piece for unit in units for piece in unit.slices):
        fs = storage.resolve(piece.file.url, config.storage).fs
        with fs.open_input_file(piece.file.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(piece.row_groups), columns=[column])
        needed = rows - len(texts)
        texts += [
            t for t in column_texts(table.slice(0, needed), column, config, BadRows([piece])) if t
        ]
        if len(texts) >= rows:
            break
    return texts


def embeddable_texts(
    config: EmbedConfig, slices: Sequence[FileSlice], table: pa.Table
) -> tuple[list, list | None, np.ndarray, BadRows]:
    """A unit's texts and pair texts (None where bad), which rows are kept (both embeddable),
    and the bad rows found."""
    inp, bad = config.input, BadRows(slices)
    texts = column_texts(table, inp.text_column, config, bad)
    pairs = column_texts(table, inp.pair_column, config, bad) if inp.pair_column else None
    keep = np.array(
        [t is not None and (pairs is None or pairs[i] is not None) for i, t in enumerate(texts)],
        dtype=bool,
    )
    return texts, pairs, keep, bad
