"""Fine-tuning with CosineSimilarityLoss across Ray Train workers.

The driver validates the data and the base model first (so bad input fails before any worker
starts), then runs a ``TorchTrainer`` whose workers each drive sentence-transformers' own trainer.
Ray Train owns the process group and checkpoint storage; sentence-transformers/transformers own
the optimizer, schedule, sharded sampling and the model card.

``batch_size`` is the global batch per optimizer step: with N workers each takes batch_size/N, so a
recipe gives the same number of steps (and comparable metrics) on 1 or 4 workers.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sbertray import storage
from sbertray.config import DEFAULT_BASE_MODEL, TrainConfig
from sbertray.data import PairData, load_pairs
from sbertray.modeling import bundled_model_path, resolve_model_path
from sbertray.ray_runtime import init_ray
from sbertray.report import write_train_report

logger = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"


@dataclass
class TrainResult:
    """What a finished run reports (also written as ``train_result.json`` beside the model)."""

    name: str
    model_url: str
    base_model: str
    global_step: int
    resumed_from_step: int
    epochs: float
    train_rows: int
    skipped_rows: int
    num_workers: int
    wall_time_s: float
    dev_metrics: dict | None
    loss_log: list[dict]  # {step, epoch, loss} every `logging_steps`
    eval_log: list[dict]  # dev metrics after each epoch


def _worker_cpus(config: TrainConfig) -> float:
    """CPUs per worker: the recipe's value, else an even share of the cluster so a single worker
    uses every core (torch's intra-op threads follow this number)."""
    if config.scaling.cpus_per_worker is not None:
        return config.scaling.cpus_per_worker
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    return max(1.0, float(int(total // config.scaling.num_workers)))


def _run_name(config: TrainConfig) -> str:
    if config.output.run_name:
        return config.output.run_name
    import hashlib

    digest = hashlib.sha256(storage.redact(config.output.model).encode()).hexdigest()[:8]
    return f"{config.name}-{digest}"


def _model_card_base(name: str) -> str | None:
    if name == DEFAULT_BASE_MODEL or resolve_model_path(name) == bundled_model_path():
        return DEFAULT_BASE_MODEL
    return name if not storage.is_url(name) and not os.path.exists(name) else None


def train(config: TrainConfig, *, ray_address: str | None = None) -> TrainResult:
    """Runs the recipe on Ray Train and writes the model (with its card) to ``output.model``.

    Rerunning the same recipe after a crash resumes from the last checkpoint in
    ``output.checkpoints`` (the global step continues).

    Raises:
        DataError: bad training/dev data (before any worker starts).
        ModelError: the base model cannot be found.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    config = config.model_copy(deep=True)
    config.output.model = storage.absolute(config.output.model)
    config.output.checkpoints = storage.absolute(config.output.checkpoint_root)
    if os.path.exists(config.base_model):
        config.base_model = storage.absolute(config.base_model)
    train_pairs = load_pairs(config.train, config.storage)
    dev_pairs = load_pairs(config.dev, config.storage) if config.dev else None
    resolve_model_path(config.base_model, config.storage)  # fail now, not inside a worker
    _report_skips("train", train_pairs)
    if dev_pairs is not None:
        _report_skips("dev", dev_pairs)

    init_ray(ray_address)
    ckpt_loc = storage.resolve(config.output.checkpoint_root, config.storage)
    cpus = _worker_cpus(config)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config.model_dump(),
            "train": train_pairs.table,
            "dev": dev_pairs.table if dev_pairs is not None else None,
            "cpus_per_worker": cpus,
        },
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=_run_name(config),
            storage_path=ckpt_loc.path,
            storage_filesystem=ckpt_loc.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.training.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
        ),
    )
    trainer.fit()
    # Rank 0 wrote the run summary beside the model; the driver adds its own wall time.
    result_loc = storage.resolve(config.output.model, config.storage).child(RESULT_FILE)
    summary = json.loads(storage.read_bytes(result_loc))
    summary["wall_time_s"] = round(time.time() - started, 1)
    summary["skipped_rows"] = train_pairs.num_skipped
    storage.write_bytes(result_loc, json.dumps(summary, indent=2).encode())
    add_run_to_card(storage.resolve(config.output.model, config.storage), summary)
    write_train_report(config.output.model, summary, config.storage)
    return TrainResult(**summary)


def add_run_to_card(model: storage.Location, summary: dict, command: str | None = None) -> None:
    """Adds how this model was produced (command, workers, wall time, dev score) to its card,
    just before sentence-transformers' "Framework Versions" section."""
    card_loc = model.child("README.md")
    card = storage.read_bytes(card_loc).decode()
    dev = summary.get("dev_metrics")
    lines = [
        "### Trained with sbertray",
        f"- Command: `{command or shlex.join(['sbertray', *sys.argv[1:]])}`",
        f"- Ray Train workers: {summary['num_workers']}; steps: {summary['global_step']}"
        + (
            f" (resumed from step {summary['resumed_from_step']})"
            if summary["resumed_from_step"]
            else ""
        ),
        f"- Wall time: {summary['wall_time_s']:.0f} s",
    ]
    if dev:
        lines.append(
            f"- {dev['dataset']}: Spearman {dev['spearman_cosine']:.4f}, Pearson {dev['pearson_cosine']:.4f}"
        )
    block = "\n".join(lines) + "\n\n"
    marker = "### Framework Versions"
    card = card.replace(marker, block + marker, 1) if marker in card else card + "\n" + block
    storage.write_bytes(card_loc, card.encode())


def _report_skips(kind: str, pairs: PairData) -> None:
    if pairs.num_skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in pairs.skipped.most_common())
        print(f"[sbertray] {kind}: skipped {pairs.num_skipped} bad rows ({reasons})", flush=True)


# ---------------------------------------------------------------------------------------------
# Worker side


def _make_report_callback(rank: int):
    """A transformers callback that hands each saved checkpoint to Ray Train (rank 0's copy: it
    holds the model, optimizer, scheduler and trainer state) and prints progress on rank 0."""
    import ray.train
    from transformers import TrainerCallback

    class _RayTrainReport(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if rank == 0 and logs and "loss" in logs:
                print(
                    f"[sbertray] step {state.global_step}/{state.max_steps} "
                    f"epoch {state.epoch:.2f} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0):.2e}",
                    flush=True,
                )

        def on_save(self, args, state, control, **kwargs):
            ckpt_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint = None
            if rank == 0 and ckpt_dir.is_dir():
                checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
            ray.train.report(
                {"global_step": state.global_step, "epoch": state.epoch},
                checkpoint=checkpoint,
                checkpoint_dir_name=f"checkpoint-{state.global_step:08d}",
            )

    return _RayTrainReport()


def _training_arguments(
    config: TrainConfig, output_dir: str, world_size: int, dev_name: str | None
):
    from sentence_transformers import SentenceTransformerTrainingArguments

    t = config.training
    per_device = t.batch_size // world_size
    return SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_ratio=t.warmup_ratio,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        fp16=t.precision == "fp16",
        bf16=t.precision == "bf16",
        logging_steps=t.logging_steps,
        eval_strategy="epoch" if dev_name and t.eval_every == "epoch" else "no",
        save_strategy="steps" if t.checkpoint_steps else "epoch",
        save_steps=t.checkpoint_steps or 500,
        save_total_limit=t.keep_checkpoints,
        load_best_model_at_end=t.select_best,
        metric_for_best_model=f"eval_{dev_name}_spearman_cosine" if t.select_best else None,
        greater_is_better=True if t.select_best else None,
        report_to="none",
        use_cpu=not config.scaling.use_gpu,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # rank 0 prints one line per logging step instead
    )


def _freeze_unused_pooler(model) -> None:
    """BERT-style models carry a pooler head that mean pooling never reads. DDP fails on
    parameters that get no gradient; freezing them is cheaper than `find_unused_parameters`
    (an extra graph walk every step) and leaves the weights exactly as plain training would."""
    auto_model = getattr(model[0], "auto_model", None)
    pooler = getattr(auto_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


def _restore_checkpoint(local_root: Path) -> tuple[str | None, int]:
    """Downloads Ray Train's latest checkpoint (if any) and returns (path, global step)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, 0
    target = local_root / "resume"
    shutil.rmtree(target, ignore_errors=True)
    checkpoint.to_directory(str(target))
    state = json.loads((target / "trainer_state.json").read_text())
    return str(target), int(state.get("global_step", 0))


def _train_worker(loop_config: dict) -> None:
    import datasets
    import ray.train
    import torch
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.losses import CosineSimilarityLoss
    from transformers.trainer_callback import PrinterCallback

    from sbertray.evaluate import SimilarityMetrics, build_evaluator
    from sbertray.modeling import load_model

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub mid-run

    model = load_model(
        config.base_model,
        storage_config=config.storage,
        device=str(ray.train.torch.get_device()),
        max_seq_length=config.training.max_seq_length,
        normalize=config.training.normalize,
    )
    _freeze_unused_pooler(model)
    card = model.model_card_data
    card.local_files_only = True
    card.base_model = _model_card_base(config.base_model)
    card.model_name = (
        f"{config.name} (sbertray, fine-tuned from {card.base_model or config.base_model})"
    )
    if config.train.name:
        card.train_datasets = [{"name": config.train.name}]

    train_ds = datasets.Dataset(loop_config["train"])
    dev_name = (config.dev.name if config.dev else None) or "dev"
    dev_table = loop_config["dev"]
    dev_pairs = PairData(table=dev_table, files=[]) if dev_table is not None else None
    evaluator = build_evaluator(dev_pairs, dev_name) if dev_pairs is not None else None

    local_root = Path(tempfile.gettempdir()) / "sbertray" / _run_name(config)
    local_root.mkdir(parents=True, exist_ok=True)
    resume_path, resumed_from = _restore_checkpoint(local_root)
    if rank == 0 and resume_path:
        print(f"[sbertray] resuming from checkpoint at step {resumed_from}", flush=True)

    trainer = SentenceTransformerTrainer(
        model=model,
        args=_training_arguments(
            config, str(local_root / "hf"), world, dev_name if evaluator is not None else None
        ),
        train_dataset=train_ds,
        loss=CosineSimilarityLoss(model),
        evaluator=evaluator,
        callbacks=[_make_report_callback(rank)],
    )
    # Our callback prints one progress line on rank 0; drop transformers' raw dict printer.
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume_path)

    dev_metrics = None
    if evaluator is not None:
        # Final score for the model card's evaluation table and the run's closing line.
        results = evaluator(model)
        card.set_evaluation_metrics(
            evaluator, results, epoch=trainer.state.epoch, step=trainer.state.global_step
        )
        dev_metrics = SimilarityMetrics.from_results(results, dev_name, len(dev_table)).as_dict()
    if rank == 0:
        out_dir = local_root / "model"
        shutil.rmtree(out_dir, ignore_errors=True)
        model.save(str(out_dir))
        summary = TrainResult(
            name=config.name,
            model_url=storage.redact(config.output.model),
            base_model=storage.redact(config.base_model),
            global_step=trainer.state.global_step,
            resumed_from_step=resumed_from,
            epochs=float(trainer.state.epoch or 0.0),
            train_rows=len(train_ds),
            skipped_rows=0,
            num_workers=world,
            wall_time_s=0.0,
            dev_metrics=dev_metrics,
            loss_log=[
                {"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"]}
                for e in trainer.state.log_history
                if "loss" in e
            ],
            eval_log=[
                {
                    "step": e["step"],
                    "epoch": e.get("epoch"),
                    **{k[len("eval_") :]: v for k, v in e.items() if k.startswith("eval_")},
                }
                for e in trainer.state.log_history
                if any(k.endswith("_spearman_cosine") for k in e)
            ],
        )
        (out_dir / RESULT_FILE).write_text(json.dumps(asdict(summary), indent=2))
        storage.upload_dir(out_dir, storage.resolve(config.output.model, config.storage))
    ray.train.report({"global_step": trainer.state.global_step})
