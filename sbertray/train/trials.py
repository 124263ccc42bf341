"""A ``sbertray tune`` trial: the recipe with the trial's settings, where it writes, and the
row the search report shows for it."""

from __future__ import annotations

from dataclasses import dataclass

from sbertray import storage
from sbertray.config import TrainConfig, parse_config

TRIALS_DIR = "trials"  # under the search's output: each trial's model and checkpoints


@dataclass(frozen=True)
class Trial:
    """One trial as the report shows it."""

    trial_id: str
    params: dict
    score: float | None  # the best dev `metric` it reached (the epoch its model keeps)
    history: list[tuple[float, float]]  # (epoch, metric) after each epoch
    epochs: float  # epochs it ran
    status: str  # done | stopped early | failed
    model_url: str | None  # its model, once written


@dataclass(frozen=True)
class TuneResult:
    output_url: str
    metric: str
    trials: list[Trial]
    best: Trial
    best_recipe_url: str
    best_model_url: str
    wall_time_s: float


def tune_output(config: TrainConfig) -> str:
    assert config.tune is not None
    return config.tune.output or f"{config.output.model.rstrip('/')}-tune"


def trial_cpus(config: TrainConfig, cluster_cpus: float) -> float:
    """CPUs per worker of a trial: the recipe's, else an even share of the cluster among the
    trials that run at once, so ``concurrency`` trials fit side by side."""
    if config.scaling.cpus_per_worker is not None:
        return config.scaling.cpus_per_worker
    workers = config.tune.concurrency * config.scaling.num_workers
    return max(1.0, float(int(cluster_cpus // workers)))


def _trial_training(config: TrainConfig, params: dict) -> dict:
    """The recipe's ``training`` block with a trial's settings, evaluated every epoch and keeping
    the epoch best on the search's metric."""
    training = config.training.model_dump()
    for key, value in params.items():
        if key == "matryoshka":
            if not value:
                training.update(
                    matryoshka_dims=None, matryoshka_weights=None, matryoshka_rotation=None
                )
        else:
            training[key] = value
    training.update(
        eval_every="epoch",
        select_best=True,
        select_metric=config.tune.metric,
        checkpoint_steps=None,
    )
    return training


def trial_config(config: TrainConfig, params: dict, trial_url: str, cpus: float) -> TrainConfig:
    """The recipe with a trial's settings (``_trial_training``), its model and checkpoints in
    ``trial_url``, each worker with ``cpus``."""
    data = config.model_dump(exclude={"tune"})
    data["training"] = _trial_training(config, params)
    data["output"] = {
        "model": storage.join(trial_url, "model"),
        "checkpoints": storage.join(trial_url, "checkpoints"),
        "run_name": "trial",
    }
    data["scaling"]["cpus_per_worker"] = cpus
    return parse_config(TrainConfig, data, source="tune trial")


def best_recipe(config: TrainConfig, params: dict) -> TrainConfig:
    """The recipe with the best trial's settings and the recipe's own outputs, no search."""
    data = config.model_dump(exclude={"tune"})
    data["training"] = _trial_training(config, params)
    return parse_config(TrainConfig, data, source="best recipe")


def format_value(value) -> str:
    """A setting as the console and the report show it: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def describe(params: dict) -> str:
    """``batch_size 32, learning_rate 4.2e-05``: a trial's settings in one line."""
    return ", ".join(f"{k} {format_value(v)}" for k, v in sorted(params.items()))
