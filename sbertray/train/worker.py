"""The Ray Train worker loop: each worker drives sentence-transformers' own trainer with
CosineSimilarityLoss (``loss``: a pair's two sides in one forward); Ray Train owns the process
group and checkpoint storage."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sbertray import storage
from sbertray.config import TrainConfig
from sbertray.progress import format_duration
from sbertray.train import checkpoints
from sbertray.train.card import card_base_model
from sbertray.train.checkpoints import CheckpointStore
from sbertray.train.data import PairData

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


def run_name(config: TrainConfig, fingerprint: str) -> str:
    """Ray Train's run name: the output's (or ``output.run_name``) plus the run fingerprint, so a
    rerun of the same recipe finds its own checkpoints and a changed one starts a run of its
    own instead of resuming (or evicting) another's."""
    if config.output.run_name:
        base = config.output.run_name
    else:
        digest = hashlib.sha256(storage.redact(config.output.model).encode()).hexdigest()[:8]
        base = f"{config.name}-{digest}"
    return f"{base}-{fingerprint[:8]}"


def _make_report_callback(rank: int, store: CheckpointStore, evaluator=None):
    """A transformers callback that hands each saved checkpoint to Ray Train (rank 0's copy: it
    holds the model, optimizer, scheduler and trainer state), marks it complete once uploaded,
    and prints progress on rank 0."""
    import ray.train
    from transformers import TrainerCallback

    class _RayTrainReport(TrainerCallback):
        def __init__(self):
            self.printed_step = -1  # the trainer may log one step more than once
            self.first = None  # (time, step) of this process's first logged step, for the ETA

        def on_log(self, args, state, control, logs=None, **kwargs):
            if (
                rank != 0
                or not logs
                or "loss" not in logs
                or state.global_step == self.printed_step
            ):
                return
            self.printed_step = state.global_step
            now = time.monotonic()
            self.first = self.first or (now, state.global_step)
            done = state.global_step - self.first[1]
            left = (
                (now - self.first[0]) / done * (state.max_steps - state.global_step)
                if done
                else None
            )
            print(
                f"[sbertray] step {state.global_step}/{state.max_steps} "
                f"epoch {state.epoch:.2f} loss {logs['loss']:.4f} "
                f"lr {logs.get('learning_rate', 0):.2e} ETA "
                + (format_duration(left) if left is not None else "?"),
                flush=True,
            )

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            """The base model's dev score as step 0 of the eval log, so the report shows the
            gain from the start (kept in the trainer state, so a resumed run has it too)."""
            if rank == 0 and evaluator is not None and state.global_step == 0 and model:
                scores = {f"eval_{k}": v for k, v in evaluator(model).items()}
                state.log_history.append({"step": 0, "epoch": 0.0, **scores})
                self.on_evaluate(args, state, control, metrics=scores)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            scores = {k: v for k, v in (metrics or {}).items() if k.endswith("spearman_cosine")}
            if rank == 0 and scores:
                shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in scores.items())
                print(f"[sbertray] step {state.global_step}: {shown}", flush=True)

        def on_save(self, args, state, control, **kwargs):
            ckpt_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint = None
            if rank == 0 and ckpt_dir.is_dir():
                checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
                store.unmark(state.global_step)
            ray.train.report(
                {"global_step": state.global_step, "epoch": state.epoch},
                checkpoint=checkpoint,
                checkpoint_dir_name=checkpoints.dir_name(state.global_step),
            )
            if checkpoint is not None:  # the upload is synchronous: the files are all there
                store.mark(state.global_step)

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
        # transformers 5 takes a ratio as a float `warmup_steps` (`warmup_ratio` is deprecated).
        warmup_steps=float(t.warmup_ratio) if t.warmup_ratio else t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        # The incomplete last batch is dropped, as DDP must: floor(rows / batch) steps an epoch
        # on any number of workers, one included (which trains without DDP).
        dataloader_drop_last=True,
        fp16=t.precision == "fp16",
        bf16=t.precision == "bf16",
        logging_steps=t.logging_steps,
        logging_first_step=True,  # a loss on record however short the run
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
    took 14x the fp32 one here (3.7 ms a call against 0.34, AMX Xeon, torch 2.13), which made a
    bf16 step slower than fp32 (209 against 187 ms); eager attention runs its matmuls on AMX like
    the rest (141-144 ms). Inference keeps SDPA: the saved model does not record the choice."""
    model[0].auto_model.set_attn_implementation("eager")


def train_worker(loop_config: dict) -> None:
    import datasets
    import ray.train
    import torch
    from sentence_transformers import SentenceTransformerTrainer
    from transformers.trainer_callback import PrinterCallback

    from sbertray.modeling import load_model
    from sbertray.train.evaluation import SimilarityMetrics, build_evaluator
    from sbertray.train.loss import CosineSimilarityLoss

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub mid-run
    if not loop_config.get("verbose"):
        _quiet_worker_logs()

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

    train_ds = datasets.Dataset(loop_config["train"])
    dev_name = (config.dev.name if config.dev else None) or "dev"
    dev_table = loop_config["dev"]
    dev_pairs = PairData(table=dev_table, files=[]) if dev_table is not None else None
    evaluator = build_evaluator(dev_pairs, dev_name) if dev_pairs is not None else None

    name = run_name(config, loop_config["fingerprint"])
    local_root = storage.scratch_root() / name
    local_root.mkdir(parents=True, exist_ok=True)
    ckpt_root = storage.resolve(config.output.checkpoint_root, config.storage)
    store = CheckpointStore(ckpt_root, name)
    resume_dir = local_root / f"resume-rank{rank}"
    shutil.rmtree(resume_dir, ignore_errors=True)
    resume_path, resumed_from = store.restore(resume_dir)
    if rank == 0 and resume_path is None and (others := store.other_runs()):
        print(
            f"[sbertray] the checkpoints in {storage.redact(ckpt_root.url)} are from runs with "
            f"another config, data or base model ({', '.join(others)}): training from step 0",
            flush=True,
        )
    if rank == 0 and resume_path:
        print(f"[sbertray] resuming from checkpoint at step {resumed_from}", flush=True)

    if world == 1 and not config.scaling.use_gpu:
        # accelerate wraps every CPU run that has LOCAL_RANK set (Ray Train sets it) in DDP,
        # even a single process, whose gradients then go through gloo for nothing: 10-20 ms a
        # step here (5-10%). One worker trains as the plain trainer does.
        os.environ.pop("LOCAL_RANK", None)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=_training_arguments(
            config, str(local_root / "hf"), world, dev_name if evaluator is not None else None
        ),
        train_dataset=train_ds,
        loss=CosineSimilarityLoss(model),
        evaluator=evaluator,
        callbacks=[_make_report_callback(rank, store, evaluator)],
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
    # Done: every checkpoint and the model are in storage; a failed run keeps its scratch.
    shutil.rmtree(resume_dir, ignore_errors=True)
    if rank == 0:
        shutil.rmtree(local_root, ignore_errors=True)
