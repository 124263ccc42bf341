"""Fine-tuning on sentence pairs across Ray Train workers (the loss: ``loss.py``).

The driver validates the data and the base model first (so bad input fails before any worker
starts; the training set is written as shards on the way, ``prepare.py``), then runs a
``TorchTrainer`` whose workers each drive sentence-transformers' own trainer over their stream
of the shards (``stream.py``).
Ray Train owns the process group and checkpoint storage; sentence-transformers/transformers own
the optimizer, schedule, sharded sampling and the model card.

``batch_size`` is the global batch per optimizer step: with N workers each takes batch_size/N, so a
recipe gives the same number of steps (and comparable metrics) on 1 or 4 workers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from sbertray import output_paths, storage
from sbertray.config import ConfigError, TrainConfig
from sbertray.modeling import load_model, model_hash, resolve_model_path
from sbertray.ray_runtime import (
    in_local_ray_without_dashboard,
    init_ray,
    node_type_cpus,
    ray_train_settings,
    spans_many_nodes,
)
from sbertray.report import plural, write_train_report
from sbertray.train.card import add_run_to_card
from sbertray.train.checkpoints import run_fingerprint, table_hash
from sbertray.train.data import PairData, RowCounts, load_pairs, skipped_text
from sbertray.train.prepare import PreparedPairs, prepare_pairs, validates_on_ray
from sbertray.train.sources import list_sources
from sbertray.train.worker import (
    LOOP_RESULT_FILE,
    LoopResult,
    WorkerJob,
    run_base,
    run_name,
    train_worker,
)

RESULT_FILE = "train_result.json"


@dataclass
class TrainResult(LoopResult):
    """What a finished run reports (also written as ``train_result.json`` beside the model): the
    training loop's ``LoopResult`` and the run-level facts the driver owns."""

    name: str
    model_url: str
    base_model: str
    skipped_rows: int
    num_workers: int
    wall_time_s: float
    fingerprint: str  # ``checkpoints.run_fingerprint``: a rerun of this run keeps the model
    kept: bool = False  # this call found the model already trained by this run and kept it


def worker_cpus(config: TrainConfig) -> float:
    """CPUs per worker: the recipe's value, else an even share of the cluster's CPUs, at most
    one node's worth (a worker runs on one node), so a single worker uses every core of its
    node (torch's intra-op threads follow this number). On a cold cluster: the CPUs of the
    largest node type the autoscaler can add."""
    if config.scaling.cpus_per_worker is not None:
        return config.scaling.cpus_per_worker
    import ray

    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    largest = max([*nodes, *node_type_cpus()], default=1.0)
    total, workers = sum(nodes), config.scaling.world_size
    share = total // workers if total >= workers else largest
    return max(1.0, float(int(min(share, largest))))


@dataclass(frozen=True)
class TrainingPlan:
    """A recipe checked before any worker starts."""

    config: TrainConfig  # local paths made absolute (workers run in other directories)
    train: PreparedPairs  # shards under ``prepared_url`` (none in a dry run)
    dev: PairData | None
    fingerprint: str  # ``checkpoints.run_fingerprint``: which checkpoints are this run's

    def describe(self) -> str:
        t, rows = self.config.training, self.train.rows
        dropped = rows % t.batch_size
        left_out = (
            f"; the last {dropped} rows of each epoch's shuffle fill no whole batch and are "
            "not trained on"
            if dropped and not t.max_steps
            else ""
        )
        workers = self.config.scaling.num_workers
        return (
            f"training {plural(rows, 'pair')}: {plural(self.steps, 'step')} of global batch "
            f"{t.batch_size} "
            + (f"on {workers} worker(s)" if workers else "in this process (Ray Train local mode)")
            + left_out
        )

    @property
    def steps(self) -> int:
        """Optimizer steps: DDP drops the incomplete last batch, so an epoch is
        floor(rows / global batch) steps on any number of workers."""
        t = self.config.training
        return t.max_steps or int(t.epochs * (self.train.rows // t.batch_size))


def prepared_url(config: TrainConfig) -> str:
    """Where the run's validated training shards go: beside the checkpoints (shared storage on
    a cluster), named for the run but not its fingerprint, which is known only after them."""
    return storage.join(config.output.checkpoint_root, "_prepared", run_base(config))


def plan_training(
    config: TrainConfig, *, ray_address: str | None = None, write_data: bool = True
) -> TrainingPlan:
    """Validates the data (writing the training shards unless ``write_data`` is false),
    resolves the base model and checks that the outputs are writable. Starts Ray first when
    the training set is large enough to be validated by Ray tasks.

    Raises:
        DataError: bad training/dev data.
        ModelError: the base model cannot be found.
        ConfigError: Matryoshka dimensions the base model does not have.
        StorageError: an output location is not writable.
    """
    config = config.model_copy(deep=True)
    config.output.model = storage.absolute(config.output.model)
    config.output.checkpoints = storage.absolute(config.output.checkpoint_root)
    outputs = {"output.model": config.output.model, "output.checkpoints": config.output.checkpoints}
    output_paths.check_lasting(outputs)
    if os.path.exists(config.base_model):
        config.base_model = storage.absolute(config.base_model)
    dev_pairs = load_pairs(config.dev, config.storage) if config.dev else None
    base_path = resolve_model_path(config.base_model, config.storage)
    base_model_hash = model_hash(base_path)
    _check_matryoshka_dims(config, base_path)
    for url in outputs.values():
        storage.check_writable(storage.resolve(url, config.storage))
    sources = list_sources(config.train, config.storage)
    use_ray = validates_on_ray(config.train, sources)
    if use_ray:
        _connect(config, ray_address)
    train_pairs = prepare_pairs(
        config.train,
        config.storage,
        prepared_url(config) if write_data else None,
        sample_rows=max(config.training.batch_size, 1000),
        sources=sources,
        use_ray=use_ray,
    )
    data = [train_pairs.digest, table_hash(dev_pairs.table) if dev_pairs else None]
    fingerprint = run_fingerprint(config, data, base_model_hash)
    return TrainingPlan(config, train_pairs, dev_pairs, fingerprint)


def _check_matryoshka_dims(config: TrainConfig, base_path: str) -> None:
    dims = config.training.matryoshka_dims
    if not dims:
        return
    width = load_model(base_path, device="cpu").get_embedding_dimension()
    if dims[0] > width:
        raise ConfigError(
            f"`training.matryoshka_dims` {dims}: the base model's vectors have {width} "
            "dimensions, so the largest can be at most that"
        )


def train(
    config: TrainConfig,
    *,
    ray_address: str | None = None,
    restart: bool = False,
    callbacks: tuple = (),
) -> TrainResult:
    """Runs the recipe on Ray Train and writes the model (with its card) to ``output.model``.

    Training is incremental like embedding: a rerun whose model was already written by this
    recipe, data and base model keeps it and returns its result; rerunning after a crash
    resumes from the last complete checkpoint in ``output.checkpoints`` (the global step
    continues); a rerun with another config, data or base model starts over (see
    ``checkpoints.py``). ``restart`` trains from step 0 whatever was there. The run's
    checkpoints are deleted once the model is written unless ``output.keep_checkpoints``.
    ``callbacks``: Ray Train callbacks of the run (``sbertray tune`` passes Tune's reporter).

    Raises what ``plan_training`` raises, before any worker starts.
    """
    started = time.time()
    plan = plan_training(config, ray_address=ray_address)
    config = plan.config
    if not restart and (finished := finished_result(plan)) is not None:
        _delete_prepared(config)
        print(
            f"[sbertray] {finished.model_url} was trained with this recipe, data and base model "
            f"({finished.global_step} steps): keeping it (--restart trains it again)",
            flush=True,
        )
        return finished
    _report_skips("train", plan.train)
    if plan.dev is not None:
        _report_skips("dev", plan.dev)
    print(f"[sbertray] {plan.describe()}", flush=True)

    many_nodes = _connect(config, ray_address)
    ckpt_loc = storage.resolve(config.output.checkpoint_root, config.storage)
    if restart:
        storage.delete(ckpt_loc.child(run_name(config, plan.fingerprint)))
    with ray_train_settings(many_nodes):
        _trainer(plan, ckpt_loc, callbacks).fit()
    result = _finish(plan, started)
    _delete_prepared(config)
    if not config.output.keep_checkpoints:
        _delete_and_prune(ckpt_loc, run_name(config, plan.fingerprint))
    return result


def _connect(config: TrainConfig, ray_address: str | None) -> bool:
    """Starts (or joins) Ray; on many nodes, checks that the outputs are on shared storage
    (every worker reads the prepared shards beside the checkpoints). True on many nodes."""
    init_ray(ray_address)
    many_nodes = spans_many_nodes()
    if many_nodes:
        outputs = {
            "output.model": config.output.model,
            "output.checkpoints": config.output.checkpoint_root,
        }
        output_paths.check_shared(outputs, config.storage)
    return many_nodes


def _delete_prepared(config: TrainConfig) -> None:
    """The run's training shards, then the ``_prepared`` folder if that left it empty."""
    parent = storage.join(config.output.checkpoint_root, "_prepared")
    _delete_and_prune(storage.resolve(parent, config.storage), run_base(config))


def finished_result(plan: TrainingPlan) -> TrainResult | None:
    """The result of the model at ``output.model`` if this very run (same fingerprint) wrote
    it, else None."""
    loc = storage.resolve(plan.config.output.model, plan.config.storage).child(RESULT_FILE)
    if not storage.exists(loc):
        return None
    written = json.loads(storage.read_bytes(loc))
    if written.get("fingerprint") != plan.fingerprint:
        return None
    return TrainResult(**{**written, "kept": True})


def _trainer(plan: TrainingPlan, ckpt_loc: storage.Location, callbacks: tuple = ()):
    """A ``TorchTrainer`` whose workers each run ``train_worker`` on the plan's ``WorkerJob``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    config = plan.config
    cpus = worker_cpus(config)
    job = WorkerJob(
        config=config,
        train=plan.train,
        dev=plan.dev.table if plan.dev is not None else None,
        cpus_per_worker=cpus,
        fingerprint=plan.fingerprint,
        verbose=logging.getLogger().isEnabledFor(logging.DEBUG),
    )
    return _torch_trainer_class()(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=0)
        if config.scaling.in_driver
        else ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name(config, plan.fingerprint),
            storage_path=ckpt_loc.path,
            storage_filesystem=ckpt_loc.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.training.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            callbacks=list(callbacks),
        ),
    )


def _torch_trainer_class() -> type:
    """``TorchTrainer`` without the callbacks that start an actor for nothing, each a process
    and ~2.5 CPU-s per run (measured here on a run of ~35 CPU-s):
    - the Ray Datasets callback when the run has no Ray Datasets: the workers stream their
      shards themselves (``stream.py``), yet Ray Train (2.60) starts a ``DatasetManager``;
    - the placement-group cleaner on sbertray's own local Ray without a dashboard, where it
      cannot reach the State API it asks and that Ray ends with the driver anyway.
    A Ray Train without that hook keeps its own callbacks."""
    from ray.train.torch import TorchTrainer

    class StreamingTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            dropped = set() if self.datasets else {"DatasetsCallback"}
            if in_local_ray_without_dashboard():
                dropped.add("PlacementGroupCleanerCallback")
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if type(c).__name__ not in dropped]

    return StreamingTorchTrainer


def _finish(plan: TrainingPlan, started: float) -> TrainResult:
    """The run's ``TrainResult`` from rank 0's ``LoopResult`` (uploaded beside the model) and
    the driver's own facts, written as ``train_result.json``, to the card and the report."""
    config = plan.config
    model_loc = storage.resolve(config.output.model, config.storage)
    loop_loc = model_loc.child(LOOP_RESULT_FILE)
    loop = LoopResult(**json.loads(storage.read_bytes(loop_loc)))
    result = TrainResult(
        name=config.name,
        model_url=storage.redact(config.output.model),
        base_model=storage.redact(config.base_model),
        skipped_rows=plan.train.num_skipped,
        num_workers=config.scaling.num_workers,
        wall_time_s=round(time.time() - started, 1),
        fingerprint=plan.fingerprint,
        **asdict(loop),
    )
    summary = {k: v for k, v in asdict(result).items() if k != "kept"}
    storage.write_bytes(model_loc.child(RESULT_FILE), json.dumps(summary, indent=2).encode())
    storage.delete(loop_loc)
    add_run_to_card(model_loc, summary)
    write_train_report(config.output.model, summary, config.storage)
    return result


def _delete_and_prune(root: storage.Location, name: str) -> None:
    """Deletes ``name`` under ``root`` (a run's checkpoints, its prepared shards), then
    ``root`` if that left it empty (other runs' folders stay)."""
    storage.delete(root.child(name))
    if root.is_local and os.path.isdir(root.path) and not os.listdir(root.path):
        os.rmdir(root.path)


def _report_skips(kind: str, pairs: RowCounts) -> None:
    if pairs.num_skipped:
        print(f"[sbertray] {kind}: skipped {skipped_text(pairs)}", flush=True)
    for reason, n in pairs.kept.items():
        print(f"[sbertray] {kind}: kept {n} rows with {reason} (as configured)", flush=True)
