"""Row-level reuse: vectors are copied, not recomputed, for texts an earlier run already embedded.

Every output row carries ``content_key``: a 16-byte hash of its text (and pair text), keyed by
the run's content hash, which covers everything that changes the row's computed columns (model
hash, backend and precision, truncation, compact settings, reference set config). Equal keys
therefore mean equal vectors, scores and top-k, whatever file or row the text sat in before.

When an input file changes (a nightly snapshot rewritten whole, rows reordered, files compacted),
its units are processed again, but the stage looks every text's key up in a ``DonorIndex``: the
computed columns of the output parts this run replaces or removes. Only texts that are new or
changed are embedded; repeated texts inside a unit are embedded once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sbertray import storage

KEY_COLUMN = "content_key"
KEY_BYTES = 16  # 128 bits: a collision among 10^12 rows is about 10^-15 likely
KEY_TYPE = pa.binary(KEY_BYTES)


def row_keys(content_hash: str, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    """One key per row, as a ``(n,)`` array of 16-byte strings (numpy ``S16``)."""
    secret = content_hash.encode()[:64]  # blake2b keys are at most 64 bytes
    keys = np.empty(len(texts), dtype=f"S{KEY_BYTES}")
    for i, text in enumerate(texts):
        data = text.encode()
        if pairs is not None:  # length-prefixed, so ("ab", "c") and ("a", "bc") differ
            data = len(data).to_bytes(8, "little") + data + pairs[i].encode()
        keys[i] = blake2b(data, digest_size=KEY_BYTES, key=secret).digest()
    return keys


def key_array(keys: np.ndarray) -> pa.Array:
    """The keys as the Parquet column (``fixed_size_binary(16)``)."""
    return pa.FixedSizeBinaryArray.from_buffers(
        KEY_TYPE, len(keys), [None, pa.py_buffer(np.ascontiguousarray(keys).tobytes())]
    )


def key_numpy(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    data = arr.buffers()[1]
    return np.frombuffer(data, dtype=f"S{KEY_BYTES}", count=len(arr), offset=arr.offset * KEY_BYTES)


@dataclass(frozen=True)
class DonorIndex:
    """Computed columns of earlier output rows, sorted by content key (unique keys)."""

    keys: np.ndarray  # (n,) S16, sorted
    columns: pa.Table  # the stage's computed columns, row i for keys[i]
    files: int  # donor files read

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row in ``columns`` for each key, -1 where there is none."""
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1)


@dataclass(frozen=True)
class DonorFile:
    """An earlier output part whose rows can donate their computed columns."""

    path: str  # in the output's filesystem
    rows: int
    bytes: int  # the keys' and computed columns' uncompressed size (footer)


def donor_files(
    out: storage.Location, candidates: list[str], content_hash: str, columns: list[str]
) -> list[DonorFile]:
    """The ``candidates`` (paths in ``out.fs``) written with ``content_hash`` and carrying keys,
    with their rows and the size of their ``columns`` and keys (footers only, read in
    parallel)."""
    wanted = {KEY_COLUMN, *columns}

    def check(path: str) -> DonorFile | None:
        try:
            with out.fs.open_input_file(path) as handle:
                meta = pq.read_metadata(handle)
        except (OSError, pa.ArrowException):
            return None  # unreadable: not a donor, the run rewrites or removes it
        info = json.loads((meta.metadata or {}).get(b"sbertray", b"{}"))
        names = meta.schema.to_arrow_schema().names
        if info.get("content_hash") != content_hash or KEY_COLUMN not in names:
            return None
        size = sum(
            group.column(c).total_uncompressed_size
            for group in (meta.row_group(g) for g in range(meta.num_row_groups))
            for c in range(group.num_columns)
            if group.column(c).path_in_schema.split(".")[0] in wanted
        )
        return DonorFile(path, meta.num_rows, size)

    return [d for d in storage.map_parallel(check, candidates) if d is not None]


def read_donor(out: storage.Location, path: str, columns: list[str]) -> pa.Table:
    """A donor file's keys and ``columns``."""
    with out.fs.open_input_file(path) as handle:
        return pq.read_table(handle, columns=[KEY_COLUMN, *columns])


def build_index(out: storage.Location, files: list[str], columns: list[str]) -> DonorIndex:
    """Reads ``columns`` (the stage's computed columns) and the keys of ``files``."""
    tables = storage.map_parallel(lambda path: read_donor(out, path, columns), files)
    if not tables:
        return DonorIndex(np.empty(0, dtype=f"S{KEY_BYTES}"), pa.table({}), 0)
    table = pa.concat_tables(tables)
    keys = key_numpy(table.column(KEY_COLUMN))
    unique, first = np.unique(keys, return_index=True)  # sorted; repeated texts kept once
    return DonorIndex(unique, table.drop_columns([KEY_COLUMN]).take(first), len(files))
