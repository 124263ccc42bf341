"""Row-level reuse at any size: donor rows reach their units by a hash join, so no process
(and no object store) holds them all. No Ray in here: ``ray_adapter.join_donors`` runs these
steps as Ray tasks.

A rewritten snapshot shuffles its rows across files, so one unit's donors lie in every donor
file's row groups: reading "only the rows a unit copies" would read nearly every donor file once
per unit. Instead the computed columns move once, hash-partitioned by content key:

1. **map**: each group of units hashes its texts into (key, unit, rows) per distinct key of a
   unit; each donor file gives its keys and computed columns, a repeated key once. Both are
   split into ``buckets`` by key.
2. **join**, one task per bucket: the bucket's donor keys once (``np.unique``), each unit key
   looked up; the matched columns, tagged with their unit, split by group of units.
3. **gather**, one task per group: each unit's donor rows, sorted by key; the actor embedding
   a unit reads its own (``JoinedDonors.read``) just before it embeds the unit.

Every step writes its pieces as record batches of one Arrow IPC file under the output's
``_donor_join/`` folder and returns counts at most: the donors move through files on the output's
storage, never through Ray's object store, which would otherwise hold a copy of every donor row
from the maps to the last unit (6.9 GB, spilled, on a 4M-row rerun). The folder is the run's
scratch: deleted when the run ends, and by the next run if this one was killed.
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

JOIN_DIR = "_donor_join"  # the join's scratch folder in the output (readers skip "_" names)
BUCKET_BYTES = 128 << 20  # donor columns a join task holds, up to ~64 GB of donors (below)
# Each piece is one ranged read of a file, so donor maps and groups are large enough to give
# each bucket a piece of about PIECE_BYTES; past ~64 GB of donors, buckets grow as the square
# root of the donors' size instead, so the donor maps do not grow with them.
PIECE_BYTES = 256 << 10
# Unit rows one key map hashes, and at least one gather sorts out. Fixed for key maps: their
# texts are what a task holds (sized by buckets, at 4M rows they held 400k texts: 1.5x the
# memory of the largest task at 100k rows).
GROUP_ROWS = 65_536


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
    busy); donor maps and groups large enough that each piece they write is about
    ``PIECE_BYTES``; key maps of ``GROUP_ROWS`` unit rows."""
    size = sum(d.bytes for d in donors)
    row_bytes = max(1.0, size / max(1, sum(d.rows for d in donors)))
    by_size = min(math.ceil(size / BUCKET_BYTES), math.ceil(math.sqrt(size / PIECE_BYTES)))
    buckets = max(2, min_buckets, by_size)
    rows = [u.num_rows for u in units]
    return JoinPlan(
        buckets,
        key_maps=_chunks(rows, GROUP_ROWS),
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


def gather_group(pieces: list[pa.Table], units: list[int]) -> list[pa.Table]:
    """Gather, one group: each of ``units``' donor rows (keys and columns; none for a unit
    without donors), sorted by key. A unit's keys are already distinct (each matched once):
    sorting is enough."""
    table = pa.concat_tables(pieces, promote_options="permissive")
    keys = key_numpy(table.column(KEY_COLUMN))
    unit_of_row = table.column("unit").to_numpy()
    order = np.argsort(keys, kind="stable")
    order = order[np.argsort(unit_of_row[order], kind="stable")]  # by unit, then key
    bounds = np.searchsorted(unit_of_row[order], [*units, max(units) + 1])
    table = table.drop_columns(["unit"])
    return [table.take(pa.array(order[bounds[n] : bounds[n + 1]])) for n in range(len(units))]


def unit_index(table: pa.Table) -> DonorIndex | None:
    """A unit's gathered donor rows as the stage's ``DonorIndex`` (None: it has none)."""
    if not table.num_rows:
        return None
    return DonorIndex(key_numpy(table.column(KEY_COLUMN)), table.drop_columns([KEY_COLUMN]), 0)


def write_pieces(loc: storage.Location, pieces: list[pa.Table]) -> None:
    """``pieces`` (one schema) as record batch n of one Arrow IPC file at ``loc``, so a reader
    of piece n reads its bytes only. Uncompressed: vectors do not compress."""
    schema = pieces[0].schema
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    try:
        with loc.fs.open_output_stream(loc.path) as stream, pa.ipc.new_file(stream, schema) as out:
            for piece in pieces:
                batches = piece.to_batches()
                out.write_batch(pa.concat_batches(batches) if batches else empty)
    except OSError as exc:
        raise storage.StorageError(f"could not write {storage.redact(loc.url)}: {exc}") from exc


def read_piece(loc: storage.Location, n: int) -> pa.Table:
    """Piece ``n`` of the file ``write_pieces`` wrote at ``loc``."""
    with loc.fs.open_input_file(loc.path) as handle:
        return pa.Table.from_batches([pa.ipc.open_file(handle).get_batch(n)])


def group_file(root: storage.Location, group: int) -> storage.Location:
    """Where the gather of ``group`` writes its units' donor rows, under the join's ``root``."""
    return root.child("gathered", f"{group}.arrow")


@dataclass(frozen=True)
class JoinedDonors:
    """Where each unit's donor rows are once the join ran: piece ``places[i][1]`` of the group
    file ``places[i][0]`` under ``root``, for the i-th unit to embed; None for a unit without
    donors (nothing to read)."""

    root: storage.Location
    places: list[tuple[int, int] | None]

    def read(self, unit: int) -> DonorIndex | None:
        place = self.places[unit]
        if place is None:
            return None
        return unit_index(read_piece(group_file(self.root, place[0]), place[1]))
