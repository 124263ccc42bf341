"""Reading and validating sentence-pair training data.

Every row is checked before training starts. A bad row is an error naming the file, the row and
the field (``on_bad_row: fail``, the default), or is dropped and counted (``on_bad_row: skip``).
An empty string is valid text; null, non-string text and NaN/out-of-range labels are not.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import PairDataConfig, StorageConfig
from sbertray.errors import UserError

PAIR_SCHEMA = pa.schema(
    [("sentence_0", pa.string()), ("sentence_1", pa.string()), ("label", pa.float64())]
)

_FORMAT_BY_SUFFIX = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
# Text formats have a header line, so data row i sits on line i + 2 of the file.
_HEADER_LINES = {"csv": 1, "tsv": 1}
_MAX_ERRORS_SHOWN = 5


class DataError(UserError, ValueError):
    """Input data is unusable; the message names the file, and the row and field where known."""


@dataclass
class PairData:
    """Validated pairs plus what was dropped on the way."""

    table: pa.Table  # PAIR_SCHEMA
    files: list[str]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows dropped
    kept: Counter = field(default_factory=Counter)  # reason -> odd rows a policy keeps

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def _detect_format(name: str) -> str:
    for suffix, fmt in _FORMAT_BY_SUFFIX.items():
        if name.lower().endswith(suffix):
            return fmt
    raise DataError(
        f"{name}: cannot tell the file format from its name; set `format` "
        f"(one of {sorted(set(_FORMAT_BY_SUFFIX.values()))})"
    )


def _is_datasets_dir(loc: storage.Location) -> bool:
    return storage.exists(loc.child("dataset_info.json")) or storage.exists(loc.child("state.json"))


def _read_text_table(raw: bytes, fmt: str, name: str) -> pa.Table:
    """CSV/TSV with every column read as a string, so a bad label is reported per row instead
    of failing the whole file's type inference. TSV has no quoting (STS-B sentences contain
    bare double quotes that a quoting parser would swallow, losing rows)."""
    delimiter = "\t" if fmt == "tsv" else ","
    first_line = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    if fmt == "tsv":
        header = first_line.split("\t")
    else:
        header = next(csv.reader(io.StringIO(first_line)))
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if fmt == "tsv" else '"')
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=False
    )
    return pacsv.read_csv(pa.BufferReader(raw), parse_options=parse, convert_options=convert)


def _read_jsonl(raw: bytes, name: str) -> dict[str, list]:
    """JSON lines parsed row by row: Arrow's reader needs one type per column, so a single
    mistyped value would fail the whole file instead of being reported (or skipped) as a row."""
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {lineno}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise DataError(
                f"{name}: line {lineno}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def _read_file(loc: storage.Location, fmt: str) -> dict[str, list]:
    name = storage.redact(loc.url)
    try:
        if fmt == "parquet":
            with loc.fs.open_input_file(loc.path) as f:
                return pq.read_table(f).to_pydict()
        raw = storage.read_bytes(loc)
        if fmt == "jsonl":
            return _read_jsonl(raw, name)
        return _read_text_table(raw, fmt, name).to_pydict()
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: cannot read as {fmt}: {exc}") from exc


def _read_datasets_dir(loc: storage.Location) -> dict[str, list]:
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        local = loc.path if loc.is_local else str(storage.download_dir(loc, tmp))
        try:
            ds = datasets.load_from_disk(local)
        except Exception as exc:  # datasets raises several unrelated types for a bad directory
            raise DataError(
                f"{storage.redact(loc.url)}: cannot load `datasets` directory: {exc}"
            ) from exc
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(
                f"{storage.redact(loc.url)}: is a DatasetDict with splits {list(ds)}; "
                "point `path` at one split's directory"
            )
        return ds.data.table.to_pydict()


def _record_to_text(value: dict, spec: PairDataConfig) -> str:
    if spec.record_text == "json":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if spec.record_text == "template":
        return spec.record_template.format(**value)  # type: ignore[union-attr]
    return str(value)


class _RowChecker:
    """Validates and converts rows of one file, collecting or raising errors."""

    def __init__(self, spec: PairDataConfig, name: str, fmt: str):
        self.spec, self.name = spec, name
        self.header_lines = _HEADER_LINES.get(fmt)
        self.skipped: Counter = Counter()
        self.kept: Counter = Counter()
        self.errors: list[str] = []

    def where(self, row: int) -> str:
        line = f" (line {row + 1 + self.header_lines})" if self.header_lines else ""
        return f"{self.name}: row {row}{line}"

    def bad(self, row: int, fieldname: str, reason: str, value) -> None:
        self.skipped[reason] += 1
        if len(self.errors) < _MAX_ERRORS_SHOWN:
            self.errors.append(
                f"{self.where(row)}: field `{fieldname}`: {reason} (got {value!r:.80})"
            )

    def text(self, row: int, fieldname: str, value) -> str | None:
        if isinstance(value, str):
            if not value.strip():
                if self.spec.empty_text == "keep":
                    self.kept["empty text"] += 1
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
        scaled = float(value) * self.spec.label_scale
        if math.isnan(scaled):
            self.bad(row, fieldname, "label is NaN", value)
            return None
        if not 0.0 <= scaled <= 1.0:
            self.bad(
                row,
                fieldname,
                f"label outside 0..1 after label_scale={self.spec.label_scale}",
                value,
            )
            return None
        return scaled


def _validate(
    columns: dict[str, list], spec: PairDataConfig, name: str, fmt: str
) -> tuple[pa.Table, Counter]:
    cols = spec.columns
    wanted = {"sentence_0": cols.sentence_0, "sentence_1": cols.sentence_1, "label": cols.label}
    missing = [f"`{src}` (for {dst})" for dst, src in wanted.items() if src not in columns]
    if missing:
        raise DataError(
            f"{name}: missing column {', '.join(missing)}; the file has {list(columns)}. "
            "Name yours: in a recipe under `columns:` (sentence_0, sentence_1, label), or with "
            "`sbertray evaluate ... --sentence-0 COL --sentence-1 COL --label COL`"
        )
    checker = _RowChecker(spec, name, fmt)
    s0, s1, labels = columns[cols.sentence_0], columns[cols.sentence_1], columns[cols.label]
    out0, out1, outl = [], [], []
    for i, (a, b, y) in enumerate(zip(s0, s1, labels, strict=True)):
        ta = checker.text(i, cols.sentence_0, a)
        tb = checker.text(i, cols.sentence_1, b)
        ty = checker.label(i, cols.label, y)
        if ta is None or tb is None or ty is None:
            continue
        out0.append(ta)
        out1.append(tb)
        outl.append(ty)
    if checker.errors and spec.on_bad_row == "fail":
        total = sum(checker.skipped.values())
        more = (
            f"\n  ... and {total - len(checker.errors)} more" if total > len(checker.errors) else ""
        )
        raise DataError(
            f"{total} bad row(s); {_bad_row_hint(checker.skipped, labels, spec)}:\n  "
            + "\n  ".join(checker.errors)
            + more
        )
    good = pa.Table.from_pydict(
        {"sentence_0": out0, "sentence_1": out1, "label": outl}, schema=PAIR_SCHEMA
    )
    return good, checker.skipped, checker.kept


def _bad_row_hint(skipped: Counter, labels: list, spec: PairDataConfig) -> str:
    """What to do about the bad rows, naming the recipe key and the `evaluate` flag."""
    if skipped[f"label outside 0..1 after label_scale={spec.label_scale}"]:
        numbers = [float(v) for v in labels if _is_number(v)]
        top = max(numbers, default=0.0)
        if top > 1 and min(numbers) >= 0:
            scale = f"{1 / math.ceil(top):g}"
            return (
                f"the labels run up to {top:g}, so they look like a 0..{math.ceil(top)} scale: "
                f"scale them to 0..1 with `label_scale: {scale}` in a recipe, or "
                f"`sbertray evaluate ... --label-scale {scale}`"
            )
    hint = (
        "; if empty sentences are meant: `empty_text: keep` in a recipe, `--empty-text keep` "
        "for evaluate"
        if skipped["empty text"]
        else ""
    )
    return (
        "fix them, or skip them with `on_bad_row: skip` in a recipe or "
        f"`sbertray evaluate ... --on-bad-row skip`{hint}"
    )


def _is_number(value) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def load_pairs(spec: PairDataConfig, storage_config: StorageConfig | None = None) -> PairData:
    """Reads, maps, validates and scales the pairs ``spec`` points at.

    Raises:
        DataError: unreadable file, missing column, bad row (with ``on_bad_row: fail``), or no
            rows left.
    """
    loc = storage.resolve(spec.path, storage_config)
    shown = storage.redact(spec.path)
    if not storage.exists(loc):
        raise DataError(f"{shown}: no such file or directory{storage.relative_note(spec.path)}")
    if spec.format == "datasets" or (spec.format == "auto" and _is_datasets_dir(loc)):
        sources = [(loc, "datasets")]
    elif storage.file_info(loc).type == storage.pafs.FileType.Directory:
        infos = storage.list_files(loc)
        fmt_of = (lambda p: spec.format) if spec.format != "auto" else _detect_format
        sources = []
        for info in infos:
            try:
                fmt = fmt_of(info.path)
            except DataError:
                continue  # a README or _SUCCESS beside the data is not data
            sources.append(
                (
                    storage.Location(
                        loc.fs, info.path, storage.join(spec.path, info.path[len(loc.path) :])
                    ),
                    fmt,
                )
            )
        if not sources:
            raise DataError(f"{shown}: directory has no data files")
    else:
        sources = [(loc, spec.format if spec.format != "auto" else _detect_format(loc.path))]

    tables, skipped, kept, files = [], Counter(), Counter(), []
    for src, fmt in sources:
        name = storage.redact(src.url)
        raw = _read_datasets_dir(src) if fmt == "datasets" else _read_file(src, fmt)
        good, bad, odd = _validate(raw, spec, name, fmt)
        tables.append(good)
        skipped.update(bad)
        kept.update(odd)
        files.append(name)
    table = pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    if table.num_rows == 0:
        reason = f" ({sum(skipped.values())} bad rows skipped)" if skipped else ""
        raise DataError(f"{shown}: no usable rows{reason}")
    return PairData(table=table, files=files, skipped=skipped, kept=kept)
