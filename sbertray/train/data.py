"""Validating sentence-pair training data, one batch of rows at a time.

Every row is checked before training starts. A bad row is an error naming the file, the row and
the field (``on_bad_row: fail``, the default), or is dropped and counted (``on_bad_row: skip``).
An empty string is valid text; null, non-string text and NaN/out-of-range labels are not.

``check_batch`` is the one place rows are judged: ``load_pairs`` (the dev set, ``evaluate``)
gathers its results in memory, ``prepare`` writes them to shards for the training workers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from sbertray import storage
from sbertray.config import PairDataConfig, StorageConfig
from sbertray.train.sources import DataError, Source, list_sources, read_batches

PAIR_SCHEMA = pa.schema(
    [("sentence_0", pa.string()), ("sentence_1", pa.string()), ("label", pa.float64())]
)
# Triplets (`columns.negative`) carry the hard negative as a third text; trainers read the text
# columns in order (anchor, positive, negative) and "label" by name.
TRIPLET_SCHEMA = pa.schema(
    [
        ("sentence_0", pa.string()),
        ("sentence_1", pa.string()),
        ("sentence_2", pa.string()),
        ("label", pa.float64()),
    ]
)
BELOW_MIN_LABEL = "label below min_label"  # a filtered row, not a bad one
# Text formats have a header line, so data row i sits on line i + 2 of the file.
_HEADER_LINES = {"csv": 1, "tsv": 1}
_MAX_ERRORS_SHOWN = 5


@dataclass(kw_only=True)
class RowCounts:
    """What validation dropped (``skipped``) and what a policy kept (``kept``), by reason."""

    skipped: Counter = field(default_factory=Counter)  # reason -> rows dropped
    kept: Counter = field(default_factory=Counter)  # reason -> odd rows a policy keeps

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(kw_only=True)
class PairData(RowCounts):
    """Validated pairs plus what was dropped on the way."""

    table: pa.Table  # pair_schema(spec)
    files: list[str]


@dataclass
class FileCheck(RowCounts):
    """What validating one file's batches found so far."""

    name: str
    rows: int = 0  # rows read, good or bad
    errors: list[str] = field(default_factory=list)  # the first few, with file, row and field
    label_range: tuple[float, float] | None = None  # of the numeric labels seen, for the hint

    def bad_rows_error(self, spec: PairDataConfig) -> DataError | None:
        """The ``on_bad_row: fail`` error for this file, or None when it had no bad row."""
        if not self.errors or spec.on_bad_row != "fail":
            return None
        total = self.num_skipped - self.skipped[BELOW_MIN_LABEL]
        more = f"\n  ... and {total - len(self.errors)} more" if total > len(self.errors) else ""
        return DataError(
            f"{total} bad row(s); {_bad_row_hint(self, spec)}:\n  "
            + "\n  ".join(self.errors)
            + more
        )


def _record_to_text(value: dict, spec: PairDataConfig) -> str:
    if spec.record_text == "json":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if spec.record_text == "template":
        return spec.record_template.format(**value)  # type: ignore[union-attr]
    return str(value)


class _RowChecker:
    """Validates and converts rows one at a time, counting into a ``FileCheck``."""

    def __init__(self, spec: PairDataConfig, check: FileCheck, fmt: str, first_row: int):
        self.spec, self.check, self.first_row = spec, check, first_row
        self.header_lines = _HEADER_LINES.get(fmt)

    def where(self, row: int) -> str:
        line = f" (line {row + 1 + self.header_lines})" if self.header_lines else ""
        return f"{self.check.name}: row {row}{line}"

    def bad(self, row: int, fieldname: str, reason: str, value) -> None:
        self.check.skipped[reason] += 1
        if len(self.check.errors) < _MAX_ERRORS_SHOWN:
            self.check.errors.append(
                f"{self.where(self.first_row + row)}: field `{fieldname}`: {reason} "
                f"(got {value!r:.80})"
            )

    def text(self, row: int, fieldname: str, value) -> str | None:
        if isinstance(value, str):
            if not value.strip():
                if self.spec.empty_text == "keep":
                    self.check.kept["empty text"] += 1
                    return value
                self.bad(row, fieldname, "empty text", value)
                return None
            return value
        if isinstance(value, dict):
            try:
                return _record_to_text(value, self.spec)
            except (KeyError, IndexError, ValueError) as exc:
                self.bad(row, fieldname, f"record_template does not fit the record ({exc})", value)
                return None
        self.bad(row, fieldname, "null text" if value is None else "text is not a string", value)
        return None

    def label(self, row: int, fieldname: str, value) -> float | None:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                self.bad(row, fieldname, "label is not a number", value)
                return None
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(
                row, fieldname, "null label" if value is None else "label is not a number", value
            )
            return None
        _widen(self.check, float(value))
        scaled = float(value) * self.spec.label_scale
        if math.isnan(scaled):
            self.bad(row, fieldname, "label is NaN", value)
            return None
        if not 0.0 <= scaled <= 1.0:
            reason = f"label outside 0..1 after label_scale={self.spec.label_scale}"
            self.bad(row, fieldname, reason, value)
            return None
        return scaled


def _widen(check: FileCheck, value: float) -> None:
    if math.isnan(value):
        return
    low, high = check.label_range or (value, value)
    check.label_range = (min(low, value), max(high, value))


def pair_schema(spec: PairDataConfig) -> pa.Schema:
    """The validated rows' schema: pairs, or triplets when the spec names a negative."""
    return TRIPLET_SCHEMA if spec.columns.negative else PAIR_SCHEMA


def _wanted_columns(spec: PairDataConfig) -> dict[str, str]:
    """Output column -> the file's column, texts first (in the output schema's order)."""
    cols = spec.columns
    wanted = {"sentence_0": cols.sentence_0, "sentence_1": cols.sentence_1}
    if cols.negative:
        wanted["sentence_2"] = cols.negative
    return wanted | ({"label": cols.label} if cols.label else {})


def check_batch(
    columns: dict[str, list | pa.Array], spec: PairDataConfig, check: FileCheck, fmt: str
) -> pa.Table:
    """The batch's good rows as a ``pair_schema(spec)`` table; bad, kept and filtered
    (``min_label``) rows are counted into ``check`` (whose ``rows`` says where the batch starts
    in its file). A file without labels (``columns.label: null``) gets 1.0: every pair a positive.

    Raises:
        DataError: a column the spec names is missing.
    """
    wanted = _wanted_columns(spec)
    missing = [f"`{src}` (for {dst})" for dst, src in wanted.items() if src not in columns]
    if missing:
        raise DataError(
            f"{check.name}: missing column {', '.join(missing)}; the file has {list(columns)}. "
            "Name yours: in a recipe under `columns:` (sentence_0, sentence_1, label, negative), "
            "or with `sbertray evaluate ... --sentence-0 COL --sentence-1 COL --label COL`"
        )
    texts = [columns[src] for dst, src in wanted.items() if dst != "label"]
    labels = columns[spec.columns.label] if spec.columns.label else pa.repeat(1.0, len(texts[0]))
    good = _all_good(texts, labels, spec, check)
    if good is None:
        good = _check_rows(texts, labels, spec, check, fmt)
    check.rows += len(texts[0])
    return _at_least_min_label(good, spec, check)


def _at_least_min_label(table: pa.Table, spec: PairDataConfig, check: FileCheck) -> pa.Table:
    if spec.min_label is None:
        return table
    kept = table.filter(pc.greater_equal(table.column("label"), spec.min_label))
    if dropped := table.num_rows - kept.num_rows:
        check.skipped[BELOW_MIN_LABEL] += dropped
    return kept


def _all_good(texts: list, labels, spec: PairDataConfig, check: FileCheck) -> pa.Table | None:
    """The whole batch as a table when Arrow's kernels show every row is good, else None (the
    row-by-row path then names the bad ones). A hundred times faster than judging each row in
    Python, which at ten million pairs is minutes of the plan."""
    if not all(isinstance(c, pa.Array) for c in (*texts, labels)):
        return None
    checked = []
    for column in texts:
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            return None
        column = column.cast(pa.string())
        if column.null_count:
            return None
        if spec.empty_text != "keep" and pc.any(_blank(column)).as_py():
            return None
        checked.append(column)
    try:
        values = labels.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    schema = pair_schema(spec)
    if values.null_count or pa.types.is_boolean(labels.type) or len(values) == 0:
        return None if len(values) else schema.empty_table()
    scaled = pc.multiply(values, spec.label_scale) if spec.columns.label else values
    in_range = pc.and_(pc.greater_equal(scaled, 0.0), pc.less_equal(scaled, 1.0))
    if not pc.all(in_range).as_py():  # NaN compares false, so it fails here too
        return None
    low, high = pc.min_max(values).values()
    _widen(check, low.as_py())
    _widen(check, high.as_py())
    if spec.empty_text == "keep":  # counted per field, as the row-by-row path does
        blanks = sum(pc.sum(_blank(t)).as_py() or 0 for t in checked)
        if blanks:
            check.kept["empty text"] += blanks
    return pa.Table.from_arrays([*checked, scaled], schema=schema)


def _blank(column: pa.Array) -> pa.Array:
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)


def _check_rows(texts: list, labels, spec: PairDataConfig, check: FileCheck, fmt: str) -> pa.Table:
    as_list = [c.to_pylist() if isinstance(c, pa.Array) else c for c in (*texts, labels)]
    checker = _RowChecker(spec, check, fmt, check.rows)
    schema = pair_schema(spec)
    fields = [src for dst, src in _wanted_columns(spec).items() if dst != "label"]
    out: list[list] = [[] for _ in schema]
    for i, (*row_texts, y) in enumerate(zip(*as_list, strict=True)):
        row = [checker.text(i, name, t) for name, t in zip(fields, row_texts, strict=True)]
        row.append(checker.label(i, spec.columns.label, y) if spec.columns.label else 1.0)
        if any(value is None for value in row):
            continue
        for column, value in zip(out, row, strict=True):
            column.append(value)
    arrays = [pa.array(column, f.type) for column, f in zip(out, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _bad_row_hint(check: FileCheck, spec: PairDataConfig) -> str:
    """What to do about the bad rows, naming the recipe key and the `evaluate` flag."""
    if check.skipped[f"label outside 0..1 after label_scale={spec.label_scale}"]:
        low, high = check.label_range or (0.0, 0.0)
        if high > 1 and low >= 0:
            scale = f"{1 / math.ceil(high):g}"
            return (
                f"the labels run up to {high:g}, so they look like a 0..{math.ceil(high)} "
                f"scale: scale them to 0..1 with `label_scale: {scale}` in a recipe, or "
                f"`sbertray evaluate ... --label-scale {scale}`"
            )
    hint = (
        "; if empty sentences are meant: `empty_text: keep` in a recipe, `--empty-text keep` "
        "for evaluate"
        if check.skipped["empty text"]
        else ""
    )
    return (
        "fix them, or skip them with `on_bad_row: skip` in a recipe or "
        f"`sbertray evaluate ... --on-bad-row skip`{hint}"
    )


def check_file(
    source: Source, spec: PairDataConfig, storage_config: StorageConfig | None, check: FileCheck
) -> Iterator[pa.Table]:
    """The good rows of each batch of ``source``; what was dropped is counted into ``check``.

    Raises:
        DataError: the file is unreadable or lacks a column, or (``on_bad_row: fail``) once the
            whole file is read, its bad rows.
    """
    for columns in read_batches(source, storage_config):
        yield check_batch(columns, spec, check, source.format)
    if error := check.bad_rows_error(spec):
        raise error


def skipped_text(counts: RowCounts) -> str:
    """``N rows (n1 reason1, n2 reason2)``: what validation and ``min_label`` dropped."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.skipped.most_common())
    return f"{counts.num_skipped} rows ({reasons})"


def no_rows_error(path: str, counts: RowCounts) -> DataError:
    reason = f" (skipped {skipped_text(counts)})" if counts.num_skipped else ""
    return DataError(f"{storage.redact(path)}: no usable rows{reason}")


def load_pairs(spec: PairDataConfig, storage_config: StorageConfig | None = None) -> PairData:
    """Reads, maps, validates and scales the pairs ``spec`` points at, into memory (the dev
    set, ``evaluate``; training streams instead, see ``prepare``).

    Raises:
        DataError: unreadable file, missing column, bad row (with ``on_bad_row: fail``), or no
            rows left.
    """
    tables, data = [], PairData(table=pair_schema(spec).empty_table(), files=[])
    for source in list_sources(spec, storage_config):
        check = FileCheck(source.name)
        tables.extend(check_file(source, spec, storage_config, check))
        data.skipped.update(check.skipped)
        data.kept.update(check.kept)
        data.files.append(source.name)
    table = pa.concat_tables(tables) if tables else pair_schema(spec).empty_table()
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    if table.num_rows == 0:
        raise no_rows_error(spec.path, data)
    data.table = table
    return data
