"""Row-level reuse at any size: donor rows reach their units by a hash join, so no process
holds them all. No Ray in here: ``ray_adapter.join_donors`` runs these steps as Ray tasks.

A rewritten snapshot shuffles its rows across files, so one unit's donors lie in every donor
file's row groups: reading "only the rows a unit copies" would read nearly every donor file once
per unit. Instead the computed columns move once, hash-partitioned by content key:

1. **map**: each group of units hashes its texts into (key, unit, rows) per distinct key of a
   unit; each donor file gives its keys and computed columns, a repeated key once. Both are
   split into ``buckets`` by key.
2. **join**, one task per bucket: the bucket's donor keys once (``np.unique``), each unit key
   looked up; the matched columns, tagged with their unit, split by group of units.
3. **gather**, one task per group: each unit's donor rows as its own ``DonorIndex``, in one
   object the actors embedding the group's units fetch by reference (zero-copy on a node).

The driver holds object references and counts only (``PIECE_BYTES`` says how it stays so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed.reuse import (
    KEY_COLUMN,
    DonorFile,
    DonorIndex,
    key_array,
    key_numpy,
    read_donor,
    row_keys,
)
from sbertray.embed.shards import WorkUnit
from sbertray.embed.texts import embeddable_texts
from sbertray.embed.unit_reader import UnitReader

BUCKET_BYTES = 128 << 20  # donor columns a join task holds, up to ~64 GB of donors (below)
# Ray keeps a task's return under 100 KB in the caller's own memory: every piece here must be
# larger, or this process would hold the keys and vectors after all. So maps and groups are
# large enough to give each bucket a piece of about PIECE_BYTES (key pieces: KEY_PIECE_ROWS
# rows); past ~64 GB of donors, buckets grow as the square root of the donors' size instead, so
# the maps do not grow with them.
PIECE_BYTES = 256 << 10
KEY_PIECE_ROWS = 8192  # 24 bytes a row: about 200 KB
GROUP_ROWS = 65_536  # unit rows at least whose matches one gather task sorts out


@dataclass(frozen=True)
class JoinPlan:
    buckets: int
    key_maps: list[list[int]]  # indexes into the units, consecutive, per key map
    donor_maps: list[list[int]]  # indexes into the donor files, per donor map
    groups: list[list[int]]  # indexes into the units, consecutive, per gather

    def group_of_unit(self) -> np.ndarray:
        """For each unit index, its group."""
        return np.concatenate(
            [np.full(len(g), n, dtype=np.int32) for n, g in enumerate(self.groups)]
        )


def _chunks(sizes: list[int], at_least: float) -> list[list[int]]:
    """Consecutive indexes of ``sizes``, cut where a chunk reaches ``at_least``."""
    chunks: list[list[int]] = [[]]
    total = 0
    for index, size in enumerate(sizes):
        if total >= at_least:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += size
    return chunks


def plan_join(units: list[WorkUnit], donors: list[DonorFile], min_buckets: int) -> JoinPlan:
    """Buckets from the donors' size (at least ``min_buckets``: one per CPU keeps them all
    busy); maps and groups large enough that each piece they return is about ``PIECE_BYTES``."""
    size = sum(d.bytes for d in donors)
    row_bytes = max(1.0, size / max(1, sum(d.rows for d in donors)))
    by_size = min(math.ceil(size / BUCKET_BYTES), math.ceil(math.sqrt(size / PIECE_BYTES)))
    buckets = max(2, min_buckets, by_size)
    rows = [u.num_rows for u in units]
    return JoinPlan(
        buckets,
        key_maps=_chunks(rows, max(GROUP_ROWS, buckets * KEY_PIECE_ROWS)),
        donor_maps=_chunks([d.bytes for d in donors], buckets * PIECE_BYTES),
        groups=_chunks(rows, max(GROUP_ROWS, buckets * PIECE_BYTES / row_bytes)),
    )


def _split(
    table: pa.Table, keys: np.ndarray, buckets: int, rows: np.ndarray | None = None
) -> list[pa.Table]:
    """``table``'s ``rows`` (default: all) split by their keys' bucket. Keys are uniform hashes:
    their first 8 bytes modulo ``buckets`` spread them evenly. Each piece is taken, not sliced,
    so it serializes alone."""
    rows = np.arange(len(keys)) if rows is None else rows
    which = np.ascontiguousarray(keys[rows]).view("<u8")[::2] % buckets
    return [table.take(pa.array(rows[which == b])) for b in range(buckets)]


def _unit_keys(reader: UnitReader, content_hash: str, unit: WorkUnit, index: int) -> pa.Table:
    """The distinct keys of one unit's embeddable rows, with how many rows carry each."""
    config = reader.config
    columns = [c for c in (config.input.text_column, config.input.pair_column) if c]
    slices, table, _ = reader.read(unit, columns)
    if table is None:  # unreadable: the stage reports it
        keys, counts = np.empty(0, dtype="S16"), np.empty(0, dtype=np.int32)
    else:
        texts, pairs, keep, _ = embeddable_texts(config, slices, table)
        kept = np.flatnonzero(keep)
        pair_texts = [pairs[i] for i in kept] if pairs is not None else None
        found = row_keys(content_hash, [texts[i] for i in kept], pair_texts)
        keys, counts = np.unique(found, return_counts=True)
    return pa.table(
        {
            KEY_COLUMN: key_array(keys),
            "unit": pa.array(np.full(len(keys), index, dtype=np.int32)),
            "rows": pa.array(counts.astype(np.int32)),
        }
    )


def unit_key_pieces(
    config: EmbedConfig,
    content_hash: str,
    units: list[WorkUnit],
    indexes: list[int],
    buckets: int,
) -> list[pa.Table]:
    """Map: the keys of ``units`` (numbered ``indexes``), split into ``buckets``."""
    reader = UnitReader(config)
    tables = [_unit_keys(reader, content_hash, u, i) for u, i in zip(units, indexes, strict=True)]
    table = pa.concat_tables(tables)
    return _split(table, key_numpy(table.column(KEY_COLUMN)), buckets)


def donor_pieces(
    out: storage.Location, paths: list[str], columns: list[str], buckets: int
) -> list[pa.Table]:
    """Map: donor files' keys and computed ``columns``, a repeated key once, split into
    ``buckets``."""
    tables = [read_donor(out, path, columns) for path in paths]
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = key_numpy(table.column(KEY_COLUMN))
    _, first = np.unique(keys, return_index=True)
    return _split(table, keys, buckets, first)


def join_bucket(
    unit_pieces: list[pa.Table], donor_pieces: list[pa.Table], group_of_unit: np.ndarray
) -> tuple[list[pa.Table], int]:
    """Join, one bucket: the donor rows (keys and columns) each unit key finds, with its
    ``unit``, split by the unit's group; and how many unit rows they cover. The donor columns
    are copied once, into the pieces (concatenating tables only chains their chunks)."""
    donors = pa.concat_tables(donor_pieces, promote_options="permissive")
    keys, first = np.unique(key_numpy(donors.column(KEY_COLUMN)), return_index=True)
    wanted = pa.concat_tables(unit_pieces)
    found = DonorIndex(keys, donors, 0).lookup(key_numpy(wanted.column(KEY_COLUMN)))
    hit = np.flatnonzero(found >= 0)
    units = wanted.column("unit").to_numpy()
    group = group_of_unit[units[hit]]
    pieces = []
    for g in range(int(group_of_unit.max()) + 1 if len(group_of_unit) else 0):
        mine = hit[group == g]
        piece = donors.take(pa.array(first[found[mine]]))
        pieces.append(piece.append_column("unit", pa.array(units[mine], pa.int32())))
    return pieces, int(wanted.column("rows").to_numpy()[hit].sum())


def gather_group(pieces: list[pa.Table], units: list[int]) -> list[DonorIndex | None]:
    """Gather, one group: each of ``units``' donor rows as a ``DonorIndex`` (None: no rows),
    returned as one object. A unit's keys are already distinct (each matched once): sorting
    is enough."""
    table = pa.concat_tables(pieces, promote_options="permissive")
    keys = key_numpy(table.column(KEY_COLUMN))
    unit_of_row = table.column("unit").to_numpy()
    order = np.argsort(keys, kind="stable")
    order = order[np.argsort(unit_of_row[order], kind="stable")]  # by unit, then key
    bounds = np.searchsorted(unit_of_row[order], [*units, max(units) + 1])
    table = table.drop_columns([KEY_COLUMN, "unit"])
    indexes: list[DonorIndex | None] = []
    for n in range(len(units)):
        rows = order[bounds[n] : bounds[n + 1]]
        indexes.append(DonorIndex(keys[rows], table.take(pa.array(rows)), 0) if len(rows) else None)
    return indexes
