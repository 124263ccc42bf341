"""What ``sbertray tune`` shows and leaves: progress lines while trials run, then the trials'
table and plot, the best recipe as YAML and a copy of the best model (with its card)."""

from __future__ import annotations

import time

import yaml
from ray.tune import Callback

from sbertray import storage
from sbertray.config import TrainConfig
from sbertray.errors import UserError
from sbertray.progress import format_duration
from sbertray.report import figure, png_bytes, write
from sbertray.train.run import RESULT_FILE
from sbertray.train.trials import (
    TRIALS_DIR,
    Trial,
    TuneResult,
    best_recipe,
    describe,
    format_value,
)

BEST_RECIPE = "best_recipe.yaml"
BEST_MODEL = "best_model"
_FINISHED = ("TERMINATED", "ERROR")


class Progress(Callback):
    """One line per trial epoch and one per finished trial: trials done/total, best so far,
    ETA (from the trials finished in this process)."""

    def __init__(self, metric: str, total: int):
        self.metric, self.total = metric, total
        self.best: tuple[float, str] | None = None
        self.shown: dict[str, float] = {}  # trial -> the epoch last printed
        self.started, self.finished_here = time.monotonic(), 0

    def setup(self, **info):
        self.started, self.finished_here = time.monotonic(), 0  # also after a restore

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = result.get("epoch", 0)
        if self.metric not in result or self.shown.get(trial.trial_id) == epoch:
            return  # a run's last report repeats its last epoch's
        self.shown[trial.trial_id] = epoch
        score = result[self.metric]
        if self.best is None or score > self.best[0]:
            self.best = (score, trial.trial_id)
        print(
            f"[sbertray] trial {trial.trial_id} epoch {epoch:.0f}: "
            f"{self.metric} {score:.4f} ({describe(trial.config)})",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trials, trial)

    def _finished(self, trials, trial) -> None:
        self.finished_here += 1
        done = len({t.trial_id for t in trials if t.status in _FINISHED} | {trial.trial_id})
        left = self.total - done
        eta = (time.monotonic() - self.started) / self.finished_here * left
        best = f"best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else ""
        print(
            f"[sbertray] trials done {done}/{self.total}; {best}; ETA "
            + (format_duration(eta) if left else "0s"),
            flush=True,
        )


def collect_trials(grid, config: TrainConfig, output_url: str) -> list[Trial]:
    """The trials of a finished ``Tuner.fit`` as ``Trial`` rows."""
    metric = config.tune.metric
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        frame = result.metrics_dataframe
        history = []
        if frame is not None and metric in frame and "epoch" in frame:
            rows = frame[["epoch", metric]].dropna()
            # Per epoch, its first report: a run's last report repeats its last epoch with the
            # score of the epoch it kept.
            for epoch, score in rows.itertuples(index=False):
                if not history or float(epoch) > history[-1][0]:
                    history.append((float(epoch), float(score)))
        params = dict(result.config or {})
        planned = params.get("epochs", config.training.epochs)
        ran = max((e for e, _ in history), default=0.0)
        status = "failed" if result.error else "done" if ran >= planned - 1e-6 else "stopped early"
        model_url = storage.join(output_url, TRIALS_DIR, trial_id, "model")
        model = storage.resolve(model_url, config.storage)
        written = storage.exists(model.child(RESULT_FILE))  # a model's last file
        trials.append(
            Trial(
                trial_id=trial_id,
                params=params,
                score=max((s for _, s in history), default=None),
                history=history,
                epochs=ran,
                status=status,
                model_url=model_url if written else None,
            )
        )
    return trials


def write_outputs(
    config: TrainConfig, trials: list[Trial], output_url: str, seconds: float
) -> TuneResult:
    """The best recipe, the best model and the report, in ``output_url``.

    Raises:
        UserError: no trial wrote a model.
    """
    from pyarrow import fs as pafs

    candidates = [t for t in trials if t.model_url and t.score is not None]
    if not candidates:
        failed = sum(t.status == "failed" for t in trials)
        raise UserError(
            f"no trial of the search wrote a model ({failed} of {len(trials)} failed; their "
            f"errors are in {storage.redact(output_url)}/search): nothing to pick from"
        )
    best = max(candidates, key=lambda t: t.score)
    output = storage.resolve(output_url, config.storage)
    recipe = best_recipe(config, best.params).model_dump(mode="json", exclude_defaults=True)
    storage.write_bytes(output.child(BEST_RECIPE), yaml.safe_dump(recipe, sort_keys=False).encode())
    best_model = output.child(BEST_MODEL)
    storage.delete(best_model)
    source = storage.resolve(best.model_url, config.storage)
    pafs.copy_files(source.path, best_model.path, source.fs, best_model.fs)
    result = TuneResult(
        output_url=storage.redact(output_url),
        metric=config.tune.metric,
        trials=trials,
        best=best,
        best_recipe_url=storage.redact(output.child(BEST_RECIPE).url),
        best_model_url=storage.redact(best_model.url),
        wall_time_s=round(seconds, 1),
    )
    _write_report(output, result)
    return result


def _write_report(output: storage.Location, result: TuneResult) -> None:
    metric = result.metric
    fig, ax = figure(f"trials: dev {metric} per epoch", "epoch", metric)
    for trial in result.trials:
        if trial.history:
            epochs, scores = zip(*trial.history, strict=True)
            ax.plot(epochs, scores, marker="o", label=trial.trial_id)
    ax.legend(fontsize=7)
    plots = {"trials.png": png_bytes(fig)}
    keys = sorted({k for t in result.trials for k in t.params})
    ranked = sorted(result.trials, key=lambda t: -1 if t.score is None else t.score, reverse=True)
    lines = [
        f"# Search report: best dev {metric} {result.best.score:.4f}",
        "",
        f"- trials: {len(result.trials)}; wall time {format_duration(result.wall_time_s)}",
        f"- best: trial {result.best.trial_id} ({describe(result.best.params)})",
        f"- best recipe: `{result.best_recipe_url}`; model: `{result.best_model_url}`",
        "",
        "| trial | " + " | ".join(keys) + f" | {metric} | epochs run | status |",
        "|---|" + "---|" * len(keys) + "---:|---:|---|",
    ]
    for t in ranked:
        values = [format_value(t.params.get(k)) for k in keys]
        score = "" if t.score is None else f"{t.score:.4f}"
        lines.append(
            f"| {t.trial_id} | " + " | ".join(values) + f" | {score} | {t.epochs:g} | {t.status} |"
        )
    lines += ["", "![trials](trials.png)", ""]
    report = {
        "kind": "tune",
        "metric": metric,
        "best": result.best.trial_id,
        "wall_time_s": result.wall_time_s,
        "trials": [t.__dict__ for t in result.trials],
        "plots": sorted(plots),
    }
    write(output, report, "\n".join(lines), plots)
