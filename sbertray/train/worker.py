"""The Ray Train worker loop: each worker drives sentence-transformers' own trainer with the
recipe's loss (``loss``: a pair's two sides in one forward) over its stream of the prepared
pairs (``stream``); Ray Train owns the process group and checkpoint storage."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sbertray import storage
from sbertray.config import TrainConfig
from sbertray.train.arguments import training_arguments
from sbertray.train.callback import report_callback
from sbertray.train.card import card_base_model
from sbertray.train.checkpoints import CheckpointStore
from sbertray.train.data import PairData
from sbertray.train.evaluation import metric_scores
from sbertray.train.prepare import PreparedPairs

if TYPE_CHECKING:
    import pyarrow as pa

LOOP_RESULT_FILE = "loop_result.json"  # rank 0's part, beside the model until the driver reads it


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker gets: the validated recipe and data, as typed objects."""

    config: TrainConfig  # local paths made absolute by the driver's plan
    train: PreparedPairs  # the shards' addresses and counts, not the rows
    dev: pa.Table | None  # validated pairs: sentence_0, sentence_1, label
    cpus_per_worker: float
    fingerprint: str  # ``checkpoints.run_fingerprint``: which checkpoints are this run's
    verbose: bool


@dataclass
class LoopResult:
    """What the training loop itself knows of a finished run (rank 0 writes it; the driver adds
    the run-level facts in ``run.TrainResult``)."""

    global_step: int
    resumed_from_step: int
    epochs: float
    train_rows: int
    dev_metrics: dict | None
    loss_log: list[dict]  # {step, epoch, loss} every `logging_steps`
    eval_log: list[dict]  # dev metrics after each epoch
    rotation: dict | None  # the Matryoshka rotation's fit (``rotation.py``), where there is one


def run_base(config: TrainConfig) -> str:
    """``output.run_name``, else the recipe's name and a hash of its output."""
    if config.output.run_name:
        return config.output.run_name
    digest = hashlib.sha256(storage.redact(config.output.model).encode()).hexdigest()[:8]
    return f"{config.name}-{digest}"


def run_name(config: TrainConfig, fingerprint: str) -> str:
    """Ray Train's run name: ``run_base`` plus the run fingerprint, so a rerun of the same
    recipe finds its own checkpoints and a changed one starts a run of its own instead of
    resuming (or evicting) another's."""
    return f"{run_base(config)}-{fingerprint[:8]}"


def _freeze_unused_pooler(model) -> None:
    """BERT-style models carry a pooler head that mean pooling never reads. DDP fails on
    parameters that get no gradient; freezing them is cheaper than `find_unused_parameters`
    (an extra graph walk every step) and leaves the weights exactly as plain training would."""
    auto_model = getattr(model[0], "auto_model", None)
    pooler = getattr(auto_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


def _quiet_worker_logs() -> None:
    """Ray starts workers logging at INFO, so every library's notes reach the driver's
    console (checkpoint saves, Ray Train's per-report lines). sbertray prints the progress
    that matters; `sbertray -v` brings the rest back."""
    import warnings

    logging.getLogger().setLevel(logging.WARNING)
    for name in ("ray.train", "sentence_transformers", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # accelerate's own call into DDP, not ours; the fix is in accelerate.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")


def use_eager_attention(model) -> None:
    """For bf16 autocast training on CPU. PyTorch's SDPA flash-attention backward in bf16 on CPU
    was measured many times slower than the fp32 one (torch 2.13), which made a bf16 step slower
    than fp32; eager attention runs its matmuls on AMX like the rest (docs/benchmarks.md has the
    figures). Inference keeps SDPA: the saved model does not record the choice."""
    model[0].auto_model.set_attn_implementation("eager")


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: ``loop_config["job"]`` is the run's ``WorkerJob``."""
    import ray.train

    job: WorkerJob = loop_config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not job.config.scaling.in_driver:  # the driver's threads, logs and env stay its own
        _set_up_process(job)
    model = _load_base_model(job.config)
    dev = _dev_evaluator(job, model.get_embedding_dimension())
    name = run_name(job.config, job.fingerprint)
    local_root = storage.scratch_root() / name
    local_root.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(
        storage.resolve(job.config.output.checkpoint_root, job.config.storage), name
    )
    resume_dir = local_root / f"resume-rank{rank}"
    resume_path, resumed_from = _restore(store, resume_dir, rank)
    if world == 1 and not job.config.scaling.use_gpu:
        # accelerate wraps every CPU run that has LOCAL_RANK set (Ray Train sets it) in DDP,
        # even a single process, whose gradients then go through gloo for nothing (5-10% of a
        # step on a 2-core machine). One worker trains as the plain trainer does.
        os.environ.pop("LOCAL_RANK", None)
    stream = _stream(job, world, rank, resumed_from)
    trainer = _trainer(job, model, dev, local_root, stream, rank, store)
    trainer.train(resume_from_checkpoint=resume_path)
    rotation = _rotate(job, model) if rank == 0 and job.config.training.rotates else None
    dev_metrics = _final_dev_score(model, trainer, dev, rotation) if rank == 0 else None
    if rank == 0:
        _card_counts_every_row(model.model_card_data, job.train.rows)
        outcome = _loop_result(trainer, resumed_from, stream, dev_metrics, rotation)
        _save_model(job.config, model, outcome, local_root / "model")
    # With the kept model's dev scores: a Tune trial's every report carries its metric (Ray
    # Train keeps rank 0's metrics; the other ranks need not score the model again).
    scores = metric_scores(dev_metrics) if dev_metrics else {}
    ray.train.report(
        {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch, **scores}
    )
    # Done: every checkpoint and the model are in storage; a failed run keeps its scratch.
    shutil.rmtree(resume_dir, ignore_errors=True)
    if rank == 0:
        shutil.rmtree(local_root, ignore_errors=True)


def _set_up_process(job: WorkerJob) -> None:
    import torch

    if not job.config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub mid-run
    if not job.verbose:
        _quiet_worker_logs()


def _load_base_model(config: TrainConfig):
    """The base model with the recipe's architecture choices and a card that names it."""
    import ray.train

    from sbertray.modeling import load_model

    model = load_model(
        config.base_model,
        storage_config=config.storage,
        device=str(ray.train.torch.get_device()),
        max_seq_length=config.training.max_seq_length,
        normalize=config.training.normalize,
    )
    _freeze_unused_pooler(model)
    if config.training.precision == "bf16" and not config.scaling.use_gpu:
        use_eager_attention(model)
    card = model.model_card_data
    card.local_files_only = True
    card.base_model = card_base_model(config.base_model)
    card.model_name = (
        f"{config.name} (sbertray, fine-tuned from {card.base_model or config.base_model})"
    )
    if config.train.name:
        card.train_datasets = [{"name": config.train.name}]
    return model


def _dev_evaluator(job: WorkerJob, width: int):
    """The dev set's evaluator; a Matryoshka recipe also scores each trained width below the
    model's own."""
    from sbertray.train.evaluation import build_evaluator

    if job.dev is None:
        return None
    training = job.config.training
    return build_evaluator(
        PairData(table=job.dev, files=[]),
        job.config.dev.name or "dev",
        retrieval_threshold=training.retrieval_threshold,
        truncate_dims=tuple(d for d in training.matryoshka_dims or () if d < width),
    )


def _restore(store: CheckpointStore, resume_dir: Path, rank: int) -> tuple[str | None, int]:
    """The newest complete checkpoint of this run, copied into ``resume_dir``, and its step."""
    shutil.rmtree(resume_dir, ignore_errors=True)
    resume_path, resumed_from = store.restore(resume_dir)
    if rank == 0 and resume_path is None and (others := store.other_runs()):
        print(
            f"[sbertray] the checkpoints in {storage.redact(store.parent.url)} are from runs "
            f"with another config, data or base model ({', '.join(others)}): training from "
            "step 0",
            flush=True,
        )
    if rank == 0 and resume_path:
        print(f"[sbertray] resuming from checkpoint at step {resumed_from}", flush=True)
    return resume_path, resumed_from


def _stream(job: WorkerJob, world: int, rank: int, resumed_from: int):
    from sbertray.train.stream import PairStream

    return PairStream(
        job.train.shards,
        job.config.storage,
        global_batch=job.config.training.batch_size,
        world=world,
        rank=rank,
        seed=job.config.training.seed,
        start_step=resumed_from,
    )


def _trainer(job: WorkerJob, model, dev, local_root, stream, rank, store):
    """sentence-transformers' trainer over this worker's stream, reporting to Ray Train. Its
    ``train_dataset`` is the sample: what the model card describes (sizes are set to the whole
    set's after training); the batches come from the stream."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    from sbertray.train.loss import build_loss
    from sbertray.train.stream import StreamingTrainer

    trainer = StreamingTrainer(
        stream,
        model=model,
        args=training_arguments(
            job.config,
            str(local_root / "hf"),
            stream.world,
            dev.name if dev is not None else None,
        ),
        train_dataset=datasets.Dataset(job.train.sample),
        loss=build_loss(model, job.config.training),
        evaluator=dev.evaluator if dev is not None else None,
        callbacks=[report_callback(rank, store, dev, keep_in_driver=_keep_in_driver(job))],
    )
    # Our callback prints one progress line on rank 0; drop transformers' raw dict printer.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _keep_in_driver(job: WorkerJob) -> int | None:
    """How many checkpoints a run in the driver's process keeps (it stores them itself)."""
    return job.config.training.keep_checkpoints if job.config.scaling.in_driver else None


def _rotate(job: WorkerJob, model) -> dict:
    from sbertray.train.rotation import rotate

    return rotate(model, job.train.shards, job.config.storage, job.config.training)


def _final_dev_score(model, trainer, dev, rotation: dict | None) -> dict | None:
    """The final dev score, also set as the model card's evaluation table. The trainer's own
    evaluation of the model in hand (the last epoch's, or the best epoch it loaded back) is
    reused: scoring it again took a whole dev pass more per run. A rotated model is scored
    again: its truncated vectors changed."""
    if dev is None:
        return None
    logged = None if rotation else _logged_dev_results(trainer, dev.name)
    results = logged or dev.evaluator(model)
    model.model_card_data.set_evaluation_metrics(
        dev.evaluator, results, epoch=trainer.state.epoch, step=trainer.state.global_step
    )
    return dev.metrics(results).as_dict()


def _logged_dev_results(trainer, dev_name: str) -> dict | None:
    """The evaluator's results logged at the step of the weights the model now holds (the best
    epoch's with ``select_best``), or None where that step was never evaluated (a run cut off
    mid-epoch by ``max_steps``, ``eval_every: end``). Step 0's scores are the base model's."""
    state = trainer.state
    step = state.global_step
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        step = int(state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[1])
    if not step:
        return None
    prefix = f"eval_{dev_name}"
    for entry in reversed(state.log_history):
        if entry.get("step") == step and any(k.startswith(prefix) for k in entry):
            return {k[len("eval_") :]: v for k, v in entry.items() if k.startswith(prefix)}
    return None


def _card_counts_every_row(card, rows: int) -> None:
    """The card's dataset statistics come from the sample the trainer was given; its size and
    size tag are the whole training set's."""
    for dataset in card.train_datasets:
        if "size" in dataset:
            dataset["size"] = rows
    card.tags = [t for t in card.tags or [] if not t.startswith("dataset_size:")]
    card.add_tags(f"dataset_size:{rows}")


def _loop_result(trainer, resumed_from: int, stream, dev_metrics, rotation) -> LoopResult:
    history = trainer.state.log_history
    step = trainer.state.global_step
    return LoopResult(
        global_step=step,
        resumed_from_step=resumed_from,
        # From the step, not the trainer's state: a resumed epoch's count starts at its first
        # batch there, since the stream (not the trainer) skips the steps already trained.
        epochs=round(step / stream.steps_per_epoch, 4),
        train_rows=stream.rows,
        dev_metrics=dev_metrics,
        loss_log=[
            {"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"]}
            for e in history
            if "loss" in e
        ],
        eval_log=[
            {
                "step": e["step"],
                "epoch": e.get("epoch"),
                **{k[len("eval_") :]: v for k, v in e.items() if k.startswith("eval_")},
            }
            for e in history
            if any(k.endswith("_spearman_cosine") for k in e)
        ],
        rotation=rotation,
    )


def _save_model(config: TrainConfig, model, outcome: LoopResult, out_dir: Path) -> None:
    """Saves the model with the loop's result beside it and uploads both to ``output.model``."""
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save(str(out_dir))
    (out_dir / LOOP_RESULT_FILE).write_text(json.dumps(asdict(outcome), indent=2))
    storage.upload_dir(out_dir, storage.resolve(config.output.model, config.storage))
