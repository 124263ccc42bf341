"""Run reports: ``report.json`` + ``report.md`` with PNG plots, and a terminal summary for
``sbertray report URL``.

Embedding and nightly outputs are datasets that pandas, pyarrow, polars, DuckDB and Spark read
whole, skipping names that start with ``_`` or ``.``: their reports go to ``<output>/_report/``
(like ``_SUCCESS`` and ``_manifest.json``). A trained model's report sits beside the model.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from sbertray import storage
from sbertray.output_paths import LANCE_PARTS_DIR

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_DIR = "_report"  # under dataset outputs
# Scores plotted per run at most: enough for a smooth histogram, cheap to read back.
_MAX_SCORE_SAMPLES = 200_000


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def figure(title: str, xlabel: str, ylabel: str):
    # A bare Figure draws with Agg and is freed with its last reference: no pyplot figure
    # registry to close, no process-wide backend switch inside a library call.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plural(count: int, word: str) -> str:
    """``"1 file"``, ``"2 files"``, ``"1,200 rows"``."""
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def format_rate(rows: int, seconds: float) -> str:
    """``"36 rows in 24.1 s, 1.49 rows/s"``: three significant digits, never "1 rows/s"."""
    rate = rows / seconds if seconds > 0 else 0.0
    shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
    return f"{rows:,} rows in {seconds:.1f} s, {shown} rows/s"


def dev_scores_line(dev: dict) -> str:
    """``stsb-dev: Spearman 0.8966, Pearson 0.8990``, then the Spearman of the vectors cut to
    fewer dimensions with its share of the full one, when the dev set was scored that way."""
    line = f"{dev['dataset']}: Spearman {dev['spearman_cosine']:.4f}, Pearson {dev['pearson_cosine']:.4f}"
    by_dim = dev.get("spearman_cosine_by_dim") or {}
    cuts = [
        f"{dim}d {score:.4f} ({score / dev['spearman_cosine']:.1%})"
        for dim, score in by_dim.items()
    ]
    return line + (f"; first dimensions only: {', '.join(cuts)}" if cuts else "")


def write(out: storage.Location, report: dict, markdown: str, plots: dict[str, bytes]) -> None:
    """Writes ``report.json``, ``report.md`` and the plots into the folder ``out``."""
    for name, data in plots.items():
        storage.write_bytes(out.child(name), data)
    storage.write_bytes(out.child(REPORT_MD), markdown.encode())
    storage.write_bytes(out.child(REPORT_JSON), json.dumps(report, indent=2, default=str).encode())


def write_train_report(model_url: str, result: dict, storage_config=None) -> dict:
    """Loss curve and dev metrics per epoch, next to the trained model."""
    out = storage.resolve(model_url, storage_config)
    plots = {}
    if result.get("loss_log"):
        fig, ax = figure(f"{result['name']}: training loss", "step", "loss (MSE)")
        ax.plot([e["step"] for e in result["loss_log"]], [e["loss"] for e in result["loss_log"]])
        plots["loss.png"] = png_bytes(fig)
    evals = result.get("eval_log") or []
    metric_keys = sorted(
        {k for e in evals for k in e if k.endswith(("_spearman_cosine", "_pearson_cosine"))}
    )
    if evals and metric_keys:
        fig, ax = figure(f"{result['name']}: dev metrics", "epoch", "correlation")
        for key in metric_keys:
            ax.plot([e["epoch"] for e in evals], [e[key] for e in evals], marker="o", label=key)
        ax.legend(fontsize=8)
        plots["eval.png"] = png_bytes(fig)
    dev = result.get("dev_metrics") or {}
    report = {"kind": "train", **result, "plots": sorted(plots)}
    lines = [
        f"# Training report: {result['name']}",
        "",
        f"- model: `{result['model_url']}` (from `{result['base_model']}`)",
        f"- steps: {result['global_step']} ({result['epochs']:.2f} epochs, "
        f"{result['num_workers']} workers), resumed from step {result['resumed_from_step']}",
        f"- train rows: {result['train_rows']:,} ({result['skipped_rows']} bad rows skipped)",
        f"- wall time: {result['wall_time_s']:.0f}s",
    ]
    if dev:
        lines.append(f"- {dev_scores_line(dev)} ({dev['num_pairs']} pairs)")
    lines += ["", *[f"![{p}]({p})" for p in sorted(plots)], ""]
    write(out, report, "\n".join(lines), plots)
    return report


def _score_sample(out: storage.Location, outputs: list[str]) -> tuple[str | None, np.ndarray]:
    """Pair cosine or top-1 reference score, from the written files (what users will see)."""
    scores, label = [], None
    for rel in outputs:
        with out.fs.open_input_file(out.child(rel).path) as handle:
            names = pq.read_schema(handle).names
        column = (
            "cosine" if "cosine" in names else "topk_scores" if "topk_scores" in names else None
        )
        if column is None:
            return None, np.array([])
        label = "pair cosine" if column == "cosine" else "top-1 reference score"
        with out.fs.open_input_file(out.child(rel).path) as handle:
            values = pq.read_table(handle, columns=[column]).column(column).combine_chunks()
        arr = (
            values.to_numpy()
            if column == "cosine"
            else np.stack(values.to_numpy(zero_copy_only=False))[:, 0]
            if len(values)
            else np.array([])
        )
        scores.append(arr)
        if sum(len(s) for s in scores) >= _MAX_SCORE_SAMPLES:
            break
    return label, (np.concatenate(scores) if scores else np.array([]))


_FILES_AS_BARS = 40  # more input files than this: a histogram of their sizes, not a bar each


def write_embed_report(out: storage.Location, manifest: dict, units: list[dict]) -> dict:
    """Rows over time, rows per input file, score histogram and bad rows by reason, into
    ``<out>/_report/``."""
    files = manifest.get("files", [])
    plots = {**_throughput_plot(units), **_rows_per_file_plot(files)}
    outputs = dict.fromkeys(o["path"] for f in files for o in f["outputs"])  # groups: once
    label, scores = _score_sample(out, list(outputs))
    if label and len(scores):
        fig, ax = figure(f"{label} ({len(scores):,} rows)", label, "rows")
        ax.hist(scores, bins=50)
        plots["scores.png"] = png_bytes(fig)
    reasons = Counter()
    for f in files:
        reasons.update(f.get("bad_reasons", {}))
    if reasons:
        fig, ax = figure("bad rows by reason", "reason", "rows")
        ax.bar(list(reasons), list(reasons.values()))
        plots["bad_rows.png"] = png_bytes(fig)
    report = {
        "kind": "embed",
        "run_id": manifest["run_id"],
        "totals": manifest["totals"],
        "timings": manifest["timings"],
        "bad_reasons": dict(reasons),
        "bad_files": manifest.get("bad_files", []),
        "bad_row_examples": manifest.get("bad_row_examples", []),
        "model": manifest["model"],
        "score": {
            "label": label,
            "mean": float(scores.mean()),
            "p5": float(np.percentile(scores, 5)),
            "p95": float(np.percentile(scores, 95)),
        }
        if label and len(scores)
        else None,
        "plots": sorted(plots),
    }
    write(out.child(REPORT_DIR), report, _embed_markdown(manifest, plots), plots)
    return report


def _throughput_plot(units: list[dict]) -> dict[str, bytes]:
    timed = sorted((u for u in units if u.get("finished_at")), key=lambda u: u["finished_at"])
    if not timed:
        return {}
    t0 = min(u["finished_at"] - u["seconds"] for u in timed)
    xs = [u["finished_at"] - t0 for u in timed]
    fig, ax = figure("throughput", "seconds since start", "rows embedded")
    ax.plot(xs, np.cumsum([u["rows_out"] for u in timed]), drawstyle="steps-post")
    return {"throughput.png": png_bytes(fig)}


def _rows_per_file_plot(files: list[dict]) -> dict[str, bytes]:
    """A bar per input file, or for many files a histogram of how their sizes spread."""
    if not files:
        return {}
    if len(files) > _FILES_AS_BARS:
        fig, ax = figure(f"rows per input file ({len(files):,} files)", "rows", "input files")
        ax.hist([f["rows_out"] + f["bad_rows"] for f in files], bins=50, label="rows")
        ax.hist([f["bad_rows"] for f in files if f["bad_rows"]], bins=50, label="bad rows")
    else:
        fig, ax = figure("rows per input file", "input file", "rows")
        names = [f["rel"] for f in files]
        ax.bar(names, [f["rows_out"] for f in files], label="embedded")
        bottom = [f["rows_out"] for f in files]
        ax.bar(names, [f["bad_rows"] for f in files], bottom=bottom, label="bad")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=8)
    return {"rows_per_shard.png": png_bytes(fig)}


def _skipped_rows(examples: list[str]) -> list[str]:
    if not examples:
        return []
    return ["- skipped rows (the first ones; the manifest lists them too):"] + [
        f"  - {example}" for example in examples
    ]


def _embed_markdown(manifest: dict, plots: dict[str, bytes]) -> str:
    totals, timings, model = manifest["totals"], manifest["timings"], manifest["model"]
    lines = [
        f"# Embedding report: run {manifest['run_id']}",
        "",
        f"- model: `{model['model']}` (hash {model['model_hash'][:12]}, dim {model['dim']})",
        f"- rows: {totals['input_rows']:,} in, {totals['output_rows']:,} embedded, "
        f"{totals['bad_rows']:,} bad, {totals['truncated']:,} truncated",
        f"- this run: embedded {format_rate(timings['embedded_rows'], timings['seconds'])}",
        f"- bad files: {len(manifest.get('bad_files', []))}",
        *_skipped_rows(manifest.get("bad_row_examples", [])),
        "",
        *[f"![{p}]({p})" for p in sorted(plots)],
        "",
    ]
    return "\n".join(lines)


def note_noop_rerun(out: storage.Location, line: str) -> None:
    """A rerun that had nothing to do keeps the last real report and adds one line to it."""
    md = out.child(REPORT_DIR, REPORT_MD)
    if storage.exists(md):
        storage.write_bytes(md, storage.read_bytes(md) + f"- {line}\n".encode())


def find_report(loc: storage.Location) -> storage.Location | None:
    """The report.json of a dataset output (``_report/``; a Lance output's in ``_sbertray/``)
    or of a trained model (beside it)."""
    for candidate in (
        loc.child(REPORT_DIR, REPORT_JSON),
        loc.child(LANCE_PARTS_DIR, REPORT_DIR, REPORT_JSON),
        loc.child(REPORT_JSON),
    ):
        if storage.exists(candidate):
            return candidate
    return None


def summarize(url: str, storage_config=None) -> str:
    """A terminal summary of the report at ``url`` (a model dir or an embedding output)."""
    report_loc = find_report(storage.resolve(url, storage_config))
    if report_loc is None:
        raise storage.StorageError(
            f"no {REPORT_DIR}/{REPORT_JSON} or {REPORT_JSON} under {storage.redact(url)}"
        )
    report = json.loads(storage.read_bytes(report_loc))
    if report["kind"] == "nightly":
        return f"nightly run {report['run_id']} ({report['seconds']:.0f}s): " + "; ".join(
            report["log"]
        )
    if report["kind"] == "train":
        dev = report.get("dev_metrics") or {}
        metric = (
            f"{dev['dataset']} spearman {dev['spearman_cosine']:.4f} pearson {dev['pearson_cosine']:.4f}"
            if dev
            else "no dev set"
        )
        losses = report.get("loss_log") or []
        loss = (
            f"loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}"
            if losses
            else "no loss logged"
        )
        return (
            f"train {report['name']}: {plural(report['global_step'], 'step')}, "
            f"{report['epochs']:.2f} epochs, "
            f"{report['wall_time_s']:.0f}s; {loss}; {metric}; plots: {', '.join(report['plots'])}"
        )
    t = report["totals"]
    score = report.get("score")
    scored = (
        f"; {score['label']} mean {score['mean']:.3f} (p5 {score['p5']:.3f}, p95 {score['p95']:.3f})"
        if score
        else ""
    )
    return (
        f"embed run {report['run_id']}: {t['output_rows']:,}/{t['input_rows']:,} rows embedded, "
        f"{t['bad_rows']} bad, {t['truncated']} truncated; this run "
        f"{format_rate(report['timings']['embedded_rows'], report['timings']['seconds'])}"
        f"{scored}; bad files: {len(report['bad_files'])}; plots: {', '.join(report['plots'])}"
    )
