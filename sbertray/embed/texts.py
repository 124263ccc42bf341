"""Texts out of a unit's Arrow columns under the ``bad_input`` policies: every row that cannot be
embedded is counted by reason, and the first few are named by file, row and column."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from sbertray.config import EmbedConfig
from sbertray.embed.shards import WorkUnit

_MAX_ERRORS_SHOWN = 5


class BadRows:
    """The rows of one unit that cannot be embedded: counts by reason, the first few named."""

    def __init__(self, unit: WorkUnit):
        self.unit = unit
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def add(self, index: int, column: str, reason: str, value=None) -> None:
        self.counts[reason] += 1
        if len(self.examples) < _MAX_ERRORS_SHOWN:
            shown = "" if value is None else f" (got {value!r:.60})"
            self.examples.append(
                f"{self.unit.file.url}: row {self.unit.first_row + index}: column `{column}`: "
                f"{reason}{shown}"
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
    for unit in units:
        fs = storage.resolve(unit.file.url, config.storage).fs
        with fs.open_input_file(unit.file.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(unit.row_groups), columns=[column])
        needed = rows - len(texts)
        texts += [
            t for t in column_texts(table.slice(0, needed), column, config, BadRows(unit)) if t
        ]
        if len(texts) >= rows:
            break
    return texts
