"""The embedding stage: one work unit in, one committed Parquet file out. No Ray in here; the Ray
Data adapter in ``job.py`` runs one ``EmbedStage`` per actor.

Contract per unit (rows of one input file's row-group range):

| in                       | out                                                        |
|--------------------------|------------------------------------------------------------|
| id (or generated)        | id                                                         |
| text [, pair text]       | embedding fixed_size_list<float32>[dim]                    |
| passthrough columns      | passthrough columns, unchanged                             |
|                          | pair mode: embedding_pair, cosine                          |
|                          | reference mode: topk_ids, topk_scores (best first)         |

Commit protocol: the file is written under a temporary name that no Parquet reader or
``*.parquet`` glob picks up, then moved to its deterministic final name. A retried unit
rewrites the same name with the same rows, so retries never duplicate output.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed.encoder import ComputeChoice, TextEncoder
from sbertray.embed.shards import WorkUnit
from sbertray.embed.similarity import pair_cosine, top_k

TMP_PREFIX = "_inprogress-"
_MAX_ERRORS_SHOWN = 5


@dataclass
class ReferenceSet:
    ids: pa.Array
    embeddings: np.ndarray  # (m, dim) float32


@dataclass
class UnitResult:
    unit_id: str
    file: str  # relative input path
    rows_in: int
    rows_out: int = 0
    rows_dropped: int = 0  # rows skipped as bad (rows_out + rows_dropped == rows_in)
    bad_rows: dict = field(default_factory=dict)  # reason -> count (a row may have two)
    truncated: int = 0
    output: str | None = None  # relative output path once committed
    error: str | None = None
    error_kind: str | None = None  # "bad_rows" | "bad_file"
    seconds: float = 0.0
    finished_at: float = 0.0  # unix time the unit was committed (throughput over time)

    def to_row(self) -> dict:
        row = asdict(self)
        row["bad_rows"] = json.dumps(self.bad_rows)
        return row

    @classmethod
    def from_row(cls, row: dict) -> UnitResult:
        row = dict(row)
        row["bad_rows"] = json.loads(row["bad_rows"])
        return cls(**row)


class _BadRows:
    def __init__(self, unit: WorkUnit):
        self.unit = unit
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def add(self, index: int, column: str, reason: str, value=None) -> None:
        self.counts[reason] += 1
        if len(self.examples) < _MAX_ERRORS_SHOWN:
            shown = "" if value is None else f" (got {value!r:.60})"
            self.examples.append(
                f"{self.unit.file.url}: row {self.unit.first_row + index}: column `{column}`: "
                f"{reason}{shown}"
            )


def _decode(values: list, column: str, policy_utf8: str, bad: _BadRows) -> list:
    """Binary values to str per the UTF-8 policy (a failed decode becomes None + a bad row)."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                if policy_utf8 == "replace":
                    v = v.decode("utf-8", errors="replace")
                else:
                    bad.add(i, column, "invalid UTF-8", v)
                    v = _INVALID
        out.append(v)
    return out


_INVALID = object()  # marks a value already counted as bad


def _column_texts(table: pa.Table, column: str, config: EmbedConfig, bad: _BadRows) -> list:
    """Python texts for one column; None where the row cannot be embedded (already counted)."""
    policy = config.bad_input
    arr = table.column(column).combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr.validate(full=True)
            values = arr.to_pylist()
        except pa.ArrowInvalid:  # invalid UTF-8 inside a string column: decode row by row
            values = _decode(
                arr.cast(pa.large_binary()).to_pylist(), column, policy.on_invalid_utf8, bad
            )
    elif pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        values = _decode(arr.to_pylist(), column, policy.on_invalid_utf8, bad)
    else:  # a non-text column (only reaches here with on_null_text skip/empty)
        values = [v if v is None else _NON_STRING for v in arr.to_pylist()]
    texts = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            texts.append(v)
        elif v is _INVALID:
            texts.append(None)
        elif policy.on_null_text == "empty":
            texts.append("")
        else:
            reason = "null text" if v is None else "non-string text"
            bad.add(i, column, reason)
            texts.append(None)
    return texts


_NON_STRING = object()


def _fixed_list(values: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def build_encoder(model_path: str, choice: ComputeChoice, *, device: str, threads: int):
    """The encoder for ``choice``, with the process's torch threads set to its CPU share when it
    runs torch (exported backends take their thread count directly and never import torch)."""
    if choice.backend == "torch":
        import torch

        torch.set_num_threads(threads)
    return TextEncoder.for_job(model_path, choice, device=device, threads=threads)


class EmbedStage:
    """Loads the model once, then processes work units.

    Args:
        config: the job config.
        model_path: a local model directory (or hub id) already resolved on this node.
        device, choice: where and how to run the encoder (see ``encoder.py``).
        threads: intra-op threads; the actor's CPU share, so actors don't oversubscribe.
        schema_metadata: written into every output file's Parquet schema metadata.
        reference: the reference set for top-k (reference mode).
    """

    def __init__(
        self,
        config: EmbedConfig,
        *,
        model_path: str,
        device: str,
        choice: ComputeChoice,
        threads: int,
        schema_metadata: dict,
        reference: ReferenceSet | None = None,
    ):
        self.config = config
        self.encoder = build_encoder(model_path, choice, device=device, threads=threads)
        self.reference = reference
        self.schema_metadata = schema_metadata
        self.output = storage.resolve(config.output.path, config.storage)
        self.input_fs = None

    def _read(self, unit: WorkUnit) -> pa.Table:
        inp = self.config.input
        columns = [
            c
            for c in dict.fromkeys(
                [inp.id_column, inp.text_column, inp.pair_column, *inp.passthrough]
            )
            if c
        ]
        partition_keys = dict(unit.file.partitions)
        columns = [c for c in columns if c not in partition_keys]
        if self.input_fs is None:
            self.input_fs = storage.resolve(unit.file.url, self.config.storage).fs
        with self.input_fs.open_input_file(unit.file.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(unit.row_groups), columns=columns)
        for key in inp.passthrough:
            if key in partition_keys and key not in table.column_names:
                table = table.append_column(key, pa.array([partition_keys[key]] * table.num_rows))
        return table

    def process(self, unit: WorkUnit) -> UnitResult:
        started = time.time()
        result = UnitResult(unit_id=unit.unit_id, file=unit.file.rel, rows_in=unit.num_rows)
        try:
            table = self._read(unit)
        except (OSError, pa.ArrowException) as exc:
            result.error = f"{unit.file.url}: cannot read row groups {list(unit.row_groups)}: {exc}"
            result.error_kind = "bad_file"
            return result
        if table.num_rows != unit.num_rows:
            result.error = (
                f"{unit.file.url}: footer says {unit.num_rows} rows, read {table.num_rows}"
            )
            result.error_kind = "bad_file"
            return result

        inp, bad = self.config.input, _BadRows(unit)
        texts = _column_texts(table, inp.text_column, self.config, bad)
        pairs = _column_texts(table, inp.pair_column, self.config, bad) if inp.pair_column else None
        keep = np.array(
            [
                t is not None and (pairs is None or pairs[i] is not None)
                for i, t in enumerate(texts)
            ],
            dtype=bool,
        )
        must_fail = bad.counts["invalid UTF-8"] or (
            self.config.bad_input.on_null_text == "fail"
            and bad.counts["null text"] + bad.counts["non-string text"]
        )
        if must_fail:
            result.error = "bad rows (or set the `bad_input` policies to skip/replace):\n  " + (
                "\n  ".join(bad.examples)
            )
            result.error_kind = "bad_rows"
            return result
        result.bad_rows = {reason: n for reason, n in bad.counts.items() if n}
        # A row bad in both pair columns is dropped once: this is what the invariant counts.
        result.rows_dropped = int((~keep).sum())

        kept_idx = np.flatnonzero(keep)
        encoded = self.encoder.encode([texts[i] for i in kept_idx])
        result.truncated = encoded.truncated
        columns: dict[str, pa.Array] = {}
        if inp.id_column:
            columns["id"] = table.column(inp.id_column).take(pa.array(kept_idx))
        else:
            columns["id"] = pa.array([f"{unit.file.rel}#{unit.first_row + i}" for i in kept_idx])
        for name in inp.passthrough:
            if name != inp.id_column:
                columns[name] = table.column(name).take(pa.array(kept_idx))
        dim = encoded.embeddings.shape[1]
        columns["embedding"] = _fixed_list(encoded.embeddings, dim)
        if pairs is not None:
            encoded_pair = self.encoder.encode([pairs[i] for i in kept_idx])
            result.truncated += encoded_pair.truncated
            columns["embedding_pair"] = _fixed_list(encoded_pair.embeddings, dim)
            columns["cosine"] = pa.array(pair_cosine(encoded.embeddings, encoded_pair.embeddings))
        if self.reference is not None:
            k = min(self.config.reference.top_k, len(self.reference.ids))
            idx, scores = top_k(encoded.embeddings, self.reference.embeddings, k)
            columns["topk_ids"] = pa.FixedSizeListArray.from_arrays(
                self.reference.ids.take(pa.array(idx.reshape(-1))), k
            )
            columns["topk_scores"] = _fixed_list(scores, k)
        result.output = unit.output_rel
        result.rows_out = len(kept_idx)
        # Each output file records the unit it completes: a rerun after a crash reads these
        # footers to skip committed units (see job._committed_units).
        record = {
            "unit_id": unit.unit_id,
            "input": unit.file.fingerprint,
            "rows_in": unit.num_rows,
            "rows_dropped": result.rows_dropped,
            "bad_rows": result.bad_rows,
            "truncated": result.truncated,
        }
        meta = json.dumps({**self.schema_metadata, "unit": record}).encode()
        out_table = pa.table(columns).replace_schema_metadata({b"sbertray": meta})
        self._commit(out_table, unit.output_rel)
        result.finished_at = time.time()
        result.seconds = round(result.finished_at - started, 3)
        return result

    def _commit(self, table: pa.Table, rel: str) -> None:
        final = self.output.child(rel)
        directory, name = final.path.rsplit("/", 1)
        tmp = storage.Location(
            self.output.fs,
            f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}.tmp",
            storage.join(self.output.url, rel + ".tmp"),
        )
        compression = self.config.output.compression
        try:
            self.output.fs.create_dir(directory, recursive=True)
            pq.write_table(
                table,
                tmp.path,
                filesystem=self.output.fs,
                compression=None if compression == "none" else compression,
            )
        except OSError as exc:
            storage.delete(tmp)
            raise storage.StorageError(
                f"could not write {storage.redact(final.url)}: {exc}"
            ) from exc
        storage.move(tmp, final)
