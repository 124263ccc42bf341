"""Input checks that need more than one file's footer, run before any actor starts: ids
across the whole input, the output's place relative to the input, the reference set."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import ConfigError, EmbedConfig
from sbertray.embed.shards import EmbedInputError, InputFile, discover, open_input, read_footer

_IDS_SHOWN = 5
_ID_READERS = 16  # id columns read at once (object-store latency dominates)
_IDS_PER_MAP = 1_000_000  # ids one map reads
_FILES_PER_MAP = 2_000
_IDS_PER_BUCKET = 20_000_000  # hashes one reduce sorts (160 MB)
_MAPS_IN_FLIGHT = 8


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


def check_ids(config: EmbedConfig, files: list[InputFile]) -> None:
    """Refuses ids that would break "every id exactly once": a null id, or one id twice
    (within a file or across files). Names the files and up to five ids.

    Map/reduce over 64-bit hashes of the ids, so that no process holds the ids themselves:
    each map reads the id column of a chunk of files and splits the hashes into buckets; each
    reduce finds the hashes repeated in its bucket. Only if there are any does a second pass
    read the ids with those hashes, to name them (and tell a rare hash collision from a real
    repeat). With Ray running (a cluster run), maps and reduces are Ray tasks and this process
    holds object refs only; else they run here, holding 8 bytes per id.
    """
    column = config.input.id_column
    if column is None or not files:
        return
    chunks = _chunks(files)
    buckets = max(1, -(-sum(f.num_rows for f in files) // _IDS_PER_BUCKET))
    repeated = _run_on_ray(config, chunks, buckets) if _ray_running() else None
    if repeated is None:
        repeated = _run_here(config, chunks, buckets)
    if not repeated.size:
        return
    with ThreadPoolExecutor(max_workers=_ID_READERS) as pool:
        found = list(pool.map(lambda c: _ids_with_hashes(config, c[1], c[0], repeated), chunks))
    table = pa.concat_tables([t for t in found if t.num_rows])
    counts = table.group_by("id").aggregate([("file", "count"), ("file", "distinct")])
    counts = counts.filter(pc.greater(counts["file_count"], 1))
    if counts.num_rows:
        shown = counts.slice(0, _IDS_SHOWN)
        where = sorted({files[i].url for ids in shown["file_distinct"].to_pylist() for i in ids})
        raise EmbedInputError(
            f"input.id_column `{column}`: {counts.num_rows} ids occur more than once, e.g. "
            f"{shown['id'].to_pylist()}, in {', '.join(where)}; ids must be unique across the input"
        )


def _chunks(files: list[InputFile]) -> list[tuple[int, list[InputFile]]]:
    """Consecutive files of about ``_IDS_PER_MAP`` rows, with the index of the first."""
    chunks, start, rows = [], 0, 0
    for i, f in enumerate(files):
        rows += f.num_rows
        if rows >= _IDS_PER_MAP or i - start + 1 >= _FILES_PER_MAP:
            chunks.append((start, files[start : i + 1]))
            start, rows = i + 1, 0
    if start < len(files):
        chunks.append((start, files[start:]))
    return chunks


def _read_ids(config: EmbedConfig, files: list[InputFile]) -> list[pa.ChunkedArray]:
    column = config.input.id_column
    fs = storage.resolve(files[0].url, config.storage).fs

    def read(f: InputFile) -> pa.ChunkedArray:
        try:
            with open_input(fs, f) as handle:
                return pq.read_table(handle, columns=[column]).column(0)
        except (OSError, pa.ArrowException) as exc:
            raise EmbedInputError(f"{f.url}: cannot read column `{column}`: {exc}") from None

    with ThreadPoolExecutor(max_workers=_ID_READERS) as pool:
        columns = list(pool.map(read, files))
    for f, ids in zip(files, columns, strict=True):
        if ids.null_count:
            rows = pc.indices_nonzero(pc.is_null(ids)).to_pylist()[:_IDS_SHOWN]
            raise EmbedInputError(
                f"{f.url}: row {rows[0]}: column `{column}` (input.id_column) is null "
                f"({ids.null_count} null ids, rows {rows}{'...' if ids.null_count > len(rows) else ''})"
            )
    return columns


def _hash(ids: pa.ChunkedArray) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(ids.to_numpy()).astype(np.uint64)


def _map_hashes(config: EmbedConfig, files: list[InputFile], buckets: int) -> list[np.ndarray]:
    """The map: the chunk's id hashes, split into ``buckets`` by hash."""
    columns = _read_ids(config, files)
    hashes = np.concatenate([_hash(c) for c in columns]) if columns else np.empty(0, np.uint64)
    if buckets == 1:
        return [hashes]
    which = hashes % np.uint64(buckets)
    return [hashes[which == b] for b in range(buckets)]


def _map_hashes_ray(config: EmbedConfig, files: list[InputFile], buckets: int):
    """``_map_hashes`` as a Ray task of ``buckets`` returns (one return is the value itself)."""
    parts = _map_hashes(config, files, buckets)
    return parts[0] if buckets == 1 else parts


def _repeated_hashes(*parts: np.ndarray) -> np.ndarray:
    """The reduce: hashes that occur more than once in one bucket."""
    hashes = np.sort(np.concatenate(parts))
    return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])


def _ids_with_hashes(
    config: EmbedConfig, files: list[InputFile], first: int, wanted: np.ndarray
) -> pa.Table:
    """The ids of ``files`` whose hash is in ``wanted``, with their file's index."""
    tables = []
    for i, ids in enumerate(_read_ids(config, files)):
        hit = np.isin(_hash(ids), wanted)
        if hit.any():
            chosen = ids.filter(pa.array(hit))
            tables.append(
                pa.table(
                    {"id": chosen, "file": pa.array(np.full(len(chosen), first + i, np.int32))}
                )
            )
    return (
        pa.concat_tables(tables)
        if tables
        else pa.table({"id": [], "file": pa.array([], pa.int32())})
    )


def _run_here(
    config: EmbedConfig, chunks: list[tuple[int, list[InputFile]]], buckets: int
) -> np.ndarray:
    mapped = [_map_hashes(config, files, buckets) for _, files in chunks]
    return np.concatenate([_repeated_hashes(*[m[b] for m in mapped]) for b in range(buckets)])


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _run_on_ray(
    config: EmbedConfig, chunks: list[tuple[int, list[InputFile]]], buckets: int
) -> np.ndarray:
    import ray

    # No CPU asked: reading ids is I/O, short, and runs before any actor, so it must not wait
    # for a node to be added (the pool's own wait is bounded by `compute.placement_timeout_s`).
    map_task = ray.remote(num_cpus=0, num_returns=buckets)(_map_hashes_ray)
    reduce_task = ray.remote(num_cpus=0)(_repeated_hashes)
    mapped = []
    for wave in range(0, len(chunks), _MAPS_IN_FLIGHT):
        refs = [
            map_task.remote(config, files, buckets)
            for _, files in chunks[wave : wave + _MAPS_IN_FLIGHT]
        ]
        refs = [r if buckets > 1 else [r] for r in refs]
        ray.wait([r[0] for r in refs], num_returns=len(refs))
        mapped += refs
    try:
        parts = ray.get([reduce_task.remote(*[m[b] for m in mapped]) for b in range(buckets)])
    except ray.exceptions.RayTaskError as exc:  # a map's null id or unreadable column
        if isinstance(exc.cause, EmbedInputError):
            raise exc.cause from None
        raise
    return np.concatenate(parts)


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


def check_reference(config: EmbedConfig) -> None:
    """The reference set's files exist and have the configured columns (footers only)."""
    ref = config.reference
    if ref is None:
        return
    fs, files = discover(ref.path, config.storage)
    if not files:
        raise EmbedInputError(
            f"reference `{storage.redact(str(ref.path))}`: no Parquet files found"
        )
    for f in files:
        checked, schema = read_footer(fs, f)
        if checked.error:
            raise EmbedInputError(f"reference: {checked.error}")
        for key, column in (("id_column", ref.id_column), ("text_column", ref.text_column)):
            if column not in schema.names:
                raise EmbedInputError(
                    f"reference {f.url}: missing column `{column}` (reference.{key}); "
                    f"the file has {schema.names}"
                )
