"""Reading a work unit's rows from its input files: the stage reads them to embed, the donor
join (``donor_join``) to hash their texts. Unreadable slices are reported, not raised: the
driver fails or skips them by ``bad_input.on_bad_file``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed.shards import FileSlice, WorkUnit

_SLICE_READERS = 8  # small input files of one unit read at once


def input_columns(config: EmbedConfig) -> list[str]:
    """The columns a unit's rows are read with: id, text, pair text, passthrough."""
    inp = config.input
    names = [inp.id_column, inp.text_column, inp.pair_column, *inp.passthrough]
    return [c for c in dict.fromkeys(names) if c]


class UnitReader:
    """Reads units of one input (its filesystem opened once, on first use)."""

    def __init__(self, config: EmbedConfig):
        self.config = config
        self.input_fs = None

    def _read(self, piece: FileSlice, columns: list[str]) -> pa.Table:
        partition_keys = dict(piece.file.partitions)
        columns = [c for c in columns if c not in partition_keys]
        if self.input_fs is None:
            self.input_fs = storage.resolve(piece.file.url, self.config.storage).fs
        with self.input_fs.open_input_file(piece.file.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(piece.row_groups), columns=columns)
        if table.num_rows != piece.num_rows:
            raise OSError(f"footer says {piece.num_rows} rows, read {table.num_rows}")
        return table

    def read(
        self, unit: WorkUnit, columns: list[str] | None = None
    ) -> tuple[list[FileSlice], pa.Table | None, dict]:
        """The unit's readable slices and their rows as one table (``columns``, by default
        ``input_columns``), and the files that could not be read (relative path -> message).
        Many small files are read a few at once: object-storage latency, not bandwidth, bounds
        them."""
        columns = columns or input_columns(self.config)

        def read(piece: FileSlice) -> pa.Table | str:
            try:
                return self._read(piece, columns)
            except (OSError, pa.ArrowException) as exc:
                groups = list(piece.row_groups)
                return f"{piece.file.url}: cannot read row groups {groups}: {exc}"

        if len(unit.slices) == 1:
            tables = [read(unit.slices[0])]
        else:
            with ThreadPoolExecutor(max_workers=_SLICE_READERS) as pool:
                tables = list(pool.map(read, unit.slices))
        good = [(p, t) for p, t in zip(unit.slices, tables, strict=True) if not isinstance(t, str)]
        bad_files = {
            p.file.rel: t for p, t in zip(unit.slices, tables, strict=True) if isinstance(t, str)
        }
        if not good:
            return [], None, bad_files
        # Files of one folder may differ in string widths or nullability: the widest wins.
        table = pa.concat_tables([t for _, t in good], promote_options="permissive")
        return [p for p, _ in good], table, bad_files
