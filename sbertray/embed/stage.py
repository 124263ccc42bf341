"""The embedding stage: one work unit in, one committed Parquet file out. No Ray in here; the
Ray Data adapter (``ray_adapter``) runs one ``EmbedStage`` per actor.

Contract per unit (a large input file's row-group range, or small files of one folder), declared
by ``output_schema``:

| in                       | out                                                        |
|--------------------------|------------------------------------------------------------|
| id (or generated)        | id                                                         |
| text [, pair text]       | embedding fixed_size_list<dtype>[width] (``compact``)      |
| passthrough columns      | passthrough columns, unchanged                             |
|                          | pair mode: embedding_pair, cosine                          |
|                          | reference mode: topk_ids, topk_scores (best first)         |
|                          | content_key: 16-byte hash of the text (``reuse``)          |

A new output column is one entry in ``_stage_fields`` plus the code in ``EmbedStage._compute``
that computes it; the driver refuses passthrough columns that would collide with it, and the content
hash (``commit.content_hash``) follows the schema.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Collection, Mapping

import numpy as np
import pyarrow as pa

from sbertray import storage
from sbertray.config import ConfigError, EmbedConfig
from sbertray.embed import backends, compact, reuse
from sbertray.embed.commit import write_unit
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.reference import ReferenceSet
from sbertray.embed.results import UnitResult
from sbertray.embed.shards import FileSlice, WorkUnit
from sbertray.embed.similarity import pair_cosine, top_k
from sbertray.embed.texts import embeddable_texts
from sbertray.embed.unit_reader import UnitReader
from sbertray.modeling import resolve_model_path
from sbertray.output_paths import embed_parts_url


def output_schema(
    config: EmbedConfig,
    dim: int,
    input_types: Mapping[str, pa.DataType] | None = None,
    reference: ReferenceSet | None = None,
    partition_keys: Collection[str] = (),
) -> pa.Schema:
    """The columns of every output file, in order. ``input_types``: the unit's column types
    (ids and passthrough columns keep theirs); without them, and without the ``reference``,
    those types are null: enough for the names and for hashing the layout.

    Passthrough columns that are hive partition keys of the unit's file (``partition_keys``)
    stay in the output's mirrored ``key=value`` folders only, as in any hive dataset: in the
    files too, readers would fail to merge the column with the partition field."""
    types = defaultdict(pa.null, input_types or {})
    inp = config.input
    first, *computed = _stage_fields(config, dim, types, reference)
    passthrough = [
        pa.field(n, types[n])
        for n in inp.passthrough
        if n != inp.id_column and n not in partition_keys
    ]
    return pa.schema([first, *passthrough, *computed])


def _stage_fields(
    config: EmbedConfig, dim: int, types: Mapping[str, pa.DataType], reference
) -> list[pa.Field]:
    """The columns the stage itself writes: the id first, then what it computes."""
    inp, vector = config.input, compact.vector_type(config.output, dim)
    fields = [
        pa.field("id", types[inp.id_column] if inp.id_column else pa.string()),
        pa.field("embedding", vector),
    ]
    if inp.pair_column:
        fields += [pa.field("embedding_pair", vector), pa.field("cosine", pa.float32())]
    if config.reference is not None:
        k = min(config.reference.top_k, len(reference.ids)) if reference else config.reference.top_k
        fields += [
            pa.field("topk_ids", pa.list_(reference.ids.type if reference else pa.null(), k)),
            pa.field("topk_scores", pa.list_(pa.float32(), k)),
        ]
    return [*fields, pa.field(reuse.KEY_COLUMN, reuse.KEY_TYPE)]


def computed_columns(config: EmbedConfig) -> list[str]:
    """The columns a row's text decides (copied from a donor row with the same content key)."""
    own = [f.name for f in _stage_fields(config, 1, defaultdict(pa.null), None)]
    return [name for name in own if name not in ("id", reuse.KEY_COLUMN)]


def check_output_columns(config: EmbedConfig) -> None:
    """Refuses passthrough columns that would overwrite a column the stage writes."""
    inp = config.input
    own = [f.name for f in _stage_fields(config, 1, defaultdict(pa.null), None)]
    clashes = [c for c in inp.passthrough if c in own and c != inp.id_column]
    if clashes:
        raise ConfigError(
            f"`input.passthrough` has {clashes}, which the output writes itself "
            f"({', '.join(own)}); rename the input column or leave it out"
        )


def _per_file(
    slices: list[FileSlice], starts: list[int], keep: np.ndarray, bad_by_file: dict
) -> dict:
    """Each input file's rows written and dropped, and its bad rows by reason (the manifest
    reports input files, whatever unit they were grouped into)."""
    per_file = {}
    for piece, start in zip(slices, starts, strict=True):
        written = int(keep[start : start + piece.num_rows].sum())
        per_file[piece.file.rel] = {
            "rows_out": written,
            "rows_dropped": piece.num_rows - written,
            "bad_rows": dict(bad_by_file.get(piece.file.rel, {})),
        }
    return per_file


def _fixed_list(values: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


class EmbedStage:
    """Loads the model once, then processes work units.

    Args:
        config: the job config.
        encoder: what to run (model, backend, precision, device, threads, batch sizes); the
            model is resolved on this node, downloaded once per node if it is remote.
        run_metadata: written into every output file's Parquet schema metadata.
        reference: the reference set for top-k (reference mode).
        donors: earlier output rows whose computed columns are copied for equal texts.
    """

    def __init__(
        self,
        config: EmbedConfig,
        encoder: EncoderSpec,
        run_metadata: dict,
        reference: ReferenceSet | None = None,
        donors: reuse.DonorIndex | None = None,
    ):
        self.config = config
        self.donors = donors
        model_dir = resolve_model_path(encoder.model, config.storage, encoder.model_hash)
        self.encoder = backends.build_encoder(encoder, model_dir)
        self.reference = reference
        self.run_metadata = run_metadata
        self.output = storage.resolve(embed_parts_url(config.output), config.storage)
        names = computed_columns(config)
        self._computed_schema = pa.schema(
            [
                f
                for f in output_schema(config, self.encoder.dim, reference=reference)
                if f.name in names
            ]
        )
        self.reader = UnitReader(config)

    def close(self) -> None:
        self.encoder.close()

    def process(self, unit: WorkUnit, donors: reuse.DonorIndex | None = None) -> UnitResult:
        """Embeds ``unit`` and writes its output file. ``donors``: this unit's own donor rows
        (from the distributed join) instead of the stage's shared index."""
        started = time.time()
        result = UnitResult(unit_id=unit.unit_id, rows_in=unit.num_rows)
        slices, table, result.bad_files = self.reader.read(unit)
        if result.bad_files and (table is None or self.config.bad_input.on_bad_file == "fail"):
            return result  # the driver fails or skips them (`bad_input.on_bad_file`)

        texts, pairs, keep, bad = embeddable_texts(self.config, slices, table)
        result.error = bad.failure(self.config)
        if result.error:
            return result
        result.bad_rows = {reason: n for reason, n in bad.counts.items() if n}
        result.bad_examples = bad.examples
        # A row bad in both pair columns is dropped once: this is what the invariant counts.
        result.rows_dropped = int((~keep).sum())
        result.files = _per_file(slices, bad.starts, keep, bad.by_file)

        kept_idx = np.flatnonzero(keep)
        texts = [texts[i] for i in kept_idx]
        pairs = [pairs[i] for i in kept_idx] if pairs is not None else None
        keys = reuse.row_keys(self.run_metadata["content_hash"], texts, pairs)
        computed, result.rows_reused, result.rows_embedded, result.truncated = self._computed(
            keys, texts, pairs, self.donors if donors is None else donors
        )
        columns = self._passthrough(slices, bad.starts, table, kept_idx)
        columns.update({name: computed.column(name) for name in computed.column_names})
        columns[reuse.KEY_COLUMN] = reuse.key_array(keys)
        types = {name: table.schema.field(name).type for name in table.column_names}
        partition_keys = {key for key, _ in unit.file.partitions}
        schema = output_schema(self.config, self.encoder.dim, types, self.reference, partition_keys)
        result.output, result.run_id = unit.output_rel, self.run_metadata.get("run_id", "")
        result.rows_out = len(kept_idx)
        # Each output file records the unit it completes: a rerun after a crash reads these
        # footers to skip committed units (see commit.committed_units).
        meta = json.dumps({**self.run_metadata, "unit": result.footer_record(unit)}).encode()
        out_table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
        out_table = out_table.replace_schema_metadata({b"sbertray": meta})
        write_unit(self.output, unit.output_rel, out_table, self.config.output.compression)
        result.finished_at = time.time()
        result.seconds = round(result.finished_at - started, 3)
        return result

    def _computed(
        self,
        keys: np.ndarray,
        texts: list[str],
        pairs: list[str] | None,
        donors: reuse.DonorIndex | None,
    ) -> tuple[pa.Table, int, int, int]:
        """The computed columns of every kept row, in row order: copied from the donors where
        the key is known, else computed once per distinct key. Returns them with the rows
        reused, the texts embedded, and how many of those were truncated."""
        found = donors.lookup(keys) if donors is not None else np.full(len(keys), -1)
        missing = np.flatnonzero(found < 0)
        # Repeated texts (same key) are embedded once and their columns copied to each row.
        _, first, inverse = np.unique(keys[missing], return_index=True, return_inverse=True)
        todo = missing[first]
        encoded = self.encoder.encode([texts[i] for i in todo])
        encoded_pair = self.encoder.encode([pairs[i] for i in todo]) if pairs is not None else None
        fresh = self._compute(encoded.embeddings, encoded_pair.embeddings if encoded_pair else None)
        truncated = encoded.truncated + (encoded_pair.truncated if encoded_pair else 0)
        # Each row picks its columns: fresh ones (in the order of `todo`), then the donors'.
        reused = np.flatnonzero(found >= 0)
        order = np.empty(len(keys), dtype=np.int64)
        order[missing] = inverse.reshape(-1)
        order[reused] = len(todo) + np.arange(len(reused))
        if len(reused):
            donated = donors.columns.take(pa.array(found[reused]))
            fresh = pa.concat_tables([fresh, donated.cast(fresh.schema)])
        if not np.array_equal(order, np.arange(len(keys))):
            fresh = fresh.take(pa.array(order))
        return fresh, len(reused), len(todo), truncated

    def _passthrough(
        self, slices: list[FileSlice], starts: list[int], table: pa.Table, kept_idx: np.ndarray
    ) -> dict:
        """The id and passthrough columns of the kept rows (``starts``: each slice's first
        row in ``table``)."""
        inp, take = self.config.input, pa.array(kept_idx)
        columns: dict[str, pa.Array] = {}
        if inp.id_column:
            columns["id"] = table.column(inp.id_column).take(take)
        else:
            which = np.searchsorted(starts, kept_idx, side="right") - 1
            columns["id"] = pa.array(
                [
                    f"{slices[s].file.rel}#{slices[s].first_row + i - starts[s]}"
                    for s, i in zip(which.tolist(), kept_idx.tolist(), strict=True)
                ],
                pa.string(),
            )
        for name in inp.passthrough:
            if name in table.column_names and name != inp.id_column:
                columns[name] = table.column(name).take(take)
        return columns

    def _compute(self, embeddings: np.ndarray, pair_embeddings: np.ndarray | None) -> pa.Table:
        """The computed columns (``computed_columns``) of freshly embedded texts, scores from
        the full float32 vectors."""
        if not len(embeddings):
            return self._computed_schema.empty_table()
        output, ranges = self.config.output, self.run_metadata.get("int8_ranges")
        stored = compact.width(output, self.encoder.dim)
        columns = {"embedding": _fixed_list(compact.compact(embeddings, output, ranges), stored)}
        if pair_embeddings is not None:
            columns["embedding_pair"] = _fixed_list(
                compact.compact(pair_embeddings, output, ranges), stored
            )
            columns["cosine"] = pa.array(pair_cosine(embeddings, pair_embeddings), pa.float32())
        if self.reference is not None:
            k = min(self.config.reference.top_k, len(self.reference.ids))
            idx, scores = top_k(embeddings, self.reference.embeddings, k)
            columns["topk_ids"] = pa.FixedSizeListArray.from_arrays(
                self.reference.ids.take(pa.array(idx.reshape(-1))), k
            )
            columns["topk_scores"] = _fixed_list(scores, k)
        return pa.table(columns)
