"""Lance output (``output.format: lance``): the run's committed Parquet parts synced into one
Lance dataset at ``output.path``, one transaction a run.

Why the parts stay (under ``<path>/_sbertray``, with the manifest, report and lock): they are
what makes a run exactly once and a rerun incremental. Each part records the unit it completes,
so a rerun embeds only missing or changed units and copies unchanged texts' vectors from the
parts it replaces (joined on Ray at scale). Writing units as Lance fragments would need all of
that again over Lance; the sync keeps one mechanism, at the cost of a second copy of the rows.

The sync runs after the parts are committed and before the manifest:

- every row carries ``_part``: the part it came from and the run that wrote that part;
- rows of parts no longer committed (input changed, deleted, replaced) are deleted, and rows of
  committed parts not yet in the dataset upserted by ``id``, in one ``merge_insert``: one new
  version, or none when nothing changed. A killed sync leaves no version behind and the rerun
  (nothing left to embed) syncs again;
- then the vector index (``lance_index``) and the versions past ``output.retain_versions``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from sbertray import storage
from sbertray.config import EmbedConfig, StorageConfig
from sbertray.embed import lance_index
from sbertray.embed.commit import output_parts
from sbertray.embed.results import UnitResult

PART_COLUMN = "_part"
_BATCH_ROWS = 16_384  # rows per batch streamed from the parts into Lance


def lance_options(config: StorageConfig | None) -> dict[str, str]:
    """Lance's object-store options for the endpoint that ``storage`` uses (credentials
    otherwise come from the AWS environment, as for every other read and write)."""
    options: dict[str, str] = {}
    endpoint = storage.endpoint_url(config)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["aws_endpoint"] = f"{parsed.scheme}://{parsed.netloc.rsplit('@', 1)[-1]}"
        if parsed.scheme == "http":
            options["allow_http"] = "true"
        if parsed.username:
            options["aws_access_key_id"] = unquote(parsed.username)
            options["aws_secret_access_key"] = unquote(parsed.password or "")
    if config is not None and config.region:
        options["aws_region"] = config.region
    if config is not None and config.anonymous:
        options["aws_skip_signature"] = "true"
    return options


def lance_uri(url: str) -> str:
    return url if storage.is_url(url) and not url.startswith("file://") else storage.absolute(url)


def import_lance():
    """``lance``, its Rust log kept to errors: its warnings (a dataset created, k-means
    clusters left empty on small tables) are not the user's to act on."""
    os.environ.setdefault("LANCE_LOG", "error")
    import lance

    return lance


def open_dataset(url: str, options: dict[str, str]):
    """The dataset's latest version, or None where no version was ever committed."""
    lance = import_lance()

    try:
        return lance.dataset(lance_uri(url), storage_options=options)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if "not found" in str(exc).lower() or isinstance(exc, FileNotFoundError):
            return None
        message = f"cannot open the Lance dataset {storage.redact(url)}: {exc}"
        raise storage.StorageError(message) from None


@dataclass
class SyncResult:
    """What the sync did, for the manifest (``lance``)."""

    uri: str
    version: int | None = None  # None: no rows committed yet
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    versions_removed: int = 0
    seconds: float = 0.0
    index: dict | None = None

    def record(self) -> dict:
        return asdict(self)


def sync(
    config: EmbedConfig,
    parts: storage.Location,
    committed: list[UnitResult],
    last_index: dict | None,
) -> SyncResult:
    """Makes the Lance dataset at ``config.output.path`` hold exactly the committed parts' rows
    (see the module docstring); ``last_index``: the last manifest's index record."""
    started = time.monotonic()
    options = lance_options(config.storage)
    result = SyncResult(uri=storage.redact(config.output.path))
    dataset = open_dataset(config.output.path, options)
    present = _present_keys(dataset)
    on_disk = {_rel(parts, p) for p in output_parts({i.path for i in storage.list_files(parts)})}
    wanted = {r.output: f"{r.output}@{r.run_id}" for r in committed if r.output}
    add = {rel: key for rel, key in wanted.items() if key not in present}
    drop = {k for k in present if _rel_of(k) not in on_disk or wanted.get(_rel_of(k), k) != k}
    if add or drop:
        replaces_all = bool(add and drop) and drop == present
        dataset = _write(
            config.output.path, options, dataset, parts, add, drop, replaces_all, result
        )
    if dataset is not None:
        result.rows = dataset.count_rows()
        result.index = lance_index.refresh(dataset, config.output.vector_index, last_index)
        result.versions_removed = _clean_up(dataset, config.output.retain_versions)
        result.version = dataset.latest_version
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _rel(parts: storage.Location, path: str) -> str:
    return path[len(parts.path) :].lstrip("/")


def _rel_of(key: str) -> str:
    return key.rsplit("@", 1)[0]


def _present_keys(dataset) -> set[str]:
    """The ``_part`` values in the dataset, streamed: one column, never the rows."""
    if dataset is None:
        return set()
    if PART_COLUMN not in dataset.schema.names:
        raise storage.StorageError(
            f"the Lance dataset {dataset.uri} was not written by sbertray (it has no "
            f"`{PART_COLUMN}` column): write the output to a new `output.path`"
        )
    present: set[str] = set()
    for batch in dataset.to_batches(columns=[PART_COLUMN]):
        present.update(pc.unique(batch.column(0)).to_pylist())
    return present


def _write(
    url,
    options,
    dataset,
    parts,
    add: dict[str, str],
    drop: set[str],
    replaces_all: bool,
    result: SyncResult,
):
    """One transaction: a new dataset (or, ``replaces_all``, every part replaced), a delete, or
    a merge."""
    lance = import_lance()

    uri = lance_uri(url)
    if dataset is None or replaces_all:
        rows = _part_rows(parts, add)
        mode = "create" if dataset is None else "overwrite"
        if dataset is None and storage.exists(storage.resolve(url)):  # a killed first write
            mode = "overwrite"
        dataset = lance.write_dataset(rows, uri, mode=mode, storage_options=options)
        result.inserted = dataset.count_rows()
        return dataset
    if not add:
        result.deleted = dataset.count_rows(_in_filter(drop))
        dataset.delete(_in_filter(drop))
        return lance.dataset(uri, storage_options=options)
    merge = dataset.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
    if drop:
        merge = merge.when_not_matched_by_source_delete(_in_filter(drop))
    stats = merge.execute(_part_rows(parts, add))
    result.inserted = stats["num_inserted_rows"]
    result.updated = stats["num_updated_rows"]
    result.deleted = stats["num_deleted_rows"]
    return lance.dataset(uri, storage_options=options)


def _in_filter(keys: set[str]) -> str:
    quoted = ", ".join("'" + k.replace("'", "''") + "'" for k in sorted(keys))
    return f"{PART_COLUMN} IN ({quoted})"


def parts_dataset(root: storage.Location, paths: list[str]) -> pads.Dataset:
    """Output parts under ``root`` as one dataset, with the hive partition columns that Parquet
    keeps in folder names only."""
    return pads.dataset(
        paths,
        filesystem=root.fs,
        format="parquet",
        partitioning="hive",
        partition_base_dir=root.path,
    )


def _part_rows(parts: storage.Location, keys: dict[str, str]) -> pa.RecordBatchReader:
    """The rows of the parts ``keys`` names (relative path -> key), batch by batch, with their
    hive partition columns (kept in folder names only in Parquet) and ``_part``."""
    by_path = {parts.child(rel).path: key for rel, key in sorted(keys.items())}
    source = parts_dataset(parts, list(by_path))
    stored = pa.schema([_lance_field(f) for f in source.schema.remove_metadata()])
    schema = stored.append(pa.field(PART_COLUMN, pa.string()))

    def batches():
        scanner = source.scanner(batch_size=_BATCH_ROWS, batch_readahead=2, fragment_readahead=2)
        for tagged in scanner.scan_batches():
            batch = tagged.record_batch
            if batch.num_rows:
                key = pa.array([by_path[tagged.fragment.path]] * batch.num_rows, pa.string())
                columns = batch.cast(stored).columns
                yield pa.RecordBatch.from_arrays([*columns, key], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def _lance_field(column: pa.Field) -> pa.Field:
    """Lance 14 panics on fixed-size lists of strings (``topk_ids`` of string ids): those go
    in as variable lists, every row still holding ``top_k`` ids."""
    kind = column.type
    if pa.types.is_fixed_size_list(kind) and not pa.types.is_primitive(kind.value_type):
        return column.with_type(pa.list_(kind.value_field))
    return column


def _clean_up(dataset, retain_versions: int | None) -> int:
    """Deletes the versions past the newest ``retain_versions``; returns how many went."""
    if retain_versions is None:
        return 0
    stats = dataset.cleanup_old_versions(older_than=timedelta(0), retain_versions=retain_versions)
    return int(stats.old_versions)
