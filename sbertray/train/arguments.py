"""The recipe's ``training`` block as sentence-transformers' training arguments (one worker's
share of the global batch, the dev evaluation's schedule, checkpoints, best-epoch selection)."""

from __future__ import annotations

from sbertray.config import TrainConfig
from sbertray.train.evaluation import result_key


def training_arguments(config: TrainConfig, output_dir: str, world_size: int, dev_name: str | None):
    """Arguments for one of ``world_size`` workers; ``dev_name`` is None without a dev set."""
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
        # The stream starts a resumed run at its step (reading nothing before it); the
        # trainer's own skipping would read and tokenize every batch before it.
        ignore_data_skip=True,
        fp16=t.precision == "fp16",
        bf16=t.precision == "bf16",
        logging_steps=t.logging_steps,
        logging_first_step=True,  # a loss on record however short the run
        eval_strategy="epoch" if dev_name and t.eval_every == "epoch" else "no",
        save_strategy="steps" if t.checkpoint_steps else "epoch",
        save_steps=t.checkpoint_steps or 500,
        save_total_limit=t.keep_checkpoints,
        load_best_model_at_end=t.select_best,
        metric_for_best_model=f"eval_{result_key(dev_name, t.select_metric)}"
        if t.select_best
        else None,
        greater_is_better=True if t.select_best else None,
        report_to="none",
        use_cpu=not config.scaling.use_gpu,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # rank 0 prints one line per logging step instead
    )
