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
from dataclasses import asdict
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.config import EmbedConfig, dump_without, stable_hash
from sbertray.embed.results import UnitResult
from sbertray.embed.shards import InputPlan, WorkUnit
from sbertray.embed.summary import EmbedSummary, peak_rss_mb
from sbertray.errors import UserError

if TYPE_CHECKING:
    from sbertray.embed.encoder import EncoderSpec
    from sbertray.embed.pool import PoolPlan

TMP_PREFIX = "_inprogress-"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
MANIFEST_VERSION = 1
BAD_ROWS_LISTED = 20  # skipped rows named in the manifest and report (all are counted)
_PART = re.compile(r"(?P<grouped>\.\d+-files)?\.part-\d{4,}\.parquet$")
# Config keys that never change an output file's bytes: a rerun that changes only these skips
# committed units. Every other key (and the output schema) goes into the content hash, so a new
# option re-embeds by default instead of silently reusing stale files.
_OUTPUT_NOT_IN_CONTENT = "path lock_stale_after_s rows_per_file mode format index retain_versions"
NOT_IN_CONTENT = {
    "name": None,
    "model": None,  # the model's content hash stands for it
    "output": set(_OUTPUT_NOT_IN_CONTENT.split()),  # the layout; the Lance table's settings
    "compute": {
        "device",
        "token_budget",
        "max_batch_rows",
        "num_actors",
        "min_actors",
        "max_actors",
        "placement_timeout_s",
        "cpus_per_actor",
        "actors_per_gpu",
        "max_retries",
        "executor",
        "local_max_rows",
        "unit_rows",
        "reuse_index_max_mb",
    },
    "storage": None,
}


class InvariantError(UserError, RuntimeError):
    """A unit's rows written + bad rows != its input rows, a unit without a result, or an
    output file that does not hold what its unit wrote: the run is not committed."""


def content_hash(config: EmbedConfig, model_hash: str, schema: pa.Schema, int8_ranges=None) -> str:
    """What decides the bytes of an output file: the model, the declared output schema, the
    int8 ranges (if any) and every config key but ``NOT_IN_CONTENT``. A committed unit with the same hash and input
    fingerprint is not embedded again."""
    settings = dump_without(config, NOT_IN_CONTENT)
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
            use_dictionary=_dictionary_columns(table.schema),
        )
    except OSError as exc:
        storage.delete(tmp)
        raise storage.StorageError(f"could not write {storage.redact(final.url)}: {exc}") from exc
    storage.move(tmp, final)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: ids, passthrough columns, top-k ids. Vectors, scores
    and content keys hardly repeat, and trying a dictionary on them made writing a unit of
    384-float vectors 1.8x slower, for files no smaller."""

    def dense(kind: pa.DataType) -> bool:
        if pa.types.is_fixed_size_list(kind):  # vectors, scores; not top-k ids
            kind = kind.value_type
            return pa.types.is_floating(kind) or kind in (pa.int8(), pa.uint8())
        return pa.types.is_fixed_size_binary(kind) or pa.types.is_floating(kind)

    return [f.name for f in schema if not dense(f.type)]


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
            and rec.get("inputs") == unit.inputs
            and rec.get("rows_in") == unit.num_rows
            and not rec.get("bad_files")  # a file unreadable then is tried again
        )
        if not same:
            return None
        return UnitResult(
            unit_id=unit.unit_id,
            rows_in=unit.num_rows,
            rows_out=meta.num_rows,
            rows_dropped=rec["rows_dropped"],
            bad_rows=rec["bad_rows"],
            files=rec["files"],
            truncated=rec["truncated"],
            rows_reused=rec.get("rows_reused", 0),
            rows_embedded=rec.get("rows_embedded", 0),
            output=unit.output_rel,
            run_id=info.get("run_id", ""),
        )

    found = storage.map_parallel(check, candidates)
    return {r.unit_id: r for r in found if r is not None}


def check_invariant(
    out: storage.Location, units: list[WorkUnit], results: dict[str, UnitResult], done: set[str]
) -> int:
    """Proves that the output holds every input row exactly once, from footers and per-unit
    counts only (the driver never holds the rows or their ids); returns the output row count.

    - Every unit has a result: its output file, or all its files unreadable (bad files).
    - Each unit: rows written + bad rows + rows of its unreadable files = its input rows, and
      its output file's footer holds the rows written (footers of this run's files are read
      back, a few at once; those of ``done`` units were read when found committed).
    - Units partition the input files (``plan_units``), the ids of a unit's rows are its input
      rows' ids (or ``<file>#<row>``), and input ids are unique (``checks.check_ids``, before
      any work): so output ids are unique too.
    """
    missing = [u.unit_id for u in units if u.unit_id not in results]
    if missing:
        raise InvariantError(f"{len(missing)} units have no result, e.g. {missing[0]}")
    sizes = {s.file.rel: s.num_rows for u in units for s in u.slices}
    for unit in units:
        r = results[unit.unit_id]
        unread = sum(sizes[rel] for rel in r.bad_files)
        if r.rows_out + r.rows_dropped + unread != unit.num_rows:
            raise InvariantError(
                f"unit {unit.unit_id}: {r.rows_out} rows written + {r.rows_dropped} bad + "
                f"{unread} in unreadable files != {unit.num_rows} input rows"
            )

    def footer_rows(r: UnitResult) -> int:
        try:
            with out.fs.open_input_file(out.child(r.output).path) as handle:
                return pq.read_metadata(handle).num_rows
        except (OSError, pa.ArrowException) as exc:
            raise InvariantError(
                f"output {storage.redact(out.child(r.output).url)} of unit {r.unit_id} was "
                f"committed but cannot be read back: {exc}"
            ) from None

    written = [r for r in results.values() if r.output is not None and r.unit_id not in done]
    for r, rows in zip(written, storage.map_parallel(footer_rows, written), strict=True):
        if rows != r.rows_out:
            raise InvariantError(
                f"output {storage.redact(out.child(r.output).url)} of unit {r.unit_id} "
                f"holds {rows} rows; the unit wrote {r.rows_out}"
            )
    return sum(r.rows_out for r in results.values())


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
    version that is gone: parts of input files that changed or were regrouped (superseded),
    and parts whose first input file was deleted (orphaned). The single-file outputs of files
    that are bad this run (``keep_stems``, output stems) keep their last good output; a group's
    output cannot (its other files are written again elsewhere). Returns the two counts."""
    expected = {out.child(u.output_rel).path for u in plan.units}
    current = {out.child(f.output_stem).path for f in plan.files}
    kept = {out.child(stem).path for stem in keep_stems}
    superseded = orphaned = 0
    for path in sorted(existing - expected):
        match = _PART.search(path)
        if not match:
            continue
        stem = path[: match.start()]
        if stem in kept and not match.group("grouped"):
            continue
        out.fs.delete_file(path)
        if stem in current:
            superseded += 1
        else:
            orphaned += 1
    return superseded, orphaned


def manifest_record(
    run_metadata: dict,
    inputs: InputPlan,
    committed: list[UnitResult],
    summary: EmbedSummary,
    encoder: EncoderSpec | None,
    pool: PoolPlan | None,
    started: float,
) -> dict:
    """The run record: every input file with its outputs and bad rows, the totals, and how the
    run went (compute, pool, compact settings, timings) as the driver saw it."""
    model_keys = ("model", "model_hash", "dim", "normalized", "max_seq_length")
    output = run_metadata["config"]["output"]
    compute = None
    if encoder is not None:  # the model reference is in `model` already (redacted)
        compute = {k: v for k, v in asdict(encoder).items() if k not in ("model", "model_hash")}
    return {
        "version": MANIFEST_VERSION,
        "run_id": run_metadata["run_id"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {k: run_metadata[k] for k in model_keys},
        "config_hash": run_metadata["config_hash"],
        "config": run_metadata["config"],
        "files": _file_records(inputs, committed),
        "totals": {
            "input_files": summary.input_files,
            "input_rows": summary.input_rows,
            "output_rows": summary.output_rows,
            "bad_rows": summary.bad_rows,
            "truncated": summary.truncated,
            "superseded_parts_removed": summary.superseded_parts,
            "orphaned_parts_removed": summary.orphaned_parts,
            "units_retried": summary.retried_units,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "precision": encoder.precision if encoder else None,
        "compute": compute,
        "pool": asdict(pool) if pool else None,
        "bad_files": summary.bad_files,
        "bad_row_examples": [e for r in committed for e in r.bad_examples][:BAD_ROWS_LISTED],
        "compact": {
            "embedding_dtype": output["embedding_dtype"],
            "truncate_dim": output["truncate_dim"],
            "int8_ranges": run_metadata.get("int8_ranges"),
        },
        "timings": {
            "seconds": summary.seconds,
            "embedded_rows": summary.embedded_rows,
            "reused_rows": summary.reused_rows,
            "texts_embedded": summary.texts_embedded,
            "rows_per_s": round(summary.rows_per_s, 1),
            "unit_seconds": sum(r.seconds for r in committed),
            # First unit started to last unit committed: throughput once the actors run.
            "units_span_s": summary.units_span_s,
            "phases": dict(summary.phases),
            "driver_peak_rss_mb": peak_rss_mb(),
        },
    }


def _file_records(inputs: InputPlan, committed: list[UnitResult]) -> list[dict]:
    """Each input file with its fingerprint, its output parts and its rows written and bad."""
    outputs: dict[str, list[dict]] = {}
    counts: dict[str, dict] = {}
    for r in committed:
        for rel, c in r.files.items():
            outputs.setdefault(rel, []).append({"path": r.output, "rows": c["rows_out"]})
            seen = counts.setdefault(rel, {"rows_out": 0, "bad_rows": 0, "bad_reasons": {}})
            seen["rows_out"] += c["rows_out"]
            seen["bad_rows"] += c["rows_dropped"]
            for reason, n in c["bad_rows"].items():
                seen["bad_reasons"][reason] = seen["bad_reasons"].get(reason, 0) + n
    return [
        {
            "path": f.url,
            "rel": f.rel,
            **f.fingerprint,
            "rows": f.num_rows,
            "outputs": outputs.get(f.rel, []),
            **counts.get(f.rel, {"rows_out": 0, "bad_rows": 0, "bad_reasons": {}}),
        }
        for f in inputs.files
    ]


def read_manifest(out: storage.Location) -> dict | None:
    """The last committed manifest under ``out`` (int8 ranges are reused from it)."""
    loc = out.child(MANIFEST)
    return json.loads(storage.read_bytes(loc)) if storage.exists(loc) else None


def write_manifest(out: storage.Location, manifest: dict) -> None:
    """Writes the manifest, then ``_SUCCESS``: a reader that sees ``_SUCCESS`` sees a complete
    manifest and every output file it lists."""
    storage.write_bytes(out.child(MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
    storage.write_bytes(out.child(SUCCESS), b"")
