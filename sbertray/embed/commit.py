"""How embedding output becomes visible, and how a run proves it is complete.

- Each unit's file is written under a temporary name that no Parquet reader or ``*.parquet``
  glob picks up, then moved to its deterministic final name (``write_unit``). A retried unit
  rewrites the same name with the same rows, so retries never duplicate output.
- Each file's footer records the unit it completes and the run's content hash
  (``content_hash``); a rerun skips units whose footer matches (``committed_units``).
- A run ends with ``_manifest.json`` then ``_SUCCESS`` (``write_manifest``), only once
  ``check_invariant`` holds: output rows + bad rows = input rows, and ids are unique.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import EmbedConfig, dump_without, stable_hash
from sbertray.embed.shards import InputPlan, WorkUnit
from sbertray.errors import UserError

TMP_PREFIX = "_inprogress-"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
MANIFEST_VERSION = 1
# Object-store latency dominates footer reads: read this many at once.
_FOOTER_READERS = 16
_PART = re.compile(r"\.part-\d{4,}\.parquet$")
# Config keys that never change an output file's bytes: a rerun that changes only these skips
# committed units. Every other key (and the output schema) goes into the content hash, so a new
# option re-embeds by default instead of silently reusing stale files.
_NOT_IN_CONTENT = {
    "name": None,
    "model": None,  # the model's content hash stands for it
    "output": {"path", "lock_stale_after_s"},
    "compute": {
        "device",
        "token_budget",
        "max_batch_rows",
        "num_actors",
        "min_actors",
        "max_actors",
        "placement_timeout_s",
        "cpus_per_actor",
        "max_retries",
        "executor",
        "local_max_rows",
    },
    "storage": None,
}


class InvariantError(UserError, RuntimeError):
    """Output rows + bad rows != input rows, or duplicate ids: the run is not committed."""


@dataclass
class UnitResult:
    """What one work unit did, as the stage returns it and its output footer records it."""

    unit_id: str
    file: str  # relative input path
    rows_in: int
    rows_out: int = 0
    rows_dropped: int = 0  # rows skipped as bad (rows_out + rows_dropped == rows_in)
    bad_rows: dict = field(default_factory=dict)  # reason -> count (a row may have two)
    truncated: int = 0  # among the texts embedded (copied vectors were counted when embedded)
    rows_reused: int = 0  # rows whose computed columns were copied from an earlier output row
    rows_embedded: int = 0  # distinct texts embedded (a text repeated in the unit counts once)
    output: str | None = None  # relative output path once committed
    error: str | None = None
    error_kind: str | None = None  # "bad_rows" | "bad_file"
    seconds: float = 0.0
    finished_at: float = 0.0  # unix time the unit was committed (throughput over time)
    attempt: int = 1  # the round that committed it (> 1: its actor or node was lost before)

    def to_row(self) -> dict:
        row = asdict(self)
        row["bad_rows"] = json.dumps(self.bad_rows)
        return row

    @classmethod
    def from_row(cls, row: dict) -> UnitResult:
        row = dict(row)
        row["bad_rows"] = json.loads(row["bad_rows"])
        return cls(**row)

    def footer_record(self, unit: WorkUnit) -> dict:
        """What the output footer says of the unit it completes (read back on reruns)."""
        return {
            "unit_id": unit.unit_id,
            "input": unit.file.fingerprint,
            "rows_in": unit.num_rows,
            "rows_dropped": self.rows_dropped,
            "bad_rows": self.bad_rows,
            "truncated": self.truncated,
            "rows_reused": self.rows_reused,
            "rows_embedded": self.rows_embedded,
        }


def content_hash(config: EmbedConfig, model_hash: str, schema: pa.Schema, int8_ranges=None) -> str:
    """What decides the bytes of an output file: the model, the declared output schema, the
    int8 ranges (if any) and every config key but ``_NOT_IN_CONTENT``. A committed unit with the same hash and input
    fingerprint is not embedded again."""
    settings = dump_without(config, _NOT_IN_CONTENT)
    columns = [(f.name, str(f.type)) for f in schema]
    return stable_hash(
        {"model_hash": model_hash, "schema": columns, "config": settings, "int8": int8_ranges}
    )


def write_unit(out: storage.Location, rel: str, table: pa.Table, compression: str) -> None:
    """Writes ``table`` to ``<out>/<rel>`` under a temporary name, then moves it into place."""
    final = out.child(rel)
    directory, name = final.path.rsplit("/", 1)
    tmp = storage.Location(
        out.fs,
        f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}.tmp",
        storage.join(out.url, rel + ".tmp"),
    )
    try:
        out.fs.create_dir(directory, recursive=True)
        pq.write_table(
            table,
            tmp.path,
            filesystem=out.fs,
            compression=None if compression == "none" else compression,
        )
    except OSError as exc:
        storage.delete(tmp)
        raise storage.StorageError(f"could not write {storage.redact(final.url)}: {exc}") from exc
    storage.move(tmp, final)


def committed_units(
    out: storage.Location, plan: InputPlan, digest: str, existing: set[str]
) -> dict[str, UnitResult]:
    """Units whose output file is committed by a run with content hash ``digest`` on the same
    input fingerprint (footers only, read in parallel)."""
    candidates = [u for u in plan.units if out.child(u.output_rel).path in existing]

    def check(unit: WorkUnit) -> UnitResult | None:
        try:
            with out.fs.open_input_file(out.child(unit.output_rel).path) as handle:
                meta = pq.read_metadata(handle)
        except (OSError, pa.ArrowException):
            return None
        info = json.loads((meta.metadata or {}).get(b"sbertray", b"{}"))
        rec = info.get("unit", {})
        same = (
            info.get("content_hash") == digest
            and rec.get("unit_id") == unit.unit_id
            and rec.get("input") == unit.file.fingerprint
            and rec.get("rows_in") == unit.num_rows
        )
        if not same:
            return None
        return UnitResult(
            unit_id=unit.unit_id,
            file=unit.file.rel,
            rows_in=unit.num_rows,
            rows_out=meta.num_rows,
            rows_dropped=rec["rows_dropped"],
            bad_rows=rec["bad_rows"],
            truncated=rec["truncated"],
            rows_reused=rec.get("rows_reused", 0),
            rows_embedded=rec.get("rows_embedded", 0),
            output=unit.output_rel,
        )

    with ThreadPoolExecutor(max_workers=_FOOTER_READERS) as pool:
        return {r.unit_id: r for r in pool.map(check, candidates) if r is not None}


def check_invariant(out: storage.Location, plan: InputPlan, results: list[UnitResult]) -> int:
    """Counts committed output rows from the files themselves and checks rows and ids; returns
    the output row count."""
    ids, written = [], 0
    for r in results:
        if r.output is None:
            continue
        try:
            with out.fs.open_input_file(out.child(r.output).path) as handle:
                table = pq.read_table(handle, columns=["id"])
        except (OSError, pa.ArrowException) as exc:
            raise InvariantError(
                f"output {storage.redact(out.child(r.output).url)} of unit {r.unit_id} was "
                f"committed but cannot be read back: {exc}"
            ) from None
        written += table.num_rows
        ids.append(table.column("id"))
    dropped = sum(r.rows_dropped for r in results)
    expected = sum(u.num_rows for u in plan.units)
    if written + dropped != expected:
        raise InvariantError(f"output rows {written} + bad rows {dropped} != input rows {expected}")
    if ids:
        all_ids = pa.chunked_array([c for col in ids for c in col.chunks])
        distinct = pc.count_distinct(all_ids).as_py()
        if distinct != len(all_ids):
            raise InvariantError(f"{len(all_ids) - distinct} duplicate ids in the output")
    return written


def remove_temp_files(out: storage.Location, results: list[UnitResult]) -> None:
    """Removes temp files left by killed attempts (never visible to readers, but they cost)."""
    dirs = {out.child(r.output).path.rsplit("/", 1)[0] for r in results if r.output}
    for directory in dirs:
        for info in out.fs.get_file_info(
            storage.pafs.FileSelector(directory, allow_not_found=True)
        ):
            if info.base_name.startswith(TMP_PREFIX):
                out.fs.delete_file(info.path)


def output_parts(paths: set[str]) -> list[str]:
    """The committed output parts among ``paths`` (not temp files, reports or the manifest)."""
    return [p for p in paths if _PART.search(p)]


def remove_stale_parts(
    out: storage.Location, plan: InputPlan, existing: set[str], keep_stems: set[str]
) -> tuple[int, int]:
    """Deletes output parts no current unit writes, so readers never see rows of an input
    version that is gone: parts of input files that changed to fewer units (superseded), and
    all parts of input files that were deleted (orphaned). Outputs of files that are bad this
    run (``keep_stems``, output stems) keep their last good output. Returns the two counts."""
    expected = {out.child(u.output_rel).path for u in plan.units}
    current = {out.child(f.output_stem).path for f in plan.files}
    kept = {out.child(stem).path for stem in keep_stems}
    superseded = orphaned = 0
    for path in sorted(existing - expected):
        if not _PART.search(path) or (stem := _PART.sub("", path)) in kept:
            continue
        out.fs.delete_file(path)
        if stem in current:
            superseded += 1
        else:
            orphaned += 1
    return superseded, orphaned


def manifest_record(
    run_metadata: dict, plan: InputPlan, results: list[UnitResult], totals: dict, run: dict
) -> dict:
    """The run record: every input file with its outputs and bad rows, the totals, and ``run``
    (timings, pool, compute) as the driver saw it."""
    by_file: dict[str, list[UnitResult]] = {}
    for r in results:
        by_file.setdefault(r.file, []).append(r)
    files = []
    for f in plan.files:
        rs = by_file.get(f.rel, [])
        bad: dict[str, int] = {}
        for r in rs:
            for reason, n in r.bad_rows.items():
                bad[reason] = bad.get(reason, 0) + n
        files.append(
            {
                "path": f.url,
                "rel": f.rel,
                **f.fingerprint,
                "rows": f.num_rows,
                "outputs": [{"path": r.output, "rows": r.rows_out} for r in rs],
                "rows_out": sum(r.rows_out for r in rs),
                "bad_rows": sum(r.rows_dropped for r in rs),
                "bad_reasons": bad,
                "truncated": sum(r.truncated for r in rs),
            }
        )
    model_keys = ("model", "model_hash", "dim", "normalized", "max_seq_length")
    return {
        "version": MANIFEST_VERSION,
        "run_id": run_metadata["run_id"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {k: run_metadata[k] for k in model_keys},
        "config_hash": run_metadata["config_hash"],
        "config": run_metadata["config"],
        "files": files,
        "totals": totals,
        **run,
    }


def read_manifest(out: storage.Location) -> dict | None:
    """The last committed manifest under ``out`` (int8 ranges are reused from it)."""
    loc = out.child(MANIFEST)
    return json.loads(storage.read_bytes(loc)) if storage.exists(loc) else None


def write_manifest(out: storage.Location, manifest: dict) -> None:
    """Writes the manifest, then ``_SUCCESS``: a reader that sees ``_SUCCESS`` sees a complete
    manifest and every output file it lists."""
    storage.write_bytes(out.child(MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
    storage.write_bytes(out.child(SUCCESS), b"")
