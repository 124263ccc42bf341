"""Input checks that need more than one file's footer, run before any actor starts: ids
across the whole input, the output's place relative to the input, the reference set."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import ConfigError, EmbedConfig
from sbertray.embed.shards import EmbedInputError, InputFile, discover, read_footer

_IDS_SHOWN = 5
_ID_READERS = 16  # id columns read at once (object-store latency dominates)


def check_ids(
    config: EmbedConfig, fs: pafs.FileSystem, files: list[InputFile], schemas: list[pa.Schema]
) -> None:
    """Refuses ids that would break "every id exactly once": a type that differs between
    files, a null id, or one id twice (within a file or across files). Reads only the id
    column; names the files and up to five ids."""
    column = config.input.id_column
    if column is None or not files:
        return
    types: dict[str, str] = {}
    for f, schema in zip(files, schemas, strict=True):
        types.setdefault(str(schema.field(column).type), f.url)
    if len(types) > 1:
        shown = "; ".join(f"{t} in {url}" for t, url in types.items())
        raise EmbedInputError(
            f"input.id_column `{column}` has different types across files: {shown}"
        )

    def read(f: InputFile) -> pa.ChunkedArray:
        try:
            with fs.open_input_file(f.path) as handle:
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
    table = pa.table(
        {
            "id": pa.chunked_array([c for col in columns for c in col.chunks], columns[0].type),
            "file": pa.array(
                np.repeat(np.arange(len(columns), dtype=np.int32), [len(c) for c in columns])
            ),
        }
    )
    counts = table.group_by("id").aggregate([("file", "count"), ("file", "distinct")])
    repeated = counts.filter(pc.greater(counts["file_count"], 1))
    if repeated.num_rows:
        shown = repeated.slice(0, _IDS_SHOWN)
        where = sorted({files[i].url for ids in shown["file_distinct"].to_pylist() for i in ids})
        raise EmbedInputError(
            f"input.id_column `{column}`: {repeated.num_rows} ids occur more than once, e.g. "
            f"{shown['id'].to_pylist()}, in {', '.join(where)}; ids must be unique across the input"
        )


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
