"""Where training pairs come from: the files a data spec names, read in bounded batches.

A spec's ``path`` is one file, a directory of files, or a Hugging Face ``datasets`` directory,
local or on object storage. Each file is read as a stream of column batches, so neither the
driver nor a prepare task ever holds a whole large file (JSON lines and ``datasets`` included).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import PairDataConfig, StorageConfig
from sbertray.errors import UserError

BATCH_ROWS = 65_536  # rows validated at a time: a few MB of short text

_FORMAT_BY_SUFFIX = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}


class DataError(UserError, ValueError):
    """Input data is unusable; the message names the file, and the row and field where known."""


@dataclass(frozen=True)
class Source:
    """One file (or ``datasets`` directory) of pairs."""

    url: str
    format: str  # parquet | csv | tsv | jsonl | datasets
    size: int  # bytes, for choosing where to validate

    @property
    def name(self) -> str:
        return storage.redact(self.url)


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


def list_sources(spec: PairDataConfig, storage_config: StorageConfig | None) -> list[Source]:
    """The spec's files in a stable order. Raises DataError for a missing path or no data."""
    loc = storage.resolve(spec.path, storage_config)
    shown = storage.redact(spec.path)
    if not storage.exists(loc):
        raise DataError(f"{shown}: no such file or directory{storage.relative_note(spec.path)}")
    if spec.format == "datasets" or (spec.format == "auto" and _is_datasets_dir(loc)):
        return [Source(spec.path, "datasets", 0)]
    info = storage.file_info(loc)
    if info.type != storage.pafs.FileType.Directory:
        fmt = spec.format if spec.format != "auto" else _detect_format(loc.path)
        return [Source(spec.path, fmt, info.size or 0)]
    sources = []
    for info in storage.list_files(loc):
        try:
            fmt = spec.format if spec.format != "auto" else _detect_format(info.path)
        except DataError:
            continue  # a README or _SUCCESS beside the data is not data
        url = storage.join(spec.path, info.path[len(loc.path) :])
        sources.append(Source(url, fmt, info.size or 0))
    if not sources:
        raise DataError(f"{shown}: directory has no data files")
    return sources


def read_batches(
    source: Source, storage_config: StorageConfig | None
) -> Iterator[dict[str, list | pa.Array]]:
    """The source's columns, ``BATCH_ROWS`` rows at a time (Arrow arrays, or Python lists for
    JSON lines). Raises DataError naming the file when it cannot be read."""
    loc = storage.resolve(source.url, storage_config)
    try:
        if source.format == "datasets":
            yield from _datasets_batches(loc)
        elif source.format == "parquet":
            with loc.fs.open_input_file(loc.path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
                    yield _columns(batch)
        elif source.format == "jsonl":
            yield from _jsonl_batches(loc, source.name)
        else:
            yield from _text_batches(loc, source.format)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source.name}: cannot read as {source.format}: {exc}") from exc


def _columns(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    return dict(zip(batch.schema.names, batch.columns, strict=True))


def _text_batches(loc: storage.Location, fmt: str) -> Iterator[dict[str, pa.Array]]:
    """CSV/TSV with every column read as a string, so a bad label is reported per row instead
    of failing the whole file's type inference. TSV has no quoting (STS-B sentences contain
    bare double quotes that a quoting parser would swallow, losing rows)."""
    with loc.fs.open_input_stream(loc.path) as f:
        first_line = f.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    first_line = first_line.rstrip("\r")
    header = first_line.split("\t") if fmt == "tsv" else next(csv.reader(io.StringIO(first_line)))
    parse = pacsv.ParseOptions(
        delimiter="\t" if fmt == "tsv" else ",", quote_char=False if fmt == "tsv" else '"'
    )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=False
    )
    with loc.fs.open_input_stream(loc.path) as f:
        reader = pacsv.open_csv(f, parse_options=parse, convert_options=convert)
        for batch in reader:
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield _columns(batch.slice(start, BATCH_ROWS))


def _jsonl_batches(loc: storage.Location, name: str) -> Iterator[dict[str, list]]:
    """JSON lines parsed row by row: Arrow's reader needs one type per column, so a single
    mistyped value would fail the whole file instead of being reported (or skipped) as a row."""
    rows: list[dict] = []
    with loc.fs.open_input_stream(loc.path) as f:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
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
            if len(rows) == BATCH_ROWS:
                yield _pivot(rows)
                rows = []
    if rows:
        yield _pivot(rows)


def _pivot(rows: list[dict]) -> dict[str, list]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def _datasets_batches(loc: storage.Location) -> Iterator[dict[str, pa.Array]]:
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
        # Memory-mapped Arrow: batches are views of the files, not copies.
        for batch in ds.data.table.to_batches(max_chunksize=BATCH_ROWS):
            yield _columns(batch)
