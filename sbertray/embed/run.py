"""The embed job, as plan -> execute -> commit.

    ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/embed_demo.yaml

- **plan** (``plan_embed``): everything that can fail without the model running: config, model,
  input footers and columns, output columns, output writability.
- **execute**: the units not committed by an earlier run, on a pool of ``EmbedStage`` actors
  (``ray_adapter``) sized from the cluster (``pool``), running the backend ``backends`` picks.
- **commit** (``commit``): the invariant (output rows + bad rows = input rows, ids unique), then
  ``_manifest.json`` and ``_SUCCESS``. Nothing is marked done unless the invariant holds.
"""

from __future__ import annotations

import resource
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import sbertray
from sbertray import storage
from sbertray.config import EmbedConfig, stable_hash
from sbertray.embed import backends, commit, compact, reuse
from sbertray.embed.checks import check_ids, check_output_outside_input, check_reference
from sbertray.embed.commit import UnitResult
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.lock import OutputLock
from sbertray.embed.pool import PoolPlan, in_process_pool, plan_pool, runs_in_process
from sbertray.embed.shards import EmbedInputError, InputPlan, WorkUnit, plan_input
from sbertray.embed.stage import check_output_columns, computed_columns, output_schema
from sbertray.modeling import PreparedModel, prepare_model, resolve_model_path
from sbertray.progress import Progress
from sbertray.ray_runtime import cpus_per_gpu, spans_many_nodes
from sbertray.report import (
    REPORT_DIR,
    REPORT_MD,
    format_rate,
    note_noop_rerun,
    write_embed_report,
)


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
    embedded_rows: int = 0  # rows this run wrote (output_rows counts earlier runs' too)
    reused_rows: int = 0  # of those, rows whose vectors were copied from earlier output
    texts_embedded: int = 0  # distinct texts this run ran the model on
    superseded_parts: int = 0  # outputs of changed input files that no longer exist, removed
    orphaned_parts: int = 0  # outputs of deleted input files, removed
    retried_units: int = 0  # units run again after their actor or node was lost for good
    phases: dict = field(default_factory=dict)  # seconds in plan, embed, commit, report
    units: list[dict] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.embedded_rows / self.seconds if self.seconds else 0.0

    def closing_line(self) -> str:
        bad_files = f", {len(self.bad_files)} bad files skipped" if self.bad_files else ""
        resumed = (
            f" ({self.skipped_units} units already committed earlier)" if self.skipped_units else ""
        )
        copied = self.embedded_rows - self.texts_embedded
        model_runs = (
            f" ({self.texts_embedded:,} texts through the model, the other {copied:,} rows' "
            f"vectors copied: {self.reused_rows:,} from earlier output, "
            f"{copied - self.reused_rows:,} repeated texts)"
            if copied
            else ""
        )
        return (
            f"[sbertray] embedded {format_rate(self.embedded_rows, self.seconds)}{model_runs} from "
            f"{self.input_files} files; bad rows: {self.bad_rows}{bad_files}; truncated: "
            f"{self.truncated}; output: {self.output_url}{resumed}; report: "
            f"{storage.join(self.output_url, REPORT_DIR, REPORT_MD)}"
        )


def units_span(results) -> float:
    """Seconds from the first of ``results`` starting to the last one committing (0 if none)."""
    timed = [(r.finished_at - r.seconds, r.finished_at) for r in results if r.finished_at]
    return round(max(e for _, e in timed) - min(s for s, _ in timed), 2) if timed else 0.0


class PhaseClock:
    """Seconds spent in each phase of a run (the manifest's ``timings.phases``)."""

    def __init__(self) -> None:
        self.started = self._last = time.time()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """Ends ``phase`` now; it began where the previous one ended."""
        now = time.time()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._last, 2)
        self._last = now

    def describe(self) -> str:
        return "time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


@dataclass(frozen=True)
class EmbedPlan:
    """What a run will do, checked before any actor starts."""

    config: EmbedConfig  # output path made absolute
    out: storage.Location
    model: PreparedModel
    inputs: InputPlan
    run_metadata: dict  # in every output file's schema metadata (`sbertray` key) and the manifest

    @property
    def run_id(self) -> str:
        return self.run_metadata["run_id"]

    @property
    def model_for_actors(self) -> str:
        """Object-storage models are resolved by each node into its own cache; anything else
        is the path (or hub id) the driver resolved."""
        model = self.config.model
        return model if storage.is_url(model) and not storage.is_local(model) else self.model.path


def prepare_job_model(config: EmbedConfig) -> PreparedModel:
    """The job's model resolved on this node, hashed, and exported once if the job may run an
    exported backend."""
    return prepare_model(
        resolve_model_path(config.model, config.storage),
        export=backends.may_run_exported(config.compute),
    )


def plan_embed(config: EmbedConfig, model: PreparedModel | None = None) -> EmbedPlan:
    """Checks the config, model, input and output, in that order, and plans the units.
    ``model``: ``prepare_job_model(config)`` where the caller has it already.

    Raises:
        ConfigError: passthrough columns that collide with the output's own; an output inside
            the input.
        ModelError: the model cannot be found (before any data is read).
        EmbedInputError: no input files, missing or non-text column, bad file
            (``on_bad_file: fail``), null / duplicate / mixed-type ids, a bad reference set.
        StorageError: output not writable / endpoint down.
    """
    config = config.model_copy(deep=True)
    config.output.path = storage.absolute(config.output.path)
    check_output_columns(config)
    check_output_outside_input(config)
    storage.check_lasting({"output.path": config.output.path})
    out = storage.resolve(config.output.path, config.storage)
    model = model or prepare_job_model(config)
    compact.check(config.output, model.spec.dim)
    inputs = plan_input(config)
    check_reference(config)
    storage.check_writable(out)
    ranges = (
        compact.resolve_int8_ranges(config, out, model, inputs)
        if config.output.embedding_dtype == "int8"
        else None
    )
    config_dict = config.model_dump()
    run_metadata = {
        "model": storage.redact(config.model),
        "model_hash": model.model_hash,
        **model.spec.facts(),
        "config_hash": stable_hash(config_dict),
        "content_hash": commit.content_hash(
            config, model.model_hash, output_schema(config, model.spec.dim), ranges
        ),
        "config": storage.redact_value(config_dict),
        "run_id": f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}",
        "sbertray_version": sbertray.__version__,
    }
    if ranges is not None:
        run_metadata["int8_ranges"] = ranges
    return EmbedPlan(config, out, model, inputs, run_metadata)


def run_embed(
    config: EmbedConfig, *, ray_address: str | None = None, model: PreparedModel | None = None
) -> EmbedSummary:
    """Embeds ``config.input`` into ``config.output.path`` and commits the manifest.
    ``model``: ``prepare_job_model(config)`` where the caller has it already.

    Raises what ``plan_embed`` raises, and:
        EmbedInputError: bad rows (``fail``), bad files found while reading.
        InvariantError: output does not account for every input row exactly once.
        LockError: another live run holds the output location.
    """
    clock = PhaseClock()
    plan = plan_embed(config, model)
    if not runs_in_process(plan.config.compute, ray_address, rows_to_embed=0):
        _check_paths_on_cluster(plan, ray_address)  # before the lock creates anything
    check_input_ids(plan)
    with OutputLock(plan.out, plan.run_id, stale_after_s=plan.config.output.lock_stale_after_s):
        existing, done = find_committed(plan)
        todo = [u for u in plan.inputs.units if u.unit_id not in done]
        results, pool, encoder = list(done.values()), None, None
        if todo:
            files = donor_files(plan, existing, done)
            donors = None
            if files:
                columns = computed_columns(plan.config)
                donors = reuse.build_index(plan.out, [path for path, _ in files], columns)
            clock.mark("plan")
            pool, encoder = _start(plan, todo, len(done), donors, ray_address)
            progress = Progress(sum(u.num_rows for u in todo))
            results += _execute(
                plan,
                todo,
                pool,
                encoder,
                donors,
                on_result=lambda r: progress.update(r.rows_in, r.rows_dropped),
            )
            progress.close()
            clock.mark("embed")
        else:
            _say_nothing_to_do(plan)
            clock.mark("plan")
        return _commit(plan, results, set(done), existing, pool, encoder, clock)


def check_input_ids(plan: EmbedPlan) -> None:
    """Null and repeated ids are refused before any work (``checks.check_ids``: on Ray tasks
    when this process has joined a cluster). Skipped when the last committed run read these
    very files (same names, sizes and mtimes) with the same input settings: it checked them."""
    last = commit.read_manifest(plan.out) if storage.exists(plan.out) else None
    if last is not None:
        checked = [(f["rel"], f["size"], f["mtime"]) for f in last.get("files", [])]
        current = [(f.rel, f.size, f.mtime) for f in plan.inputs.files]
        same_input = last["config"]["input"] == plan.run_metadata["config"]["input"]
        if same_input and checked == current and not last.get("bad_files"):
            return
    check_ids(plan.config, plan.inputs.files, plan.inputs.id_hashes)


def find_committed(plan: EmbedPlan) -> tuple[set[str], dict[str, UnitResult]]:
    """The files already under the output, and the units among them that this run need not
    embed again (same content hash, same input fingerprint)."""
    out = plan.out
    existing = {i.path for i in storage.list_files(out)} if storage.exists(out) else set()
    content_hash = plan.run_metadata["content_hash"]
    return existing, commit.committed_units(out, plan.inputs, content_hash, existing)


def donor_files(
    plan: EmbedPlan, existing: set[str], done: dict[str, UnitResult]
) -> list[tuple[str, int]]:
    """The output parts this run replaces or removes that were written with this run's content
    hash, with their row counts: their rows' vectors are copied, not recomputed."""
    kept = {plan.out.child(r.output).path for r in done.values() if r.output}
    candidates = sorted(p for p in commit.output_parts(existing) if p not in kept)
    return reuse.donor_files(plan.out, candidates, plan.run_metadata["content_hash"])


def choose_pool(
    plan: EmbedPlan, todo: list[WorkUnit], reusable_rows: int, ray_address: str | None
) -> PoolPlan:
    """This process for small work (``compute.executor``), else a pool sized from the cluster."""
    expected = max(0, sum(u.num_rows for u in todo) - reusable_rows)
    if runs_in_process(plan.config.compute, ray_address, expected):
        return in_process_pool()
    from sbertray.embed import ray_adapter

    resources, limits = ray_adapter.cluster_resources(ray_address)
    return plan_pool(resources, plan.config.compute, len(todo), limits, cpus_per_gpu=cpus_per_gpu())


def resolve_encoder(plan: EmbedPlan, pool: PoolPlan) -> EncoderSpec:
    """The one ``EncoderSpec`` the run's units get on this pool."""
    try:
        return backends.encoder_spec(
            plan.config.compute,
            model=plan.model_for_actors,
            model_hash=plan.model.model_hash,
            device=pool.device,
            threads=pool.threads,
            exportable=plan.model.exportable,
        )
    except ValueError as exc:
        raise EmbedInputError(f"compute: {exc}") from None


def _start(
    plan: EmbedPlan,
    todo: list[WorkUnit],
    done: int,
    donors: reuse.DonorIndex | None,
    ray_address: str | None,
) -> tuple[PoolPlan, EncoderSpec]:
    """Decides where the units run and what they run."""
    pool = choose_pool(plan, todo, len(donors) if donors else 0, ray_address)
    encoder = resolve_encoder(plan, pool)
    backends.prepare(encoder, plan.model.path)
    resumed = f"; {done} units already committed" if done else ""
    reusing = (
        f"; vectors of {len(donors):,} texts in {donors.files} earlier output files reusable"
        if donors
        else ""
    )
    print(
        f"[sbertray] {len(plan.inputs.files)} files, {plan.inputs.total_rows:,} rows; embedding "
        f"{len(todo)} of {len(plan.inputs.units)} units{resumed}{reusing}; pool: "
        f"{pool.describe()}; backend {encoder.backend}, precision {encoder.precision}",
        flush=True,
    )
    return pool, encoder


def _check_paths_on_cluster(plan: EmbedPlan, ray_address: str | None) -> None:
    from sbertray.embed import ray_adapter

    ray_adapter.cluster_resources(ray_address)  # joins the cluster
    if spans_many_nodes():
        storage.check_shared({"output.path": plan.config.output.path}, plan.config.storage)


def _execute(
    plan: EmbedPlan,
    todo: list[WorkUnit],
    pool: PoolPlan,
    encoder: EncoderSpec,
    donors: reuse.DonorIndex | None,
    on_result: Callable[[UnitResult], None],
) -> list[UnitResult]:
    if pool.in_process:
        from sbertray.embed import in_process

        return in_process.run_units(
            plan.config, todo, encoder, plan.run_metadata, donors, on_result
        )
    from sbertray.embed import ray_adapter

    return ray_adapter.run_units(
        plan.config, todo, pool, encoder, plan.run_metadata, donors, on_result
    )


def _say_nothing_to_do(plan: EmbedPlan) -> None:
    if plan.inputs.units:
        message = (
            f"nothing to do: all {len(plan.inputs.units)} units of {len(plan.inputs.files)} "
            "files are already embedded with this model and config"
        )
    else:
        message = (
            f"no input rows under {storage.redact(str(plan.config.input.path))}: nothing to embed"
        )
    print(f"[sbertray] {message}", flush=True)


def _commit(
    plan: EmbedPlan,
    results: list[UnitResult],
    done: set[str],
    existing: set[str],
    pool: PoolPlan | None,
    encoder: EncoderSpec | None,
    clock: PhaseClock,
) -> EmbedSummary:
    """Fails on bad rows and files as configured, checks the invariant, removes what no reader
    may see, and writes the report, the manifest and ``_SUCCESS``."""
    config, out = plan.config, plan.out
    row_errors = [r.error for r in results if r.error_kind == "bad_rows"]
    if row_errors:
        raise EmbedInputError("\n".join(row_errors))
    unreadable = {rel: message for r in results for rel, message in r.bad_files.items()}
    if unreadable and config.bad_input.on_bad_file == "fail":
        raise EmbedInputError(
            "\n".join(unreadable.values())
            + "\n(set `bad_input.on_bad_file: skip` to embed the other files)"
        )
    by_unit = {r.unit_id: r for r in results}
    written = commit.check_invariant(out, plan.inputs.units, by_unit, done)
    committed = [r for r in results if r.output is not None]
    kept = InputPlan(
        files=[f for f in plan.inputs.files if f.rel not in unreadable],
        units=[u for u in plan.inputs.units if by_unit[u.unit_id].output is not None],
    )
    commit.remove_temp_files(out, committed)
    bad_stems = {f.output_stem for f in plan.inputs.bad_files}
    bad_stems |= {f.output_stem for f in plan.inputs.files if f.rel in unreadable}
    superseded, orphaned = commit.remove_stale_parts(out, kept, existing, bad_stems)
    if superseded or orphaned:
        print(
            f"[sbertray] removed {superseded} output parts of changed or regrouped input files "
            f"and {orphaned} of deleted input files",
            flush=True,
        )
    clock.mark("commit")

    bad_files = [f.url for f in plan.inputs.bad_files] + sorted(
        f.url for f in plan.inputs.files if f.rel in unreadable
    )
    summary = EmbedSummary(
        skipped_units=len(done),
        superseded_parts=superseded,
        orphaned_parts=orphaned,
        embedded_rows=sum(r.rows_out for r in committed if r.unit_id not in done),
        reused_rows=sum(r.rows_reused for r in committed if r.unit_id not in done),
        retried_units=sum(r.attempt > 1 for r in committed if r.unit_id not in done),
        texts_embedded=sum(r.rows_embedded for r in committed if r.unit_id not in done),
        output_url=storage.redact(out.url),
        input_files=len(kept.files),
        input_rows=sum(f.num_rows for f in kept.files),
        output_rows=written,
        bad_rows=sum(r.rows_dropped for r in committed),
        bad_files=bad_files,
        truncated=sum(r.truncated for r in committed),
        seconds=round(time.time() - clock.started, 2),
        units=[asdict(r) for r in committed],
    )
    compute = None
    if encoder is not None:  # the model reference is in `model` already (redacted)
        compute = {k: v for k, v in asdict(encoder).items() if k not in ("model", "model_hash")}
    totals = {
        "input_files": summary.input_files,
        "input_rows": summary.input_rows,
        "output_rows": summary.output_rows,
        "bad_rows": summary.bad_rows,
        "truncated": summary.truncated,
        "superseded_parts_removed": summary.superseded_parts,
        "orphaned_parts_removed": summary.orphaned_parts,
        "units_retried": summary.retried_units,
    }
    record = commit.manifest_record(
        plan.run_metadata,
        kept,
        committed,
        totals,
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.started)),
            "precision": encoder.precision if encoder else None,
            "compute": compute,
            "pool": asdict(pool) if pool else None,
            "bad_files": summary.bad_files,
            "compact": {
                "embedding_dtype": config.output.embedding_dtype,
                "truncate_dim": config.output.truncate_dim,
                "int8_ranges": plan.run_metadata.get("int8_ranges"),
            },
            "timings": {
                "seconds": summary.seconds,
                "embedded_rows": summary.embedded_rows,
                "reused_rows": summary.reused_rows,
                "texts_embedded": summary.texts_embedded,
                "rows_per_s": round(summary.rows_per_s, 1),
                "unit_seconds": sum(r.seconds for r in committed),
                # First unit started to last unit committed: throughput once the actors run.
                "units_span_s": units_span(r for r in committed if r.unit_id not in done),
                "phases": dict(clock.phases),
                "driver_peak_rss_mb": peak_rss_mb(),
            },
        },
    )
    if summary.embedded_rows or not done or superseded or orphaned:
        write_embed_report(out, record, [asdict(r) for r in results if r.unit_id not in done])
    else:
        note_noop_rerun(out, f"{record['finished']}: run {plan.run_id}: nothing to do")
    commit.write_manifest(out, record)
    clock.mark("report")
    summary.phases = dict(clock.phases)
    print(f"[sbertray] {clock.describe()}; driver peak RSS {peak_rss_mb():,.0f} MB", flush=True)
    return summary
