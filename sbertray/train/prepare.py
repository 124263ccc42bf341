"""The training set, validated once and written as shards the workers stream.

Before any worker starts, every training row is checked (``data.check_batch``) and the good rows
are written as Parquet shards of ``SHARD_ROWS`` under the checkpoint root, which is shared
storage on a cluster. The driver keeps only each shard's address and row count, the counts of
dropped rows, a digest of the rows (for the run fingerprint) and a small sample; each worker
then reads the shards through ``stream.PairStream``. So no process holds the training set.

Small data is prepared here, in the driver, one file after another (no Ray needed, and bad data
fails in a second). Above ``IN_PROCESS_MAX_BYTES`` of input, each file is one Ray task, so the
cluster's cores validate in parallel; a task streams its file in batches, so its memory does
not grow with the file either. Plain tasks rather than Ray Data's readers: an error must name
the file and its row, and Ray Data's readers do not say which row of a file a record was.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import PairDataConfig, StorageConfig
from sbertray.train.data import (
    DataError,
    FileCheck,
    RowCounts,
    check_file,
    no_rows_error,
    pair_schema,
)
from sbertray.train.sources import Source, list_sources

SHARD_ROWS = 16_384  # the unit of the per-epoch shuffle of shards: ~2 MB of short pairs
IN_PROCESS_MAX_BYTES = 64 << 20  # below this, Ray's start-up costs more than it saves
# Files that return their first rows as the sample: enough when the first files had only bad
# rows, few enough that the driver never holds a sample of every file.
_SAMPLED_FILES = 8


@dataclass(frozen=True)
class Shard:
    url: str
    rows: int


@dataclass(kw_only=True)
class PreparedPairs(RowCounts):
    """A validated training set: where its shards are, and what validation dropped."""

    shards: list[Shard]  # in input order: file by file, rows in file order
    files: list[str]
    digest: str  # of the validated rows in order: the run fingerprint's data part
    sample: pa.Table  # the first rows (pair_schema), for the card and the dry run's timing

    @property
    def rows(self) -> int:
        return _rows(self.shards)


@dataclass
class _FilePart:
    """One file's share of a ``PreparedPairs`` (what a prepare task returns)."""

    check: FileCheck
    shards: list[Shard]
    digest: str
    sample: pa.Table | None
    error: str | None = None  # a DataError's message (Ray would wrap the exception itself)


def prepare_file(
    source: Source,
    spec: PairDataConfig,
    storage_config: StorageConfig | None,
    out_url: str | None,
    sample_rows: int,
    row_budget: int | None = None,
    shard_rows: int = SHARD_ROWS,
) -> _FilePart:
    """Validates ``source`` and, with an ``out_url``, writes its good rows as shards there
    (``out_url=None``: validate only, as the dry run does). At most ``row_budget`` good rows."""
    check = FileCheck(source.name)
    digest, shards, pending, sample, taken = hashlib.sha256(), [], [], None, 0
    try:
        for good in check_file(source, spec, storage_config, check):
            if row_budget is not None:
                good = good.slice(0, row_budget - taken)
            taken += len(good)
            digest.update(_ipc_bytes(good))
            pending.append(good)
            if sample is None or len(sample) < sample_rows:
                sample = pa.concat_tables([t for t in (sample, good) if t is not None])
                sample = sample.slice(0, sample_rows)
            if sum(map(len, pending)) >= shard_rows:
                pending = _flush(pending, shards, shard_rows, out_url, storage_config, final=False)
            if row_budget is not None and taken >= row_budget:
                if error := check.bad_rows_error(spec):  # the rest of the file is not read
                    raise error
                break
        _flush(pending, shards, shard_rows, out_url, storage_config, final=True)
    except DataError as exc:
        return _FilePart(check, [], "", None, error=str(exc))
    return _FilePart(check, shards, digest.hexdigest(), sample)


def _rows(shards: list[Shard]) -> int:
    return sum(s.rows for s in shards)


def _flush(pending, shards, shard_rows, out_url, storage_config, *, final: bool) -> list[pa.Table]:
    """Writes whole shards of ``pending`` (the rest too when ``final``); returns what is left."""
    if not pending:
        return []
    table = pa.concat_tables(pending)
    while len(table) >= shard_rows or (final and len(table)):
        shard, table = table.slice(0, shard_rows), table.slice(shard_rows)
        url = storage.join(out_url, f"part-{len(shards):05d}.parquet") if out_url else ""
        if out_url:
            buffer = io.BytesIO()
            pq.write_table(shard, buffer, compression="zstd")
            storage.write_bytes(storage.resolve(url, storage_config), buffer.getvalue())
        shards.append(Shard(url, len(shard)))
    return [table] if len(table) else []


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return sink.getvalue().to_pybytes()


def prepare_pairs(
    spec: PairDataConfig,
    storage_config: StorageConfig | None,
    out_url: str | None,
    *,
    sample_rows: int,
    sources: list[Source] | None = None,
    use_ray: bool | None = None,
    shard_rows: int = SHARD_ROWS,
) -> PreparedPairs:
    """Validates the training set and writes its shards under ``out_url`` (one folder per input
    file), or only validates when ``out_url`` is None. ``sources``: ``list_sources(spec)``
    where the caller has it. ``use_ray`` defaults to ``validates_on_ray``; Ray must be
    initialized when it is true.

    Raises:
        DataError: as ``load_pairs``, for the first file (in order) with a problem.
    """
    if sources is None:
        sources = list_sources(spec, storage_config)
    if use_ray is None:
        use_ray = validates_on_ray(spec, sources)
    if out_url:
        storage.delete(storage.resolve(out_url, storage_config))  # a failed run's shards
    outs = [
        storage.join(out_url, f"file-{i:05d}") if out_url else None for i in range(len(sources))
    ]
    if use_ray:
        parts = _prepare_on_ray(sources, spec, storage_config, outs, sample_rows, shard_rows)
    else:
        parts, budget = [], spec.limit
        for source, out in zip(sources, outs, strict=True):
            part = prepare_file(source, spec, storage_config, out, sample_rows, budget, shard_rows)
            parts.append(part)
            if part.error:
                break
            if budget is not None and (budget := budget - _rows(part.shards)) <= 0:
                break
    return _combine(spec, parts, sources)


def validates_on_ray(spec: PairDataConfig, sources: list[Source]) -> bool:
    """Whether Ray tasks validate these sources: above ``IN_PROCESS_MAX_BYTES`` of input, and
    never with ``limit`` (the first N rows, read in order)."""
    return spec.limit is None and sum(s.size for s in sources) > IN_PROCESS_MAX_BYTES


def _prepare_on_ray(
    sources, spec, storage_config, outs, sample_rows, shard_rows
) -> list[_FilePart]:
    import ray

    task = ray.remote(num_cpus=1)(prepare_file)
    refs = [
        task.remote(
            source,
            spec,
            storage_config,
            out,
            sample_rows if i < _SAMPLED_FILES else 0,
            shard_rows=shard_rows,
        )
        for i, (source, out) in enumerate(zip(sources, outs, strict=True))
    ]
    return ray.get(refs)


def _combine(spec: PairDataConfig, parts: list[_FilePart], sources: list[Source]) -> PreparedPairs:
    for part in parts:
        if part.error:
            raise DataError(part.error)
    digest = hashlib.sha256()
    prepared = PreparedPairs(
        shards=[], files=[s.name for s in sources[: len(parts)]], digest="", sample=None
    )
    for part in parts:
        digest.update(part.digest.encode())
        prepared.shards.extend(part.shards)
        prepared.skipped.update(part.check.skipped)
        prepared.kept.update(part.check.kept)
    prepared.digest = digest.hexdigest()
    samples = (p.sample for p in parts if p.sample is not None and len(p.sample))
    prepared.sample = next(samples, pair_schema(spec).empty_table())
    if not prepared.rows:
        raise no_rows_error(spec.path, prepared)
    return prepared
