"""Input checks that need more than one file's footer, run before any actor starts: ids
across the whole input, the output's place relative to the input, the reference set."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import ConfigError, EmbedConfig
from sbertray.embed.shards import EmbedInputError, InputFile, discover, read_footer

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


def check_ids(
    config: EmbedConfig, files: list[InputFile], known: dict[str, np.ndarray] | None = None
) -> None:
    """Refuses ids that would break "every id exactly once": a null id, or one id twice
    (within a file or across files). Names the files and up to five ids.

    Map/reduce over 64-bit hashes of the ids, so that no process holds the ids themselves:
    each map reads the id column of a chunk of files and splits the hashes into buckets; each
    reduce finds the hashes repeated in its bucket. Only if there are any does a second pass
    read the ids with those hashes, to name them (and tell a rare hash collision from a real
    repeat). With Ray running (a cluster run), maps and reduces are Ray tasks and this process
    holds object refs only; else they run here, holding 8 bytes per id. ``known``: hashes
    of files already read while planning (small files, by relative path): not read again.
    """
    column = config.input.id_column
    if column is None or not files:
        return
    known = known or {}
    chunks = _chunks([f for f in files if f.rel not in known])
    buckets = max(1, -(-sum(f.num_rows for f in files) // _IDS_PER_BUCKET))
    planned = _split_buckets(np.concatenate([np.empty(0, np.uint64), *known.values()]), buckets)
    if _ray_running():
        repeated = _run_on_ray(config, chunks, buckets, planned)
    else:
        repeated = _run_here(config, chunks, buckets, planned)
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

    with ThreadPoolExecutor(max_workers=_ID_READERS) as pool:
        return list(pool.map(read, files))


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


def _map_hashes(config: EmbedConfig, files: list[InputFile], buckets: int) -> list[np.ndarray]:
    """The map: the chunk's id hashes, split into ``buckets`` by hash."""
    columns = _read_ids(config, files)
    hashed = [hash_ids(config, f, ids) for f, ids in zip(files, columns, strict=True)]
    return _split_buckets(np.concatenate([np.empty(0, np.uint64), *hashed]), buckets)


def _map_hashes_ray(config: EmbedConfig, files: list[InputFile], buckets: int):
    """``_map_hashes`` as a Ray task of ``buckets`` returns (one return is the value itself)."""
    parts = _map_hashes(config, files, buckets)
    return parts[0] if buckets == 1 else parts


def _repeated_hashes(*parts: np.ndarray) -> np.ndarray:
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
    mapped = [planned, *(_map_hashes(config, files, buckets) for files in chunks)]
    return np.concatenate([_repeated_hashes(*[m[b] for m in mapped]) for b in range(buckets)])


def _ray_running() -> bool:
    # Not imported to ask: a run without Ray would pay half a second for a "no".
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _run_on_ray(
    config: EmbedConfig, chunks: list[list[InputFile]], buckets: int, planned: list[np.ndarray]
) -> np.ndarray:
    import ray

    # No CPU asked: reading ids is I/O, short, and runs before any actor, so it must not wait
    # for a node to be added (the pool's own wait is bounded by `compute.placement_timeout_s`).
    map_task = ray.remote(num_cpus=0, num_returns=buckets)(_map_hashes_ray)
    reduce_task = ray.remote(num_cpus=0)(_repeated_hashes)
    mapped = [[ray.put(part) for part in planned]]
    for wave in range(0, len(chunks), _MAPS_IN_FLIGHT):
        refs = [
            map_task.remote(config, files, buckets)
            for files in chunks[wave : wave + _MAPS_IN_FLIGHT]
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
        checked, schema, _ = read_footer(fs, f)
        if checked.error:
            raise EmbedInputError(f"reference: {checked.error}")
        for key, column in (("id_column", ref.id_column), ("text_column", ref.text_column)):
            if column not in schema.names:
                raise EmbedInputError(
                    f"reference {f.url}: missing column `{column}` (reference.{key}); "
                    f"the file has {schema.names}"
                )
