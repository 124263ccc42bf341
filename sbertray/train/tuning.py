"""``sbertray tune RECIPE.yaml``: Ray Tune searches the recipe's ``tune.search`` space.

Each trial is one ``train`` run (Ray Train, the recipe with the trial's settings) in its own
folder under ``<tune.output>/trials/``, evaluated on the dev set after every epoch and reported
to Tune through Ray Train's ``TuneReportCallback``; ASHA stops weak trials at epoch ends. A trial
keeps its best epoch (``select_best`` on ``tune.metric``), so the search compares models as they
were written. A rerun restores the search from ``<tune.output>/search`` (Tune's own experiment
state) and each unfinished trial resumes from its checkpoints; a finished one keeps its model.

Outputs (``tune_report.write_outputs``): the best recipe as YAML, the best model with its card, and a
report with a table and a plot of the trials.
"""

from __future__ import annotations

import json
import os
import time

from sbertray import storage
from sbertray.config import ConfigError, SearchSpace, TrainConfig, TuneSpec, stable_hash
from sbertray.progress import format_duration
from sbertray.train.evaluation import metric_scores
from sbertray.train.run import train
from sbertray.train.trials import (
    TRIALS_DIR,
    TuneResult,
    describe,
    trial_config,
    trial_cpus,
    tune_output,
)

SEARCH_DIR = "search"  # Tune's experiment (its state, the trials' results)
SEARCH_KEY_FILE = "search_key.json"  # which recipe and search the folder holds


def grid_size(search: SearchSpace) -> int | None:
    """The number of combinations when every key is a list of choices, else None (a range)."""
    size = 1
    for value in search.model_dump(exclude_none=True).values():
        if isinstance(value, dict):
            return None
        size *= len(value)
    return size


def is_grid(spec: TuneSpec) -> bool:
    """Lists of choices whose combinations number at most ``trials`` are searched as a grid,
    each combination once: random draws would repeat some and miss others."""
    grid = grid_size(spec.search)
    return grid is not None and grid <= spec.trials


def planned_trials(spec: TuneSpec) -> int:
    return grid_size(spec.search) if is_grid(spec) else spec.trials


def param_space(spec: TuneSpec) -> dict:
    """Tune's search space: a grid (``is_grid``), else a random draw of every key per trial."""
    from ray import tune

    space = {}
    for key, value in spec.search.model_dump(exclude_none=True).items():
        if isinstance(value, dict):
            sample = tune.loguniform if value["log"] else tune.uniform
            space[key] = sample(value["low"], value["high"])
        else:
            space[key] = tune.grid_search(value) if is_grid(spec) else tune.choice(value)
    return space


def _absolute_inputs(config: TrainConfig) -> TrainConfig:
    """Trials run in Tune's actors, in other working directories: every local path absolute."""
    config = config.model_copy(deep=True)
    config.train.path = storage.absolute(config.train.path)
    if config.dev is not None:
        config.dev.path = storage.absolute(config.dev.path)
    config.output.model = storage.absolute(config.output.model)
    if os.path.exists(config.base_model):
        config.base_model = storage.absolute(config.base_model)
    if config.tune.output:
        config.tune.output = storage.absolute(config.tune.output)
    return config


def _run_trial(params: dict, *, recipe: dict, output: str, cpus: float) -> None:
    """One trial, in a Tune actor: trains the recipe with ``params``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = TrainConfig.model_validate(recipe)
    trial_url = storage.join(output, TRIALS_DIR, tune.get_context().get_trial_id())
    result = train(trial_config(config, params, trial_url, cpus), callbacks=(TuneReportCallback(),))
    if result.kept and result.dev_metrics:  # written before the search was stopped: report it
        tune.report({"epoch": result.epochs, **metric_scores(result.dev_metrics)})


def _check_search_key(config: TrainConfig, output: storage.Location) -> None:
    """A search folder belongs to one recipe and search: a changed one must not restore it."""
    key = stable_hash({"recipe": config.model_dump(exclude={"output", "name"})})
    loc = output.child(SEARCH_KEY_FILE)
    if storage.exists(loc):
        if json.loads(storage.read_bytes(loc))["key"] != key:
            raise ConfigError(
                f"{storage.redact(output.url)} holds a search of another recipe or search "
                "space: set `tune.output` to a new folder, or delete that one to start over"
            )
        return
    storage.write_bytes(loc, json.dumps({"key": key}).encode())


def tune_recipe(config: TrainConfig, *, ray_address: str | None = None) -> TuneResult:
    """Runs (or resumes) the search and writes its outputs; see the module docstring.

    Raises:
        ConfigError: no ``tune`` block, or the output holds another search.
        DataError, ModelError, StorageError: as ``plan_training``, before any trial starts.
    """
    from sbertray.ray_runtime import init_ray
    from sbertray.train.run import plan_training
    from sbertray.train.tune_report import collect_trials, write_outputs

    if config.tune is None:
        raise ConfigError("the recipe has no `tune:` block: add one to search its settings")
    started = time.time()
    config = _absolute_inputs(config)
    spec, output_url = config.tune, tune_output(config)
    init_ray(ray_address, dashboard=True)  # before planning, which may start Ray without it
    plan_training(config, ray_address=ray_address, write_data=False)  # bad input fails here
    output = storage.resolve(output_url, config.storage)
    storage.check_writable(output)
    _check_search_key(config, output)
    grid = _tuner(config, output).fit()
    ended = grid.num_terminated + grid.num_errors
    if ended < planned_trials(spec):  # Tune saved its state and returned on Ctrl-C/SIGTERM
        # Not a count: Tune's result counts the trial it interrupted as ended too.
        print(
            f"[sbertray] the search stopped before its {planned_trials(spec)} trials ended; "
            "rerunning the command resumes it (the interrupted trial from its checkpoint)",
            flush=True,
        )
        raise KeyboardInterrupt
    trials = collect_trials(grid, config, output_url)
    result = write_outputs(config, trials, output_url, time.time() - started)
    print(
        f"[sbertray] search done in {format_duration(result.wall_time_s)}: best {spec.metric} "
        f"{result.best.score:.4f} ({describe(result.best.params)}); recipe "
        f"{result.best_recipe_url}, model {result.best_model_url}",
        flush=True,
    )
    return result


def _tuner(config: TrainConfig, output: storage.Location):
    """The search in ``output``: restored from Tune's state there, else a new one."""
    import ray
    from ray import tune

    cpus = trial_cpus(config, ray.cluster_resources().get("CPU", 1.0))
    trainable = tune.with_parameters(
        _run_trial, recipe=config.model_dump(), output=output.url, cpus=cpus
    )
    # The trial's own process only waits on its Ray Train run, whose workers hold the CPUs.
    # Tune refuses an all-zero request, so it asks for one byte of memory instead.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 1})
    search_loc = output.child(SEARCH_DIR)
    if not tune.Tuner.can_restore(search_loc.path, storage_filesystem=search_loc.fs):
        return _new_tuner(config, trainable, output, cpus)
    print(f"[sbertray] resuming the search in {storage.redact(output.url)}", flush=True)
    return tune.Tuner.restore(
        search_loc.path,
        trainable,
        resume_unfinished=True,
        resume_errored=True,
        storage_filesystem=search_loc.fs,
    )


def _new_tuner(config: TrainConfig, trainable, output: storage.Location, cpus: float):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from sbertray.train.tune_report import Progress

    spec = config.tune
    epochs = spec.search.epochs or [config.training.epochs]
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            # ASHA stops a trial that reaches max_t: one epoch past the last, so a trial's last
            # report does not kill it before its model is written.
            max_t=max(epochs) + 1,
            grace_period=spec.grace_epochs,
            reduction_factor=spec.reduction_factor,
        )
        if spec.early_stopping
        else FIFOScheduler()
    )
    trials = planned_trials(spec)
    print(
        f"[sbertray] searching {trials} trials, {spec.concurrency} at a time "
        f"({config.scaling.num_workers} worker(s) of {cpus:g} CPU each), on dev {spec.metric}",
        flush=True,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode="max",
            num_samples=1 if is_grid(spec) else spec.trials,
            scheduler=scheduler,
            # Tune's `max_concurrent_trials` does not reach a search algorithm passed in.
            search_alg=BasicVariantGenerator(
                random_state=spec.seed, max_concurrent=spec.concurrency
            ),
        ),
        run_config=tune.RunConfig(
            name=SEARCH_DIR,
            storage_path=output.path,
            storage_filesystem=output.fs,
            verbose=0,
            callbacks=[Progress(spec.metric, trials)],
        ),
    )


def dry_run(config: TrainConfig, *, ray_address: str | None = None) -> str:
    """The search's plan: what varies, how many trials, each trial's steps; writes nothing."""
    from sbertray.train.run import plan_training

    if config.tune is None:
        raise ConfigError("the recipe has no `tune:` block: add one to search its settings")
    config = _absolute_inputs(config)
    spec = config.tune
    plan = plan_training(config, ray_address=ray_address, write_data=False)
    rows = plan.train.rows
    batches = spec.search.batch_size or [config.training.batch_size]
    epochs = spec.search.epochs or [config.training.epochs]
    steps = sorted({int(e * (rows // b)) for b in batches for e in epochs})
    search_loc = storage.resolve(tune_output(config), config.storage).child(SEARCH_DIR)
    stopping = (
        f"ASHA stops weak trials after {spec.grace_epochs} epoch(s), keeping the best "
        f"1/{spec.reduction_factor} at each rung"
        if spec.early_stopping
        else "every trial runs to the end"
    )
    return "\n".join(
        [
            "[sbertray] dry run: nothing is written",
            f"  search: {planned_trials(spec)} trials"
            + (" (every combination once)" if is_grid(spec) else " (random draws)")
            + f", {spec.concurrency} at a time, maximizing dev "
            f"{spec.metric}; {stopping}",
            *[
                f"  {key}: {value}"
                for key, value in spec.search.model_dump(exclude_none=True).items()
            ],
            f"  each trial: {rows:,} training pairs, {steps[0]:,} to {steps[-1]:,} steps, "
            f"{config.scaling.num_workers} worker(s)",
            f"  output: {storage.redact(tune_output(config))} (best_recipe.yaml, best_model/, "
            "report.md)",
            "  resume: "
            + (
                "the search there is resumed"
                if storage.exists(search_loc)
                else "none, a new search"
            ),
        ]
    )
