"""Nearest rows of an embed output to query texts (``sbertray search``).

A query is embedded by the model, backend and precision the output's manifest records (and
stored as the output stores vectors: truncated, float16), so it is the vector the run would
have written for the same text. A Lance output is searched through its vector index (exactly
where it has none); a Parquet output is scanned exactly, with DuckDB, batch by batch.

    searcher = OutputSearcher("runs/embed_demo")
    for hit in searcher.search(["intro to statistics"], k=5)[0].hits: ...
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sbertray import storage
from sbertray.config import EmbedConfig, StorageConfig
from sbertray.embed import backends, compact, lance_index
from sbertray.embed.commit import MANIFEST, output_parts, read_manifest
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.lance_sink import lance_options, open_dataset, parts_dataset
from sbertray.embed.prepared import prepare_job_model
from sbertray.errors import UserError
from sbertray.hardware import has_cuda
from sbertray.output_paths import LANCE_PARTS_DIR

# Columns a hit never shows: the vectors themselves and the bookkeeping.
_HIDDEN = {"embedding", "embedding_pair", "content_key", "_part"}


class SearchError(UserError, ValueError):
    """The output cannot be searched as asked; the message says why and what to do."""


@dataclass
class SearchResult:
    query: str
    hits: list[dict]  # id, score, then the output's other columns, best first
    method: str  # "ivf_pq index", "exact scan", ...
    seconds: float = 0.0


class OutputSearcher:
    """An embed output opened for searching: its manifest read, its model loaded once."""

    def __init__(self, output: str, storage_config: StorageConfig | None = None, exact=False):
        self.url = storage.absolute(output) if not storage.is_url(output) else output
        self.storage = storage_config or StorageConfig()
        self.manifest, self.format = _read_manifest(self.url, self.storage)
        config = EmbedConfig.model_validate(
            {**self.manifest["config"], "storage": self.storage.model_dump()}
        )
        self.output = config.output
        if self.output.embedding_dtype not in ("float32", "float16"):
            raise SearchError(
                f"{storage.redact(self.url)} stores `embedding_dtype: "
                f"{self.output.embedding_dtype}`; search compares float32 and float16 vectors"
            )
        self.encoder = _query_encoder(config, self.manifest)
        self.index = None if exact else (self.manifest.get("lance") or {}).get("index")
        self.dataset = self._open_lance() if self.format == "lance" else None

    def _open_lance(self):
        dataset = open_dataset(self.url, lance_options(self.storage))
        if dataset is None:
            raise SearchError(
                f"{storage.redact(self.url)}: the manifest names a Lance dataset "
                "that has no version: rerun `sbertray embed` with the same config"
            )
        has_index = any(i.name == lance_index.INDEX_NAME for i in dataset.describe_indices())
        if self.index and self.index.get("built") and not has_index:
            raise SearchError(
                f"{storage.redact(self.url)}: the last run built a vector index "
                f"({self.index['type']}) and the dataset has none now (dropped, or restored "
                "to an older version): rerun `sbertray embed` with the same config to build "
                "it again, or search with --exact"
            )
        return dataset

    def embed(self, queries: list[str]) -> np.ndarray:
        """The queries' vectors as the output stores them, as float32."""
        vectors = self.encoder.encode(queries).embeddings
        return compact.compact(vectors, self.output, None).astype(np.float32)

    def search(
        self, queries: list[str], k: int = 10, where: str | None = None
    ) -> list[SearchResult]:
        """The ``k`` rows nearest each query (cosine), among those ``where`` (SQL) selects."""
        results = []
        for query, vector in zip(queries, self.embed(queries), strict=True):
            started = time.perf_counter()
            if self.dataset is not None:
                table, method = self._lance_hits(vector, k, where), self._method()
            else:
                table, method = self._parquet_hits(vector, k, where), "exact scan"
            seconds = time.perf_counter() - started
            results.append(SearchResult(query, table.to_pylist(), method, seconds))
        return results

    def _method(self) -> str:
        return (
            f"{self.index['type']} index"
            if self.index and self.index.get("built")
            else "exact scan"
        )

    def _lance_hits(self, vector: np.ndarray, k: int, where: str | None) -> pa.Table:
        columns = [n for n in self.dataset.schema.names if n not in _HIDDEN]
        try:
            table = self.dataset.to_table(
                columns=[*columns, "_distance"],
                nearest=lance_index.nearest(self.index, vector, k),
                filter=where,
                prefilter=where is not None,
            )
        except (ValueError, OSError) as exc:
            raise SearchError(_where_error(where, exc)) from None
        metric = (self.index or {}).get("metric", "cosine")
        distance = table.column("_distance").to_numpy()
        score = 1.0 - distance if metric == "cosine" else -distance
        ordered = ["id", *[c for c in columns if c != "id"]]
        return table.select(ordered).add_column(1, "score", pa.array(score, pa.float32()))

    def _parquet_hits(self, vector: np.ndarray, k: int, where: str | None) -> pa.Table:
        import duckdb

        out = storage.resolve(self.url, self.storage)
        parts = output_parts({i.path for i in storage.list_files(out)})
        rows = parts_dataset(out, sorted(parts))
        shown = [n for n in rows.schema.names if n not in _HIDDEN]
        width = len(vector)
        as_float32 = pa.schema(
            [pa.field("embedding", pa.list_(pa.float32(), width))]
            + [rows.schema.field(n) for n in shown]
        )
        batches = (
            b.cast(as_float32)
            for b in rows.to_batches(columns=["embedding", *shown], batch_size=16_384)
        )
        connection = duckdb.connect()
        connection.register("source", pa.RecordBatchReader.from_batches(as_float32, batches))
        listed = ", ".join(f'"{n}"' for n in shown)
        sql = (
            f"SELECT {listed}, array_cosine_similarity(embedding, $q::FLOAT[{width}]) AS score "
            f"FROM source {f'WHERE {where}' if where else ''} ORDER BY score DESC LIMIT {int(k)}"
        )
        try:
            table = connection.sql(sql, params={"q": vector.tolist()}).to_arrow_table()
        except duckdb.Error as exc:
            raise SearchError(_where_error(where, exc)) from None
        return table.select(["id", "score", *[c for c in shown if c != "id"]])


def _read_manifest(url: str, storage_config: StorageConfig) -> tuple[dict, str]:
    """The output's manifest and its format (a Lance output keeps it beside the dataset)."""
    root = storage.resolve(url, storage_config)
    for fmt, records in (("lance", root.child(LANCE_PARTS_DIR)), ("parquet", root)):
        manifest = read_manifest(records)
        if manifest is not None:
            return manifest, fmt
    raise SearchError(
        f"{storage.redact(url)} holds no embed output (no {MANIFEST} there or in "
        f"{LANCE_PARTS_DIR}/): give the `output.path` of a finished `sbertray embed` run"
    )


def _query_encoder(config: EmbedConfig, manifest: dict):
    """The encoder the run used (its manifest's `compute`), on this machine's CPU where the run
    had a GPU and this machine has none; the model must be the one the run hashed."""
    model = prepare_job_model(config)
    if model.model_hash != manifest["model"]["model_hash"]:
        raise SearchError(
            f"the model {manifest['model']['model']} has changed since the output was written "
            "(another hash): its queries would not match the stored vectors; search with the "
            "model the run used, or embed the output again"
        )
    recorded = manifest.get("compute")
    if recorded and (recorded["device"] == "cpu" or has_cuda()):
        recorded = {**recorded, "threads": None}  # a query gets every core, not an actor's share
        spec = EncoderSpec(model=model.path, model_hash=model.model_hash, **recorded)
    else:  # a run that embedded nothing records no encoder: the one it would resolve here
        spec = backends.encoder_spec(
            config.compute.model_copy(update={"device": "cpu"}),
            model=model.path,
            model_hash=model.model_hash,
            device="cpu",
            threads=None,
            exportable=model.exportable,
        )
    return backends.build_encoder(spec, model.path)


def _where_error(where: str | None, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r",? /\S+\.rs:\d+:\d+$", "", first)  # Lance's Rust source location
    if where is None:
        return f"search failed: {first}"
    return f"--where {where!r} is not a filter this output can run: {first}"
