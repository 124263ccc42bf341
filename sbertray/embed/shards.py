"""Finding input Parquet shards, checking them before any work, and cutting them into work units.

Only Parquet footers are read here (row counts, row groups, schema): cheap even for thousands
of shards in object storage, and enough to fail on a missing column before any actor starts.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import math
from dataclasses import dataclass, field, replace
from hashlib import blake2b

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import EmbedConfig, StorageConfig
from sbertray.errors import UserError

_GLOB_CHARS = "*?["
_READ_WHOLE_BYTES = 4 << 20  # files up to this size are read in one request while planning
_UNITS_WANTED = 32  # default unit size: the input in about this many units
_MIN_UNIT_ROWS = 1024
_TEXT_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_null,
)


class EmbedInputError(UserError, ValueError):
    """The input cannot be embedded as configured; names the file and column/row."""


@dataclass(frozen=True)
class InputFile:
    url: str  # redacted, for messages and the manifest
    path: str  # inside `fs`
    rel: str  # relative to the input root: output name and generated ids derive from it
    size: int
    mtime: str | None
    num_rows: int = 0
    row_group_rows: tuple[int, ...] = ()
    partitions: tuple[tuple[str, str], ...] = ()  # hive `key=value` directories above the file
    error: str | None = None  # unreadable footer: the file is bad

    @property
    def output_stem(self) -> str:
        """Output files of this input are ``<output_stem>.part-NNNN.parquet``."""
        return self.rel[: -len(".parquet")] if self.rel.endswith(".parquet") else self.rel

    @property
    def fingerprint(self) -> dict:
        """What says "this input changed" for incremental runs."""
        return {"size": self.size, "mtime": self.mtime}


@dataclass(frozen=True)
class FileSlice:
    """Consecutive row groups of one input file."""

    file: InputFile
    row_groups: tuple[int, ...]
    first_row: int
    num_rows: int


@dataclass(frozen=True)
class WorkUnit:
    """Rows written as one output file: a run of consecutive row groups of one large file, or
    whole small files of one directory grouped together (``plan_units``)."""

    slices: tuple[FileSlice, ...]
    part: int = 0

    @property
    def file(self) -> InputFile:
        """The first input file: the output is named after it."""
        return self.slices[0].file

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.slices)

    @property
    def _grouped(self) -> str:
        # Not "+": some S3 clients still decode it in keys as a space.
        return f".{len(self.slices)}-files" if len(self.slices) > 1 else ""

    @property
    def unit_id(self) -> str:
        return f"{self.file.rel}{self._grouped}#part-{self.part:04d}"

    @property
    def output_rel(self) -> str:
        """``<first file>.part-NNNN.parquet``; a group of n files:
        ``<first file>.<n>-files.part-0000.parquet``."""
        return f"{self.file.output_stem}{self._grouped}.part-{self.part:04d}.parquet"

    @property
    def inputs(self) -> list[list]:
        """What says "these inputs changed": each file's relative path, size and mtime."""
        return [[s.file.rel, s.file.size, s.file.mtime] for s in self.slices]


@dataclass
class InputPlan:
    files: list[InputFile]
    units: list[WorkUnit]
    bad_files: list[InputFile] = field(default_factory=list)
    # 64-bit id hashes of the files read whole while planning (``read_footer``), by relative
    # path: ``checks.check_ids`` reads only the others' ids.
    id_hashes: dict = field(default_factory=dict, repr=False)

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


def _hive_partitions(rel: str) -> tuple[tuple[str, str], ...]:
    parts = rel.split("/")[:-1]
    return tuple(tuple(p.split("=", 1)) for p in parts if "=" in p)  # type: ignore[misc]


def _file_info_to_input(loc: storage.Location, info: pafs.FileInfo, rel: str) -> InputFile:
    url = (
        storage.redact(storage.join(loc.url, rel)) if rel != info.path else storage.redact(loc.url)
    )
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return InputFile(
        url=url,
        path=info.path,
        rel=rel,
        size=info.size or 0,
        mtime=mtime,
        partitions=_hive_partitions(rel),
    )


def _list_one(spec: str, storage_config: StorageConfig | None) -> list[InputFile]:
    if any(c in spec for c in _GLOB_CHARS):
        root = spec[: min(spec.index(c) for c in _GLOB_CHARS if c in spec)].rsplit("/", 1)[0]
        loc = storage.resolve(root, storage_config)
        pattern = spec[len(root) :].lstrip("/")
        if loc.is_local:
            matches = sorted(globlib.glob(f"{loc.path}/{pattern}", recursive=True))
            infos = loc.fs.get_file_info(matches)
        else:
            infos = [
                i
                for i in storage.list_files(loc)
                if fnmatch.fnmatch(i.path[len(loc.path) :].lstrip("/"), pattern)
            ]
        return [
            _file_info_to_input(loc, i, i.path[len(loc.path) :].lstrip("/"))
            for i in infos
            if i.type == pafs.FileType.File
        ]
    loc = storage.resolve(spec, storage_config)
    info = storage.file_info(loc)
    if info.type == pafs.FileType.NotFound:
        raise EmbedInputError(
            f"input `{storage.redact(spec)}`: no such file or directory{storage.relative_note(spec)}"
        )
    if info.type == pafs.FileType.File:  # the spec names the file itself
        found = _file_info_to_input(loc, info, loc.path.rsplit("/", 1)[-1])
        return [replace(found, url=storage.redact(loc.url))]
    return [
        _file_info_to_input(loc, i, i.path[len(loc.path) :].lstrip("/"))
        for i in storage.list_files(loc)
        if i.path.endswith(".parquet")
    ]


def discover(
    path: str | list[str], storage_config: StorageConfig | None
) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Lists the Parquet files an input spec names, sorted, with unique relative names."""
    specs = [path] if isinstance(path, str) else list(path)
    files: list[InputFile] = []
    for spec in specs:
        files.extend(_list_one(spec, storage_config))
    seen: dict[str, str] = {}
    for f in files:
        if f.rel in seen and seen[f.rel] != f.url:
            raise EmbedInputError(
                f"input files {seen[f.rel]} and {f.url} would write the same output "
                f"`{f.rel}`: list a common parent directory instead"
            )
        seen[f.rel] = f.url
    fs = storage.resolve(specs[0] if specs else ".", storage_config).fs
    return fs, sorted({f.url: f for f in files}.values(), key=lambda f: f.rel)


def read_footer(
    fs: pafs.FileSystem, f: InputFile, id_column: str | None = None
) -> tuple[InputFile, pq.FileMetaData | None, pa.ChunkedArray | None]:
    """The file's row counts and footer, and, if ``id_column`` is given and the file is small,
    its ids too: a small file costs one request whatever part of it is read, so it is read
    whole (object storage is latency bound: this halves the requests of planning many small
    files). Without ids to read, only the footer is fetched."""
    ids = None
    try:
        with fs.open_input_file(f.path) as handle:
            if id_column and f.size <= _READ_WHOLE_BYTES:
                parquet = pq.ParquetFile(pa.BufferReader(handle.read()))
                meta = parquet.metadata
                if id_column in meta.schema.names:
                    ids = parquet.read(columns=[id_column]).column(0)
            else:
                meta = pq.read_metadata(handle)
        meta.schema.to_arrow_schema()  # a footer whose schema pyarrow cannot read is bad too
    except (OSError, pa.ArrowException) as exc:
        return (
            InputFile(**{**f.__dict__, "error": f"{f.url}: not a readable Parquet file: {exc}"}),
            None,
            None,
        )
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    checked = InputFile(**{**f.__dict__, "num_rows": meta.num_rows, "row_group_rows": rows})
    return checked, meta, ids


def check_columns(config: EmbedConfig, f: InputFile, schema: pa.Schema) -> None:
    """Raises EmbedInputError if a configured column is missing or cannot hold text."""
    inp = config.input
    partition_keys = {k for k, _ in f.partitions}
    wanted = [("text_column", inp.text_column)]
    if inp.pair_column:
        wanted.append(("pair_column", inp.pair_column))
    if inp.id_column:
        wanted.append(("id_column", inp.id_column))
    wanted += [("passthrough", c) for c in inp.passthrough]
    for key, column in wanted:
        if column not in schema.names and not (key == "passthrough" and column in partition_keys):
            raise EmbedInputError(
                f"{f.url}: missing column `{column}` (input.{key}); the file has {schema.names}"
            )
    # Whatever the null policy: skipping a non-text column would silently drop every row.
    for key, column in (("text_column", inp.text_column), ("pair_column", inp.pair_column)):
        if column:
            col_type = schema.field(column).type
            if not any(check(col_type) for check in _TEXT_TYPES):
                raise EmbedInputError(
                    f"{f.url}: column `{column}` (input.{key}) has type {col_type}, not text; "
                    "convert it to string, or point the key at a text column"
                )


def plan_units(files: list[InputFile], rows_per_file: int, unit_rows: int) -> list[WorkUnit]:
    """Cuts the input into units. Deterministic, and stable under change: a changed, added or
    removed file changes the unit that holds it and no other.

    - A file of at least ``unit_rows`` rows is split at row-group boundaries into units of
      about ``rows_per_file`` rows.
    - Smaller files are grouped, in name order, within their directory (a group's output lives
      in its first file's folder, hive partitions included). A group ends after a file whose
      name hashes to a cut point (one name in ``stride``), once it holds ``unit_rows / 2`` rows,
      or before it would pass ``2 * unit_rows``. Because cut points depend on names, not on
      positions, an added or removed file moves no boundary outside its own group
      (content-defined chunking, as in rsync and restic).
    """
    small = sorted(f.num_rows for f in files if 0 < f.num_rows < unit_rows)
    stride = _stride(unit_rows, small[len(small) // 2]) if small else 1
    units: list[WorkUnit] = []
    group: list[InputFile] = []
    rows = 0

    def close() -> None:
        nonlocal rows
        if group:
            units.append(WorkUnit(tuple(_whole(f) for f in group)))
        group.clear()
        rows = 0

    for f in files:
        if f.num_rows >= unit_rows:
            close()
            units += _split(f, rows_per_file)
            continue
        if f.num_rows == 0:  # no rows, no output
            continue
        if group and (_folder(f) != _folder(group[0]) or rows + f.num_rows > 2 * unit_rows):
            close()
        group.append(f)
        rows += f.num_rows
        if rows >= unit_rows // 2 and _cut_point(f.rel, stride):
            close()
    close()
    return units


def _stride(unit_rows: int, typical_rows: int) -> int:
    """One name in this many is a cut point: a power of two, so that the typical file size
    drifting a little from run to run moves no boundary."""
    wanted = max(1.0, unit_rows / 2 / max(1, typical_rows))
    return 1 << round(math.log2(wanted))


def _cut_point(rel: str, stride: int) -> bool:
    digest = blake2b(rel.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % stride == 0


def _folder(f: InputFile) -> str:
    return f.rel.rsplit("/", 1)[0] if "/" in f.rel else ""


def _whole(f: InputFile) -> FileSlice:
    return FileSlice(f, tuple(range(len(f.row_group_rows))), 0, f.num_rows)


def _split(f: InputFile, rows_per_file: int) -> list[WorkUnit]:
    """Consecutive row groups of ``f`` in units of about ``rows_per_file`` rows."""
    units = []
    part, first, groups, rows = 0, 0, [], 0
    for index, n in enumerate(f.row_group_rows):
        groups.append(index)
        rows += n
        if rows >= rows_per_file:
            units.append(WorkUnit((FileSlice(f, tuple(groups), first, rows),), part))
            part, first, groups, rows = part + 1, first + rows, [], 0
    if rows:
        units.append(WorkUnit((FileSlice(f, tuple(groups), first, rows),), part))
    return units


def choose_unit_rows(config: EmbedConfig, total_rows: int) -> int:
    """``compute.unit_rows``, or by default the input's rows / 32 as a power of two, between
    1,024 and ``output.rows_per_file``: enough units to keep a pool busy, few output files.
    (A power of two, so that nightly growth changes it, and the grouping, only when the input
    doubles or halves.)"""
    if config.compute.unit_rows is not None:
        return config.compute.unit_rows
    wanted = 1 << round(math.log2(max(1, total_rows / _UNITS_WANTED)))
    return min(max(wanted, _MIN_UNIT_ROWS), config.output.rows_per_file)
