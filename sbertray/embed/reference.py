"""The reference set of reference mode, in one place: checked while planning (footers only),
then read and embedded once per run; each input row gets its top-k most similar references."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed import backends
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.shards import EmbedInputError, InputFile, discover, read_footer
from sbertray.modeling import resolve_model_path


@dataclass
class ReferenceSet:
    ids: pa.Array
    embeddings: np.ndarray  # (m, dim) float32


def _checked_files(config: EmbedConfig) -> tuple[pafs.FileSystem, list[InputFile]]:
    """The reference set's files, each a readable Parquet file with the configured columns
    (footers only)."""
    ref = config.reference
    fs, files = discover(ref.path, config.storage)
    if not files:
        raise EmbedInputError(
            f"reference `{storage.redact(str(ref.path))}`: no Parquet files found"
        )
    checked_files = []
    for f in files:
        checked, meta, _ = read_footer(fs, f)
        if checked.error:
            raise EmbedInputError(f"reference: {checked.error}")
        schema = meta.schema.to_arrow_schema()
        for key, column in (("id_column", ref.id_column), ("text_column", ref.text_column)):
            if column not in schema.names:
                raise EmbedInputError(
                    f"reference {f.url}: missing column `{column}` (reference.{key}); "
                    f"the file has {schema.names}"
                )
        checked_files.append(checked)
    return fs, checked_files


def check_reference(config: EmbedConfig) -> None:
    """The reference set's files exist and have the configured columns (planning: footers)."""
    if config.reference is None:
        return
    _, files = _checked_files(config)
    rows, top_k = sum(f.num_rows for f in files), config.reference.top_k
    if 0 < rows < top_k:
        print(
            f"[sbertray] reference.top_k is {top_k} but the reference set has {rows} rows: "
            f"each row gets all {rows}, best first",
            flush=True,
        )


def read_reference(config: EmbedConfig) -> tuple[pa.Array, list[str]]:
    """The reference set's ids and texts, checked: no null id or text, ids unique."""
    ref = config.reference
    fs, files = _checked_files(config)
    ids, texts = [], []
    for f in files:
        with fs.open_input_file(f.path) as handle:
            table = pq.read_table(handle, columns=[ref.id_column, ref.text_column])
        for i, (rid, text) in enumerate(
            zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
        ):
            if rid is None or not isinstance(text, str):
                problem = "null id" if rid is None else "null or non-string text"
                raise EmbedInputError(f"reference {f.url}: row {i}: {problem}")
        ids.append(table.column(0))
        texts.extend(table.column(1).to_pylist())
    if not texts:
        raise EmbedInputError(f"reference `{storage.redact(str(ref.path))}` has no rows")
    all_ids = pa.chunked_array([c for chunk in ids for c in chunk.chunks]).combine_chunks()
    if pc.count_distinct(all_ids).as_py() != len(all_ids):
        raise EmbedInputError(f"reference `{storage.redact(str(ref.path))}`: ids are not unique")
    return all_ids, texts


def embed_reference(config: EmbedConfig, encoder: EncoderSpec) -> ReferenceSet:
    """Reads and embeds the reference set (once per run, on a node sized like an actor)."""
    ids, texts = read_reference(config)
    model_dir = resolve_model_path(encoder.model, config.storage, encoder.model_hash)
    with backends.build_encoder(encoder, model_dir) as text_encoder:
        embeddings = text_encoder.encode(texts).embeddings
    return ReferenceSet(ids=ids, embeddings=embeddings)
