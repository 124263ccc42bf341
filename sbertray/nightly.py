"""The nightly incremental pipeline.

1. If a training recipe is configured and its data changed since the last run (file sizes and
   mtimes), fine-tune a candidate, evaluate it and the current model on the dev set, and
   promote the candidate only if it is at least ``promotion.min_improvement`` better.
2. Embed with the promoted model into ``<output>/model=<hash12>/``: only input shards that are new
   or changed since the committed outputs there (see ``embed.commit``); a new model gets a new
   prefix and re-embeds everything, older prefixes stay readable.

State lives in the output location (``_nightly_state.json``), never on local disk, so any
machine can run the next night.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict

from sbertray import storage
from sbertray.config import EmbedConfig, NightlyConfig, TrainConfig, load_config, stable_hash
from sbertray.embed import backends
from sbertray.embed.prepared import prepare_job_model
from sbertray.embed.run import run_embed
from sbertray.embed.summary import EmbedSummary
from sbertray.report import REPORT_DIR, REPORT_MD, plural
from sbertray.report import write as write_report

STATE = "_nightly_state.json"


def _fingerprint(path: str, storage_config) -> str:
    """A hash of the training data's files (names, sizes, mtimes): changes when any does."""
    loc = storage.resolve(path, storage_config)
    info = storage.file_info(loc)
    infos = [info] if info.type == storage.pafs.FileType.File else storage.list_files(loc)
    listing = [(i.path, i.size, i.mtime.isoformat() if i.mtime else None) for i in infos]
    return stable_hash(listing)


def _read_state(root: storage.Location) -> dict:
    loc = root.child(STATE)
    return json.loads(storage.read_bytes(loc)) if storage.exists(loc) else {}


def _train_stage(config: NightlyConfig, state: dict, run_id: str, say, ray_address) -> dict:
    from sbertray.train import evaluate, train

    recipe = load_config(TrainConfig, config.train.config, config.train.overrides)
    fingerprint = _fingerprint(recipe.train.path, recipe.storage)
    if fingerprint == state.get("train_fingerprint") and state.get("model"):
        say(
            f"training data unchanged since run {state.get('run_id')}: keeping model {state['model']}"
        )
        return {"trained": False}
    if recipe.dev is None:
        raise ValueError(
            f"{config.train.config}: the nightly job needs a `dev` set to decide promotion"
        )
    candidate_url = storage.join(config.models, run_id)
    recipe.output.model = candidate_url
    recipe.output.run_name = f"{config.name}-{run_id}"
    # A later night is a new run and never resumes this one's checkpoints.
    result = train(recipe, ray_address=ray_address)
    candidate = result.dev_metrics["spearman_cosine"]
    current_model = state.get("model")
    current = (
        evaluate(current_model, recipe.dev, storage_config=recipe.storage).spearman_cosine
        if current_model
        else None
    )
    stage = {
        "trained": True,
        "candidate": candidate_url,
        "candidate_spearman": candidate,
        "current": current_model,
        "current_spearman": current,
        "train_fingerprint": fingerprint,
    }
    if current is None or candidate >= current + config.promotion.min_improvement:
        say(
            f"promoting {candidate_url}: dev Spearman {candidate:.4f}"
            + (f" vs current {current:.4f}" if current is not None else " (no current model)")
        )
        stage["promoted"] = True
    else:
        say(
            f"NOT promoting {candidate_url}: dev Spearman {candidate:.4f} is below current "
            f"{current:.4f} + {config.promotion.min_improvement}; keeping {current_model}"
        )
        stage["promoted"] = False
    return stage


def run_nightly(config: NightlyConfig, *, ray_address: str | None = None) -> dict:
    """Runs one night; returns (and writes to ``<output>/_report/report.json``) what each stage
    did."""
    started = time.time()
    root = storage.resolve(config.output, config.storage)
    state = _read_state(root)
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    log: list[str] = []

    def say(message: str) -> None:
        message = storage.redact(message)
        log.append(message)
        print(f"[sbertray nightly] {message}", flush=True)

    embed_config = load_config(EmbedConfig, config.embed.config, config.embed.overrides)
    backends.check_config(embed_config.compute)  # a typo fails now, not after training
    train_stage = {"trained": False}
    if config.train is not None:
        train_stage = _train_stage(config, state, run_id, say, ray_address)
        if train_stage.get("promoted"):
            state.update(
                model=train_stage["candidate"], model_spearman=train_stage["candidate_spearman"]
            )
        if train_stage.get("trained"):
            # Tried once on this data: a refused candidate is not retrained every night.
            state["train_fingerprint"] = train_stage["train_fingerprint"]

    embed_config.model = model = state.get("model") or embed_config.model
    summary, model_hash = _embed_stage(config, embed_config, say, ray_address)
    state.update(
        run_id=run_id,
        embeddings=summary.output_url,
        model_hash=model_hash,
        model=state.get("model") or model,
        finished=time.time(),
    )
    report = {
        "kind": "nightly",
        "run_id": run_id,
        "seconds": round(time.time() - started, 1),
        "train": train_stage,
        "embed": asdict(summary),
        "model": model,
        "model_hash": model_hash,
        "log": log,
    }
    state, report = storage.redact_value(state), storage.redact_value(report)
    storage.write_bytes(root.child(STATE), json.dumps(state, indent=2).encode())
    _write_nightly_report(root, report, summary)
    return report


def _embed_stage(
    config: NightlyConfig, embed_config: EmbedConfig, say, ray_address: str | None
) -> tuple[EmbedSummary, str]:
    """Embeds the new or changed shards into ``<output>/model=<hash12>/``; returns the run's
    summary and the model's hash."""
    prepared = prepare_job_model(embed_config)
    embed_config.output.path = storage.join(config.output, f"model={prepared.model_hash[:12]}")
    summary = run_embed(embed_config, ray_address=ray_address, model=prepared)
    say(
        f"embedded {plural(summary.units_written, 'new or changed unit')} "
        f"({summary.skipped_units} already done) into {summary.output_url}"
        if summary.units_written
        else "no new or changed input shards: nothing embedded"
    )
    return summary, prepared.model_hash


def _write_nightly_report(root: storage.Location, report: dict, summary: EmbedSummary) -> None:
    markdown = (
        f"# Nightly run {report['run_id']}\n\n"
        + "".join(f"- {line}\n" for line in report["log"])
        + f"- embeddings: `{summary.output_url}` ({summary.output_rows:,} rows, "
        f"{summary.skipped_units} units already done, see its {REPORT_DIR}/{REPORT_MD})\n"
    )
    write_report(root.child(REPORT_DIR), report, markdown, {})
