"""``sbertray embed CONFIG --dry-run``: every check the real run makes before it spends
anything, then the plan it would carry out and an estimate of its time from embedding a
sample of the input on this machine. Nothing is written to the output location."""

from __future__ import annotations

import time

from sbertray.config import EmbedConfig
from sbertray.embed import backends, planning
from sbertray.embed.planning import EmbedPlan
from sbertray.embed.shards import WorkUnit
from sbertray.embed.texts import sample_texts
from sbertray.modeling import resolve_model_path
from sbertray.progress import format_duration
from sbertray.report import REPORT_DIR, plural

# Texts embedded to estimate the rate: enough for a stable figure, a second or two on a CPU.
SAMPLE_ROWS = 256


def dry_run(config: EmbedConfig, *, ray_address: str | None = None) -> str:
    """The plan as lines of text. Raises what ``run_embed`` raises before it starts work."""
    plan = planning.plan_embed(config)
    planning.check_input_ids(plan)
    existing, done = planning.find_committed(plan)
    todo = [u for u in plan.inputs.units if u.unit_id not in done]
    inputs = plan.inputs
    lines = [
        f"[sbertray] dry run: nothing is written to {plan.run_metadata['config']['output']['path']}",
        f"  model: {plan.run_metadata['model']} (hash {plan.model.model_hash[:12]}, "
        f"dim {plan.model.spec.dim}, max_seq_length {plan.model.spec.max_seq_length})",
        f"  input: {plural(len(inputs.files), 'file')}, {plural(inputs.total_rows, 'row')}, "
        f"{plural(len(inputs.units), 'unit')}; {len(done)} already committed, "
        f"{sum(u.num_rows for u in todo):,} rows to embed"
        + (f"; {len(inputs.bad_files)} bad files skipped" if inputs.bad_files else ""),
        f"  output: a file per unit, <input path>.part-NNNN.parquet or, for small files grouped, "
        f"<first file>.<n>-files.part-0000.parquet ({', '.join(f.name for f in _schema(plan))}), "
        f"_manifest.json, _SUCCESS, {REPORT_DIR}/",
    ]
    if not todo:
        return "\n".join([*lines, "  nothing to embed"])
    donors = planning.donor_files(plan, existing, done)
    todo_rows = sum(u.num_rows for u in todo)
    reusable = min(todo_rows, sum(d.rows for d in donors))
    pool = planning.choose_pool(plan, todo, reusable, ray_address)
    encoder = planning.resolve_encoder(plan, pool)
    rate, sampled = _sample_rate(plan, todo[0], encoder)
    seconds = (todo_rows - reusable) / (rate * pool.num_actors)
    way = (
        "joined to the units on Ray" if planning.joins_donors(plan.config, donors) else "one index"
    )
    size = sum(d.bytes for d in donors) / (1 << 20)
    lines += [
        f"  pool: {pool.describe()}; backend {encoder.backend}, precision {encoder.precision}",
        f"  estimate: {rate:,.0f} rows/s per actor on {sampled} sample rows here, so about "
        f"{format_duration(seconds)} of embedding for {pool.num_actors} actor(s), plus start-up"
        + (
            f"; up to {reusable:,} rows' vectors may be copied from earlier output "
            f"({size:,.0f} MB, {way})"
            if reusable
            else ""
        ),
    ]
    return "\n".join(lines)


def _schema(plan: EmbedPlan):
    from sbertray.embed.stage import output_schema

    return output_schema(plan.config, plan.model.spec.dim)


def _sample_rate(plan: EmbedPlan, unit: WorkUnit, encoder) -> tuple[float, int]:
    """Rows/s of one actor's encoder on the first unit's first texts, and how many."""
    texts = sample_texts(plan.config, [unit], SAMPLE_ROWS)
    model_dir = resolve_model_path(encoder.model, plan.config.storage)
    text_encoder = backends.build_encoder(encoder, model_dir)
    text_encoder.encode(texts[:8])  # warm-up: first-call allocations
    started = time.perf_counter()
    text_encoder.encode(texts)
    return len(texts) / max(time.perf_counter() - started, 1e-6), len(texts)
