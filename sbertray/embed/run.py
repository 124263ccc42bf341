"""The embed job, as plan -> execute -> commit.

    ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/embed_demo.yaml

- **plan** (``planning``): everything that can fail without the model running: config, model,
  input footers and columns, ids, output columns, output writability.
- **execute**: the units not committed by an earlier run, on a pool of ``EmbedStage`` actors
  (``ray_adapter``) sized from the cluster (``pool``), or in this process for small work
  (``in_process``), running the backend ``backends`` picks.
- **commit** (``commit``): the invariant (output rows + bad rows = input rows, ids unique), then
  ``_manifest.json`` and ``_SUCCESS``. Nothing is marked done unless the invariant holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sbertray import output_paths, storage
from sbertray.config import EmbedConfig
from sbertray.embed import backends, commit, reuse
from sbertray.embed.donor_join import JoinedDonors
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.lock import OutputLock
from sbertray.embed.planning import (
    EmbedPlan,
    check_input_ids,
    choose_pool,
    donor_files,
    find_committed,
    joins_donors,
    plan_embed,
    resolve_encoder,
)
from sbertray.embed.pool import PoolPlan, runs_in_process
from sbertray.embed.prepared import PreparedModel
from sbertray.embed.results import UnitResult
from sbertray.embed.shards import EmbedInputError, InputPlan, WorkUnit
from sbertray.embed.stage import computed_columns
from sbertray.embed.summary import EmbedSummary, PhaseClock, peak_rss_mb, units_span
from sbertray.progress import Progress
from sbertray.ray_runtime import spans_many_nodes
from sbertray.report import note_noop_rerun, plural, write_embed_report


def run_embed(
    config: EmbedConfig, *, ray_address: str | None = None, model: PreparedModel | None = None
) -> EmbedSummary:
    """Embeds ``config.input`` into ``config.output.path`` and commits the manifest.
    ``model``: ``prepared.prepare_job_model(config)`` where the caller has it already.

    Raises what ``plan.plan_embed`` raises, and:
        EmbedInputError: bad rows (``fail``), bad files found while reading.
        InvariantError: output does not account for every input row exactly once.
        LockError: another live run holds the output location.
    """
    clock = PhaseClock()
    plan = plan_embed(config, model)
    if not runs_in_process(plan.config.compute, ray_address, rows_to_embed=0):
        _check_paths_on_cluster(plan, ray_address)  # before the lock creates anything
    check_input_ids(plan)
    plan.inputs.id_hashes.clear()  # checked: the run needs them no more
    with OutputLock(plan.out, plan.run_id, stale_after_s=plan.config.output.lock_stale_after_s):
        existing, done = find_committed(plan)
        todo = [u for u in plan.inputs.units if u.unit_id not in done]
        results, pool, encoder = list(done.values()), None, None
        if todo:
            donors = _donors(plan, existing, done, todo, ray_address)
            clock.mark("plan")
            try:
                pool, encoder = _start(plan, todo, len(done), donors, ray_address)
                progress = Progress(sum(u.num_rows for u in todo))
                on_result = lambda r: progress.update(r.rows_in, r.rows_dropped)  # noqa: E731
                results += _execute(plan, todo, pool, encoder, donors, on_result)
                progress.close()
            finally:
                donors.close()
            clock.mark("embed")
        else:
            _say_nothing_to_do(plan)
            clock.mark("plan")
        return _commit(plan, results, set(done), existing, pool, encoder, clock)


@dataclass(frozen=True)
class _Donors:
    """The earlier output rows this run copies from, as the executor takes them."""

    # One shared index, or where each unit's own is (joined on Ray, ``ray_adapter.join_donors``).
    rows: reuse.DonorIndex | JoinedDonors | None = None
    reusable_rows: int = 0  # rows of the units to embed they can serve
    note: str = ""  # for the run's opening line

    def close(self) -> None:
        """Deletes the join's scratch files, the units' donor rows, once the units ran."""
        if isinstance(self.rows, JoinedDonors):
            storage.delete(self.rows.root)


def _donors(
    plan: EmbedPlan,
    existing: set[str],
    done: dict[str, UnitResult],
    todo: list[WorkUnit],
    ray_address: str | None,
) -> _Donors:
    """The computed columns of the earlier output parts this run replaces, by content key: one
    index where they are small (or the run stays in this process), else joined to each unit on
    Ray. A shared index's reusable rows are an estimate (its rows, as a rewrite keeps most)."""
    files = donor_files(plan, existing, done)
    if not files:
        return _Donors()
    columns = computed_columns(plan.config)
    todo_rows = sum(u.num_rows for u in todo)
    where = plural(len(files), "earlier output file")
    if not joins_donors(plan.config, files):
        index = reuse.build_index(plan.out, [f.path for f in files], columns)
        reusable = min(todo_rows, sum(f.rows for f in files))
        return _Donors(index, reusable, f"; vectors of {len(index):,} texts in {where} reusable")
    from sbertray.embed import ray_adapter

    ray_adapter.cluster_resources(ray_address)  # joins (or starts) Ray
    content_hash = plan.run_metadata["content_hash"]
    per_unit, matched = ray_adapter.join_donors(
        plan.config, todo, plan.out, files, columns, content_hash
    )
    note = f"; vectors for {matched:,} of {todo_rows:,} rows found in {where} (joined on Ray)"
    return _Donors(per_unit, matched, note)


def _start(
    plan: EmbedPlan,
    todo: list[WorkUnit],
    done: int,
    donors: _Donors,
    ray_address: str | None,
) -> tuple[PoolPlan, EncoderSpec]:
    """Decides where the units run and what they run."""
    pool = choose_pool(plan, todo, donors.reusable_rows, ray_address)
    encoder = resolve_encoder(plan, pool)
    backends.prepare(encoder, plan.model.path)
    resumed = f"; {plural(done, 'unit')} already committed" if done else ""
    print(
        f"[sbertray] {plural(len(plan.inputs.files), 'file')}, "
        f"{plural(plan.inputs.total_rows, 'row')}; embedding {len(todo)} of "
        f"{plural(len(plan.inputs.units), 'unit')}{resumed}{donors.note}{_id_note(plan)}; "
        f"pool: {pool.describe()}; backend {encoder.backend}, precision {encoder.precision}",
        flush=True,
    )
    return pool, encoder


def _id_note(plan: EmbedPlan) -> str:
    """The output's ids are always the `id` column: say so when the input names them otherwise."""
    column = plan.config.input.id_column
    if column is None:
        return "; ids generated as `<file>#<row>` in the output's `id` column"
    return "" if column == "id" else f"; input ids `{column}` are the output's `id` column"


def _check_paths_on_cluster(plan: EmbedPlan, ray_address: str | None) -> None:
    from sbertray.embed import ray_adapter

    ray_adapter.cluster_resources(ray_address)  # joins the cluster
    if spans_many_nodes():
        output_paths.check_shared({"output.path": plan.config.output.path}, plan.config.storage)


def _execute(
    plan: EmbedPlan,
    todo: list[WorkUnit],
    pool: PoolPlan,
    encoder: EncoderSpec,
    donors: _Donors,
    on_result: Callable[[UnitResult], None],
) -> list[UnitResult]:
    if pool.in_process:  # never with per-unit donors: joining them started Ray
        from sbertray.embed import in_process

        return in_process.run_units(
            plan.config, todo, encoder, plan.run_metadata, donors.rows, on_result
        )
    from sbertray.embed import ray_adapter

    return ray_adapter.run_units(
        plan.config, todo, pool, encoder, plan.run_metadata, donors.rows, on_result
    )


def _say_nothing_to_do(plan: EmbedPlan) -> None:
    if plan.inputs.units:
        message = (
            f"nothing to do: all {plural(len(plan.inputs.units), 'unit')} of "
            f"{plural(len(plan.inputs.files), 'file')} are already embedded with this model and "
            "config"
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
    unreadable = _check_failures(plan.config, results)
    by_unit = {r.unit_id: r for r in results}
    written = commit.check_invariant(plan.out, plan.inputs.units, by_unit, done)
    committed = [r for r in results if r.output is not None]
    kept = InputPlan(
        files=[f for f in plan.inputs.files if f.rel not in unreadable],
        units=[u for u in plan.inputs.units if by_unit[u.unit_id].output is not None],
    )
    superseded, orphaned = _remove_unseen(plan, kept, committed, existing, unreadable)
    clock.mark("commit")
    lance = _sync_lance(plan, committed, clock)
    this_run = [r for r in committed if r.unit_id not in done]
    summary = EmbedSummary(
        output_url=storage.redact(plan.config.output.path),
        records_url=storage.redact(plan.out.url),
        input_files=len(kept.files),
        input_rows=kept.total_rows,
        output_rows=written,
        bad_rows=sum(r.rows_dropped for r in committed),
        bad_files=[f.url for f in plan.inputs.bad_files]
        + sorted(f.url for f in plan.inputs.files if f.rel in unreadable),
        truncated=sum(r.truncated for r in committed),
        seconds=clock.elapsed(),
        skipped_units=len(done),
        units_written=len(this_run),
        embedded_rows=sum(r.rows_out for r in this_run),
        reused_rows=sum(r.rows_reused for r in this_run),
        texts_embedded=sum(r.rows_embedded for r in this_run),
        superseded_parts=superseded,
        orphaned_parts=orphaned,
        retried_units=sum(r.attempt > 1 for r in this_run),
        units_span_s=units_span(this_run),
        phases=dict(clock.phases),
    )
    record = commit.manifest_record(
        plan.run_metadata, kept, committed, summary, encoder, pool, clock.started
    )
    record |= {"lance": lance} if lance else {}
    if summary.embedded_rows or not done or superseded or orphaned:
        write_embed_report(plan.out, record, [r.__dict__ for r in results if r.unit_id not in done])
    else:
        note_noop_rerun(plan.out, f"{record['finished']}: run {plan.run_id}: nothing to do")
    commit.write_manifest(plan.out, record)
    clock.mark("report")
    summary.phases = dict(clock.phases)
    print(f"[sbertray] {clock.describe()}; driver peak RSS {peak_rss_mb():,.0f} MB", flush=True)
    return summary


def _sync_lance(plan: EmbedPlan, committed: list[UnitResult], clock: PhaseClock) -> dict | None:
    """Syncs the committed parts into the Lance dataset (``lance_sink``); its manifest record
    (None for a Parquet output)."""
    if plan.config.output.format != "lance":
        return None
    from sbertray.embed import lance_sink

    last = (plan.last_manifest or {}).get("lance") or {}
    synced = lance_sink.sync(plan.config, plan.out, committed, last.get("index"))
    index = synced.index or {}
    if index.get("built"):
        said = f"{index['type']} index {index['action']} ({index['seconds']:.1f} s)"
    else:
        said = f"no vector index ({index.get('reason', 'no rows')})"
    print(
        f"[sbertray] Lance dataset {synced.uri}: version {synced.version}, "
        f"{plural(synced.rows, 'row')} ({synced.inserted:,} inserted, {synced.updated:,} "
        f"updated, {synced.deleted:,} deleted); {said}",
        flush=True,
    )
    clock.mark("lance")
    return synced.record()


def _check_failures(config: EmbedConfig, results: list[UnitResult]) -> dict[str, str]:
    """Raises on bad rows (their policy said fail) and on unreadable files unless
    ``bad_input.on_bad_file: skip``; returns the unreadable files (relative path -> message)."""
    row_errors = [r.error for r in results if r.error]
    if row_errors:
        raise EmbedInputError("\n".join(row_errors))
    unreadable = {rel: message for r in results for rel, message in r.bad_files.items()}
    if unreadable and config.bad_input.on_bad_file == "fail":
        raise EmbedInputError(
            "\n".join(unreadable.values())
            + "\n(set `bad_input.on_bad_file: skip` to embed the other files)"
        )
    return unreadable


def _remove_unseen(
    plan: EmbedPlan,
    kept: InputPlan,
    committed: list[UnitResult],
    existing: set[str],
    unreadable: dict[str, str],
) -> tuple[int, int]:
    """Removes killed attempts' temp files and the output parts no current unit writes; returns
    the parts removed of changed (superseded) and of deleted (orphaned) input files."""
    commit.remove_temp_files(plan.out, committed)
    bad_stems = {f.output_stem for f in plan.inputs.bad_files}
    bad_stems |= {f.output_stem for f in plan.inputs.files if f.rel in unreadable}
    superseded, orphaned = commit.remove_stale_parts(plan.out, kept, existing, bad_stems)
    if superseded or orphaned:
        print(
            f"[sbertray] removed {superseded} output parts of changed or regrouped input files "
            f"and {orphaned} of deleted input files",
            flush=True,
        )
    return superseded, orphaned
