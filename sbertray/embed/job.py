"""The embed job: plan the input, size the pool, run ``EmbedStage`` actors with Ray Data, check
the invariant, and commit the manifest.

    ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/embed_demo.yaml

Invariant asserted at the end of every run: output rows + bad rows = input rows, ids unique.
Nothing is marked done (``_manifest.json`` + ``_SUCCESS``) unless it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import sbertray
from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed import manifest
from sbertray.embed.encoder import ComputeChoice, resolve_compute
from sbertray.embed.lock import OutputLock
from sbertray.embed.pool import PoolPlan, plan_pool
from sbertray.embed.shards import EmbedInputError, InputPlan, plan_input
from sbertray.embed.stage import TMP_PREFIX, UnitResult
from sbertray.modeling import model_hash, resolve_model_path
from sbertray.ray_runtime import init_ray
from sbertray.report import write_embed_report


class InvariantError(RuntimeError):
    """Output rows + bad rows != input rows, or duplicate ids: the run is not committed."""


@dataclass
class EmbedSummary:
    output_url: str
    input_files: int
    input_rows: int
    output_rows: int
    bad_rows: int
    bad_files: list[str]
    truncated: int
    seconds: float
    skipped_units: int = 0  # committed by an earlier run (resume / incremental)
    embedded_rows: int = 0  # rows embedded by this run (output_rows counts earlier runs' too)
    superseded_parts: int = 0  # outputs of changed input files that no longer exist, removed
    units: list[dict] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.embedded_rows / self.seconds if self.seconds else 0.0

    def closing_line(self) -> str:
        bad_files = f", {len(self.bad_files)} bad files skipped" if self.bad_files else ""
        resumed = (
            f" ({self.skipped_units} units already committed earlier)" if self.skipped_units else ""
        )
        return (
            f"[sbertray] embedded {self.embedded_rows:,} rows from {self.input_files} files in "
            f"{self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s); bad rows: {self.bad_rows}"
            f"{bad_files}; truncated: {self.truncated}; output: {self.output_url}{resumed}"
        )


def describe_model(model_path: str, *, export: bool) -> tuple[dict, bool]:
    """Model facts recorded in every output file and the manifest, and whether the model runs
    on the exported backends. With ``export``, a supported local model is exported once
    (cached), so actors start from the export instead of each exporting; later runs read the
    facts off the export without loading the model."""
    from sbertray.embed import exported

    local, digest = os.path.isdir(model_path), model_digest(model_path)
    spec = exported.cached_spec(model_path, digest) if export and local else None
    exportable = spec is not None
    if spec is None:
        from sbertray.modeling import load_model

        model = load_model(model_path, device="cpu")
        spec = exported.ModelSpec.of(model)
        if export and local and exported.unsupported_reason(model) is None:
            exported.export(model, model_path, exported.artifact_dir(model_path, digest))
            exportable = True
    facts = {k: getattr(spec, k) for k in ("dim", "normalized", "max_seq_length")}
    return {"model": model_path, "model_hash": digest, **facts}, exportable


def model_digest(model_path: str) -> str:
    """The content hash of a local model directory; for a hub id, a hash of the id."""
    if os.path.isdir(model_path):
        return model_hash(model_path)
    return hashlib.sha256(f"hub:{model_path}".encode()).hexdigest()


def _probe_writable(out: storage.Location) -> None:
    """Fails before any work if the output location is unreachable or read-only."""
    probe = out.child(f"{TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}.tmp")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except storage.StorageError as exc:
        raise storage.StorageError(f"output location is not writable: {exc}") from None


class _EmbedActor:
    """Ray Data adapter: one EmbedStage per actor; each batch is one work unit index."""

    def __init__(
        self,
        config_dict: dict,
        refs: list,
        model_path: str,
        device: str,
        choice: ComputeChoice,
        threads: int,
        schema_metadata: dict,
    ):
        import ray

        from sbertray.embed.stage import EmbedStage
        from sbertray.modeling import resolve_model_path as resolve

        config = EmbedConfig.model_validate(config_dict)
        self.units, reference = ray.get(refs)
        self.stage = EmbedStage(
            config,
            model_path=resolve(model_path, config.storage),
            device=device,
            choice=choice,
            threads=threads,
            schema_metadata=schema_metadata,
            reference=reference,
        )

    def __call__(self, batch: dict) -> dict:
        rows = [self.stage.process(self.units[int(i)]).to_row() for i in batch["unit"]]
        return {key: [r[key] for r in rows] for key in rows[0]}


def _embed_reference(
    config: EmbedConfig, model_path: str, device: str, choice: ComputeChoice, threads: int
):
    """Reads and embeds the reference set once per run (in a Ray task sized like an actor)."""
    from sbertray.embed.shards import discover, read_footer
    from sbertray.embed.stage import ReferenceSet, build_encoder

    ref = config.reference
    fs, files = discover(ref.path, config.storage)
    ids, texts = [], []
    for f in files:
        checked, schema = read_footer(fs, f)
        if checked.error:
            raise EmbedInputError(f"reference: {checked.error}")
        for col in (ref.id_column, ref.text_column):
            if col not in schema.names:
                raise EmbedInputError(
                    f"reference {f.url}: missing column `{col}`; the file has {schema.names}"
                )
        with fs.open_input_file(f.path) as handle:
            table = pq.read_table(handle, columns=[ref.id_column, ref.text_column])
        for i, (rid, text) in enumerate(
            zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
        ):
            if rid is None or not isinstance(text, str):
                raise EmbedInputError(
                    f"reference {f.url}: row {i}: {'null id' if rid is None else 'null or non-string text'}"
                )
        ids.append(table.column(0))
        texts.extend(table.column(1).to_pylist())
    if not texts:
        raise EmbedInputError(f"reference `{storage.redact(str(ref.path))}` has no rows")
    all_ids = pa.chunked_array([c for chunk in ids for c in chunk.chunks]).combine_chunks()
    if pc.count_distinct(all_ids).as_py() != len(all_ids):
        raise EmbedInputError(f"reference `{storage.redact(str(ref.path))}`: ids are not unique")
    encoder = build_encoder(model_path, choice, device=device, threads=threads)
    return ReferenceSet(ids=all_ids, embeddings=encoder.encode(texts).embeddings)


def _run_units(
    config: EmbedConfig,
    plan: InputPlan,
    pool: PoolPlan,
    choice: ComputeChoice,
    model_path: str,
    schema_metadata: dict,
) -> list[UnitResult]:
    import ray

    reference_ref = None
    if config.reference is not None:
        task = ray.remote(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor)(
            _embed_reference
        )
        reference_ref = task.remote(config, model_path, pool.device, choice, pool.threads)
    refs = [ray.put(plan.units), reference_ref if reference_ref is not None else ray.put(None)]
    ds = ray.data.from_items(
        [{"unit": i} for i in range(len(plan.units))], override_num_blocks=len(plan.units)
    )
    ds = ds.map_batches(
        _EmbedActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(
            size=pool.num_actors,
            max_concurrent_calls_per_actor=pool.calls_per_actor,
            enable_true_multi_threading=pool.calls_per_actor > 1,
        ),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor,
        fn_constructor_kwargs={
            "config_dict": config.model_dump(),
            "refs": refs,
            "model_path": model_path,
            "device": pool.device,
            "choice": choice,
            "threads": pool.threads,
            "schema_metadata": schema_metadata,
        },
        # A killed or crashed actor is restarted and its unit retried; retries are safe
        # because a unit always rewrites the same output name with the same rows.
        max_restarts=config.compute.max_retries,
        max_task_retries=config.compute.max_retries,
    )
    return [UnitResult.from_row(row) for row in ds.take_all()]


def _check_invariant(out: storage.Location, plan: InputPlan, results: list[UnitResult]) -> int:
    """Counts committed output rows from the files themselves and checks rows and ids."""
    ids, written = [], 0
    for r in results:
        if r.output is None:
            continue
        with out.fs.open_input_file(out.child(r.output).path) as handle:
            table = pq.read_table(handle, columns=["id"])
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


def _cleanup_tmp(out: storage.Location, results: list[UnitResult]) -> None:
    """Removes temp files left by killed attempts (never visible to readers, but they cost)."""
    dirs = {out.child(r.output).path.rsplit("/", 1)[0] for r in results if r.output}
    for directory in dirs:
        for info in out.fs.get_file_info(
            storage.pafs.FileSelector(directory, allow_not_found=True)
        ):
            if info.base_name.startswith(TMP_PREFIX):
                out.fs.delete_file(info.path)


def run_embed(config: EmbedConfig, *, ray_address: str | None = None) -> EmbedSummary:
    """Embeds ``config.input`` into ``config.output.path`` and commits the manifest.

    Raises:
        ModelError: the model cannot be found (before any data is read).
        EmbedInputError: missing column, bad file (``on_bad_file: fail``), bad rows (``fail``).
        StorageError: output not writable / endpoint down.
        InvariantError: output does not account for every input row exactly once.
    """
    started = time.time()
    config = config.model_copy(deep=True)
    config.output.path = storage.absolute(config.output.path)
    out = storage.resolve(config.output.path, config.storage)
    model_path = resolve_model_path(config.model, config.storage)
    model_info, exportable = describe_model(model_path, export=may_run_exported(config.compute))
    plan = plan_input(config)
    _probe_writable(out)
    config_dict = config.model_dump()
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    schema_metadata = {
        **model_info,
        "model": storage.redact(config.model),
        "config_hash": manifest.config_hash(config_dict),
        "content_hash": content_hash(config, model_info["model_hash"]),
        "config": _redacted(config_dict),
        "run_id": run_id,
        "sbertray_version": sbertray.__version__,
    }
    with OutputLock(out, run_id, stale_after_s=config.output.lock_stale_after_s):
        return _run_locked(
            config, plan, out, model_path, exportable, schema_metadata, started, ray_address
        )


def content_hash(config: EmbedConfig, model_digest: str) -> str:
    """What decides the bytes of an output file: a committed unit with the same hash and input
    fingerprint is not embedded again."""
    return manifest.config_hash(
        {
            "model_hash": model_digest,
            "input": config.input.model_dump(),
            "reference": config.reference.model_dump() if config.reference else None,
            "rows_per_file": config.output.rows_per_file,
            "compression": config.output.compression,
            "bad_input": config.bad_input.model_dump(),
            "precision": config.compute.precision,
            "backend": config.compute.backend,
        }
    )


def _committed_units(
    out: storage.Location, plan: InputPlan, digest: str, existing: set[str]
) -> dict[str, UnitResult]:
    """Units whose output file is committed by a run with the same content hash on the same
    input fingerprint (footers only; read in parallel, object-store latency dominates)."""
    from concurrent.futures import ThreadPoolExecutor

    candidates = [u for u in plan.units if out.child(u.output_rel).path in existing]

    def check(unit) -> UnitResult | None:
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
            output=unit.output_rel,
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {r.unit_id: r for r in pool.map(check, candidates) if r is not None}


def may_run_exported(compute) -> bool:
    """Whether the actors may run an exported backend (decided for sure once the pool is)."""
    return compute.backend in ("onnx", "openvino") or (
        compute.backend == "auto" and compute.device != "cuda"
    )


_PART = re.compile(r"\.part-\d{4,}\.parquet$")


def _remove_superseded(out: storage.Location, plan: InputPlan, existing: set[str]) -> int:
    """Deletes output parts of input files that changed to fewer units than before (or to no
    rows): left in place, readers would see rows of the old version next to the new one.
    Outputs of input files that are gone, or bad this run, are left alone."""
    expected = {out.child(u.output_rel).path for u in plan.units}
    parts_by_stem: dict[str, list[str]] = {}
    for path in existing:
        if path not in expected and _PART.search(path):
            parts_by_stem.setdefault(_PART.sub("", path), []).append(path)
    removed = 0
    for f in plan.files:
        for path in parts_by_stem.get(out.child(f.output_stem).path, []):
            out.fs.delete_file(path)
            removed += 1
    return removed


def _run_locked(
    config, plan, out, model_path, exportable, schema_metadata, started, ray_address
) -> EmbedSummary:
    existing = {i.path for i in storage.list_files(out)} if storage.exists(out) else set()
    done = _committed_units(out, plan, schema_metadata["content_hash"], existing)
    todo = InputPlan(files=plan.files, units=[u for u in plan.units if u.unit_id not in done])
    results: list[UnitResult] = list(done.values())
    pool = choice = None
    if todo.units:
        init_ray(ray_address)
        import ray

        pool = plan_pool(ray.cluster_resources(), config.compute, len(todo.units))
        try:
            choice = resolve_compute(config.compute, pool.device, exportable)
        except ValueError as exc:
            raise EmbedInputError(f"compute: {exc}") from None
        if choice.precision == "int8":
            from sbertray.embed import exported

            # describe_model exported fp32; int8 is quantized here once, not in every actor.
            exported.ensure(model_path, "int8")
        resumed = f"; {len(done)} units already committed" if done else ""
        print(
            f"[sbertray] {len(plan.files)} files, {plan.total_rows:,} rows; embedding "
            f"{len(todo.units)} of {len(plan.units)} units{resumed}; pool: {pool.describe()}; "
            f"backend {choice.backend}, precision {choice.precision}",
            flush=True,
        )
        results += _run_units(config, todo, pool, choice, model_path, schema_metadata)
    elif plan.units:
        print(
            f"[sbertray] nothing to do: all {len(plan.units)} units of {len(plan.files)} files "
            "are already embedded with this model and config",
            flush=True,
        )
    else:
        print(
            f"[sbertray] no input rows under {storage.redact(str(config.input.path))}: "
            "nothing to embed",
            flush=True,
        )

    row_errors = [r.error for r in results if r.error_kind == "bad_rows"]
    file_errors = [r for r in results if r.error_kind == "bad_file"]
    if row_errors:
        raise EmbedInputError("\n".join(row_errors))
    if file_errors and config.bad_input.on_bad_file == "fail":
        raise EmbedInputError(
            "\n".join(r.error for r in file_errors)
            + "\n(set `bad_input.on_bad_file: skip` to embed the other files)"
        )
    failed_files = {r.file for r in file_errors}
    committed = [r for r in results if r.file not in failed_files]
    kept_plan = InputPlan(
        files=[f for f in plan.files if f.rel not in failed_files],
        units=[u for u in plan.units if u.file.rel not in failed_files],
    )
    written = _check_invariant(out, kept_plan, committed)
    _cleanup_tmp(out, committed)
    superseded = _remove_superseded(out, kept_plan, existing)
    if superseded:
        print(
            f"[sbertray] removed {superseded} output parts of changed input files that now "
            "have fewer parts",
            flush=True,
        )

    seconds = time.time() - started
    bad_files = [f.url for f in plan.bad_files] + sorted(
        next(f.url for f in plan.files if f.rel == rel) for rel in failed_files
    )
    summary = EmbedSummary(
        skipped_units=len(done),
        superseded_parts=superseded,
        embedded_rows=sum(r.rows_out for r in committed if r.unit_id not in done),
        output_url=storage.redact(out.url),
        input_files=len(kept_plan.files),
        input_rows=sum(u.num_rows for u in kept_plan.units),
        output_rows=written,
        bad_rows=sum(r.rows_dropped for r in committed),
        bad_files=bad_files,
        truncated=sum(r.truncated for r in committed),
        seconds=round(seconds, 2),
        units=[asdict(r) for r in committed],
    )
    record = _manifest(
        schema_metadata,
        kept_plan,
        committed,
        summary,
        pool,
        choice,
        started,
    )
    write_embed_report(out, record, [asdict(r) for r in results if r.unit_id not in done])
    manifest.write(out, record)
    return summary


def _manifest(model_meta, plan, results, summary, pool, choice, started):
    """The run record; run id, hashes and the redacted config come from the run's metadata."""
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
    return {
        "version": manifest.MANIFEST_VERSION,
        "run_id": model_meta["run_id"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            k: model_meta[k] for k in ("model", "model_hash", "dim", "normalized", "max_seq_length")
        },
        "precision": choice.precision if choice else None,
        "compute": asdict(choice) if choice else None,
        "pool": asdict(pool) if pool else None,
        "config_hash": model_meta["config_hash"],
        "config": model_meta["config"],
        "files": files,
        "bad_files": summary.bad_files,
        "totals": {
            "input_files": summary.input_files,
            "input_rows": summary.input_rows,
            "output_rows": summary.output_rows,
            "bad_rows": summary.bad_rows,
            "truncated": summary.truncated,
            "superseded_parts_removed": summary.superseded_parts,
        },
        "timings": {
            "seconds": summary.seconds,
            "rows_per_s": round(summary.rows_per_s, 1),
            "unit_seconds": sum(r.seconds for r in results),
        },
    }


def _redacted(value):
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return storage.redact(value) if isinstance(value, str) else value
