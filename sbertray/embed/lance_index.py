"""The vector index of a Lance output and how a search uses it.

Built once the table holds ``output.index.min_rows`` rows; below that a search scans every
vector (exact, milliseconds on such tables). Sizes come from the row count unless set:

- ivf_pq: one partition per 4,096 rows, codes of ``dim / 8`` bytes; a search probes a fifth of
  the partitions (every one up to 16) and re-ranks ``30 x k`` candidates by their stored
  vectors. On a million noisy synthetic clusters a tenth and 10x lost a tenth of the true
  neighbours: both the probes and the re-ranking bound recall (docs/benchmarks.md).
- hnsw (Lance's IVF_HNSW_SQ): one partition per 500,000 rows, a graph in each.

Later runs add their rows to the index without retraining (``optimize_indices``: new rows go
into a delta segment); once the table has doubled since the index was trained, or the index
settings change, it is trained again: partitions sized for half the rows probe twice the rows.
Deleted and updated rows are masked by Lance itself.
"""

from __future__ import annotations

import math
import time

from sbertray.config import IndexConfig

INDEX_NAME = "embedding_idx"
COLUMN = "embedding"
_LANCE_TYPES = {"ivf_pq": "IVF_PQ", "hnsw": "IVF_HNSW_SQ"}
_ROWS_PER_PARTITION = {"ivf_pq": 4096, "hnsw": 500_000}
_REFINE = {"ivf_pq": 30, "hnsw": 5}
_HNSW_EF = 100  # candidates kept while walking a graph; Lance's default is k * 1.5


def settings(config: IndexConfig, rows: int, dim: int) -> dict:
    """The index's sizes and search effort for ``rows`` vectors of ``dim`` values."""
    partitions = config.num_partitions or max(1, rows // _ROWS_PER_PARTITION[config.type])
    chosen = {
        "type": config.type,
        "metric": config.metric,
        "num_partitions": partitions,
        "nprobes": config.nprobes or max(min(partitions, 16), math.ceil(partitions / 5)),
        "refine_factor": config.refine_factor or _REFINE[config.type],
    }
    if config.type == "ivf_pq":
        chosen["num_sub_vectors"] = config.num_sub_vectors or _sub_vectors(dim)
    else:
        chosen["ef"] = _HNSW_EF
    return chosen


def _sub_vectors(dim: int) -> int:
    """The most sub-vectors up to ``dim / 8`` that divide ``dim`` (Lance needs a divisor)."""
    return next(n for n in range(max(1, dim // 8), 0, -1) if dim % n == 0)


def refresh(dataset, config: IndexConfig, last: dict | None) -> dict:
    """Builds, extends, rebuilds or drops the index as the module docstring says; returns the
    manifest's index record (what a search needs to use it, and what was done)."""
    rows = dataset.count_rows()
    existing = _description(dataset) is not None
    if config.type == "none" or (rows < config.min_rows and not existing):
        if existing:
            dataset.drop_index(INDEX_NAME)
        why = "output.index.type: none" if config.type == "none" else "below min_rows"
        return {"built": False, "reason": f"{rows:,} rows; {why}: searches scan every vector"}
    dim = dataset.schema.field(COLUMN).type.list_size
    started = time.monotonic()
    last = last if last and last.get("built") else None
    if (
        not existing
        or last is None
        or _changed(config, last, dim)
        or rows >= 2 * last["trained_rows"]
    ):
        record = {**settings(config, rows, dim), "trained_rows": rows, "action": "trained"}
        dataset.create_index(
            COLUMN,
            _LANCE_TYPES[config.type],
            name=INDEX_NAME,
            metric=config.metric,
            replace=True,
            num_partitions=record["num_partitions"],
            num_sub_vectors=record.get("num_sub_vectors"),
        )
    else:  # the trained sizes stay; the search effort follows the config
        trained = config.model_copy(update={"num_partitions": last["num_partitions"]})
        version = dataset.latest_version
        dataset.optimize.optimize_indices(index_names=[INDEX_NAME])  # a no-op: no new version
        action = "extended" if dataset.latest_version != version else "kept"
        record = {**last, **settings(trained, rows, dim), "action": action}
    size = _description(dataset.checkout_version(dataset.latest_version)).total_size_bytes
    seconds = round(time.monotonic() - started, 3)
    return record | {"built": True, "rows": rows, "size_bytes": size, "seconds": seconds}


def _description(dataset):
    return next((i for i in dataset.describe_indices() if i.name == INDEX_NAME), None)


def _changed(config: IndexConfig, last: dict, dim: int) -> bool:
    """Whether the config asks for an index other than the trained one (the search effort may
    change without retraining)."""
    if (config.type, config.metric) != (last["type"], last["metric"]):
        return True
    if config.num_partitions and config.num_partitions != last["num_partitions"]:
        return True
    sub_vectors = config.num_sub_vectors or _sub_vectors(dim)
    return config.type == "ivf_pq" and sub_vectors != last.get("num_sub_vectors")


def nearest(record: dict | None, vector, k: int) -> dict:
    """Lance's ``nearest`` argument for a search of the output whose index ``record`` the
    manifest holds (an exact scan where it has none)."""
    query = {"column": COLUMN, "q": vector, "k": k, "metric": "cosine"}
    if not record or not record.get("built"):
        return query | {"use_index": False}
    query |= {"metric": record["metric"], "nprobes": record["nprobes"]}
    query["refine_factor"] = record["refine_factor"]
    if "ef" in record:
        query["ef"] = record["ef"]
    return query
