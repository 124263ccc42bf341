"""Input checks run before any actor starts, in the dry run and the real run alike: ids across
the whole input, texts a `fail` policy refuses, and the output's place relative to the input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import ConfigError, EmbedConfig
from sbertray.embed.shards import EmbedInputError, FileSlice, InputFile
from sbertray.embed.texts import BadRows, column_texts

# (config, chunks of files, buckets, the planned hashes split into buckets) -> repeated hashes
MapReduce = Callable[[EmbedConfig, list[list[InputFile]], int, list[np.ndarray]], np.ndarray]

_IDS_SHOWN = 5
_IDS_PER_MAP = 1_000_000  # ids one map reads
_FILES_PER_MAP = 2_000
_IDS_PER_BUCKET = 20_000_000  # hashes one reduce sorts (160 MB)


def check_id_types(config: EmbedConfig, files: list[InputFile], schemas: list[pa.Schema]) -> None:
    """Refuses an id column whose type differs between files (footers only)."""
    column = config.input.id_column
    if column is None:
        return
    types: dict[str, str] = {}
    for f, schema in zip(files, schemas, strict=True):
        types.setdefault(str(schema.field(column).type), f.url)
    if len(types) > 1:
        shown = "; ".join(f"{t} in {url}" for t, url in types.items())
        raise EmbedInputError(
            f"input.id_column `{column}` has different types across files: {shown}"
        )


def check_ids(
    config: EmbedConfig,
    files: list[InputFile],
    known: dict[str, np.ndarray] | None = None,
    map_reduce: MapReduce | None = None,
) -> None:
    """Refuses ids that would break "every id exactly once": a null id, or one id twice
    (within a file or across files). Names the files and up to five ids.

    Map/reduce over 64-bit hashes of the ids, so that no process holds the ids themselves:
    each map reads the id column of a chunk of files and splits the hashes into buckets; each
    reduce finds the hashes repeated in its bucket. Only if there are any does a second pass
    read the ids with those hashes, to name them (and tell a rare hash collision from a real
    repeat). ``map_reduce`` runs ``map_hashes`` over the chunks and ``repeated_hashes`` over
    the buckets: by default here, holding 8 bytes per id; on a cluster as Ray tasks
    (``ray_adapter.repeated_id_hashes``), this process holding object refs only. ``known``:
    hashes of files already read while planning (small files, by relative path): not read
    again.
    """
    column = config.input.id_column
    if column is None or not files:
        return
    known = known or {}
    chunks = _chunks([f for f in files if f.rel not in known])
    buckets = max(1, -(-sum(f.num_rows for f in files) // _IDS_PER_BUCKET))
    planned = _split_buckets(np.concatenate([np.empty(0, np.uint64), *known.values()]), buckets)
    repeated = (map_reduce or _run_here)(config, chunks, buckets, planned)
    if not repeated.size:
        return
    table = _ids_with_hashes(config, files, repeated)
    counts = table.group_by("id").aggregate([("file", "count"), ("file", "distinct")])
    counts = counts.filter(pc.greater(counts["file_count"], 1))
    if counts.num_rows:
        shown = counts.slice(0, _IDS_SHOWN)
        where = sorted({files[i].url for ids in shown["file_distinct"].to_pylist() for i in ids})
        raise EmbedInputError(
            f"input.id_column `{column}`: {counts.num_rows} ids occur more than once, e.g. "
            f"{shown['id'].to_pylist()}, in {', '.join(where)}; ids must be unique across the input"
        )


def _chunks(files: list[InputFile]) -> list[list[InputFile]]:
    """Consecutive files of about ``_IDS_PER_MAP`` rows."""
    chunks, start, rows = [], 0, 0
    for i, f in enumerate(files):
        rows += f.num_rows
        if rows >= _IDS_PER_MAP or i - start + 1 >= _FILES_PER_MAP:
            chunks.append(files[start : i + 1])
            start, rows = i + 1, 0
    if start < len(files):
        chunks.append(files[start:])
    return chunks


def _read_ids(config: EmbedConfig, files: list[InputFile]) -> list[pa.ChunkedArray]:
    column = config.input.id_column
    fs = storage.resolve(files[0].url, config.storage).fs

    def read(f: InputFile) -> pa.ChunkedArray:
        try:
            with fs.open_input_file(f.path) as handle:
                return pq.read_table(handle, columns=[column]).column(0)
        except (OSError, pa.ArrowException) as exc:
            raise EmbedInputError(f"{f.url}: cannot read column `{column}`: {exc}") from None

    return storage.map_parallel(read, files)


def hash_ids(config: EmbedConfig, f: InputFile, ids: pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of one file's ids; a null id raises, naming the file and rows."""
    if ids.null_count:
        rows = pc.indices_nonzero(pc.is_null(ids)).to_pylist()[:_IDS_SHOWN]
        raise EmbedInputError(
            f"{f.url}: row {rows[0]}: column `{config.input.id_column}` (input.id_column) is "
            f"null ({ids.null_count} null ids, rows {rows}"
            f"{'...' if ids.null_count > len(rows) else ''})"
        )
    import pandas as pd

    return pd.util.hash_array(ids.to_numpy()).astype(np.uint64)


def _split_buckets(hashes: np.ndarray, buckets: int) -> list[np.ndarray]:
    if buckets == 1:
        return [hashes]
    which = hashes % np.uint64(buckets)
    return [hashes[which == b] for b in range(buckets)]


def map_hashes(config: EmbedConfig, files: list[InputFile], buckets: int) -> list[np.ndarray]:
    """The map: the chunk's id hashes, split into ``buckets`` by hash."""
    columns = _read_ids(config, files)
    hashed = [hash_ids(config, f, ids) for f, ids in zip(files, columns, strict=True)]
    return _split_buckets(np.concatenate([np.empty(0, np.uint64), *hashed]), buckets)


def repeated_hashes(*parts: np.ndarray) -> np.ndarray:
    """The reduce: hashes that occur more than once in one bucket."""
    hashes = np.sort(np.concatenate(parts))
    return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])


def _ids_with_hashes(config: EmbedConfig, files: list[InputFile], wanted: np.ndarray) -> pa.Table:
    """The ids of ``files`` whose hash is in ``wanted``, with their file's index (read a chunk
    of files at a time; only the repeats are kept)."""
    tables = []
    for start in range(0, len(files), _FILES_PER_MAP):
        chunk = files[start : start + _FILES_PER_MAP]
        for i, ids in enumerate(_read_ids(config, chunk), start):
            hit = np.isin(hash_ids(config, files[i], ids), wanted)
            if hit.any():
                chosen = ids.filter(pa.array(hit))
                index = pa.array(np.full(len(chosen), i, np.int32))
                tables.append(pa.table({"id": chosen, "file": index}))
    return pa.concat_tables(tables)  # not empty: each wanted hash came from some file


def _run_here(
    config: EmbedConfig, chunks: list[list[InputFile]], buckets: int, planned: list[np.ndarray]
) -> np.ndarray:
    mapped = [planned, *(map_hashes(config, files, buckets) for files in chunks)]
    return np.concatenate([repeated_hashes(*[m[b] for m in mapped]) for b in range(buckets)])


def check_output_outside_input(config: EmbedConfig) -> None:
    """An output under the input would be read back as input by the next run."""
    out = storage.absolute(config.output.path).rstrip("/") + "/"
    specs = [config.input.path] if isinstance(config.input.path, str) else config.input.path
    for spec in specs:
        root = storage.absolute(spec.split("*", 1)[0]).rstrip("/") + "/"
        if out.startswith(root):
            raise ConfigError(
                f"`output.path` {storage.redact(out)} is inside `input.path` "
                f"{storage.redact(spec)}: the next run would read its own output as input; "
                "write it elsewhere"
            )


def _text_columns(config: EmbedConfig) -> list[str]:
    return [c for c in (config.input.text_column, config.input.pair_column) if c]


def needs_text_read(config: EmbedConfig, meta: pq.FileMetaData, schema: pa.Schema) -> bool:
    """Whether a file's text columns must be read to know that no row fails a `fail` policy:
    its footer counts null texts (or keeps no counts), or a binary text column may hold invalid
    UTF-8. A footer that counts no nulls in string columns settles it without reading."""
    policy = config.bad_input
    for column in _text_columns(config):
        column_type = schema.field(column).type
        binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
        if policy.on_invalid_utf8 == "fail" and binary:
            return True
        if policy.on_null_text == "fail" and _null_count(meta, column) != 0:
            return True
    return False


def _null_count(meta: pq.FileMetaData, column: str) -> int | None:
    """Nulls in ``column`` per the footer's statistics; None if a row group keeps none."""
    total = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if chunk.path_in_schema == column:
                stats = chunk.statistics
                if stats is None or not stats.has_null_count:
                    return None
                total += stats.null_count
    return total


def check_texts(config: EmbedConfig, fs: pafs.FileSystem, files: list[InputFile]) -> None:
    """Reads the text columns of ``files`` (those ``needs_text_read`` picked) and raises on the
    rows a `fail` policy refuses, named by file, row and column as the run names them, so that
    the dry run finds them and a real run fails before it embeds anything."""
    columns = _text_columns(config)

    def failure(f: InputFile) -> str | None:
        try:
            with fs.open_input_file(f.path) as handle:
                table = pq.read_table(handle, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise EmbedInputError(f"{f.url}: cannot read columns {columns}: {exc}") from None
        bad = BadRows([FileSlice(f, tuple(range(len(f.row_group_rows))), 0, f.num_rows)])
        for column in columns:
            column_texts(table, column, config, bad)
        return bad.failure(config)

    failures = [message for message in storage.map_parallel(failure, files) if message]
    if failures:
        raise EmbedInputError("\n".join(failures))
