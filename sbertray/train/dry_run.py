"""``sbertray train RECIPE --dry-run``: every check the real run makes before a worker starts,
then the plan (steps, workers, resume point, outputs) and an estimate of its time from a few
optimizer steps on a sample batch here. Nothing is written to the outputs."""

from __future__ import annotations

import time

from sbertray import storage
from sbertray.config import TrainConfig
from sbertray.progress import format_duration
from sbertray.train.checkpoints import CheckpointStore
from sbertray.train.run import TrainingPlan, finished_result, plan_training, worker_cpus
from sbertray.train.worker import run_name

# Optimizer steps timed after one warm-up step: enough for a stable figure, a few seconds.
_TIMED_STEPS = 3


def dry_run(config: TrainConfig, *, ray_address: str | None = None) -> str:
    """The plan as lines of text. Raises what ``train`` raises before a worker starts."""
    from sbertray.ray_runtime import init_ray

    plan = plan_training(config, ray_address=ray_address, write_data=False)
    config = plan.config
    # As `train`: a model this run already wrote is kept before Ray starts.
    if (finished := finished_result(plan)) is not None:
        return (
            f"[sbertray] dry run: nothing to train: {finished.model_url} was trained with this "
            f"recipe, data and base model ({finished.global_step} steps); a run keeps it "
            "(--restart trains it again)"
        )
    rows = plan.train.rows
    init_ray(ray_address)
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    cpus = worker_cpus(config)
    needed = cpus * config.scaling.num_workers
    if needed > cluster_cpus and not config.scaling.use_gpu:
        from sbertray.embed.pool import PoolSizeError

        raise PoolSizeError(
            f"{config.scaling.num_workers} workers x {cpus:g} CPUs = {needed:g} CPUs, but the "
            f"cluster has {cluster_cpus:g}: lower `scaling.num_workers` or `scaling.cpus_per_worker`"
        )
    ckpt_root = storage.resolve(config.output.checkpoint_root, config.storage)
    resume = CheckpointStore(ckpt_root, run_name(config, plan.fingerprint)).latest_step()
    step_s = _step_seconds(plan)
    return "\n".join(
        [
            "[sbertray] dry run: nothing is written",
            f"  data: {rows:,} training pairs ({plan.train.num_skipped} rows skipped)"
            + (f", {plan.dev.table.num_rows:,} dev pairs" if plan.dev else ", no dev set"),
            f"  {plan.describe()}" + ("" if config.scaling.in_driver else f", {cpus:g} CPU each"),
            f"  resume: {'from step ' + str(resume) if resume else 'none, training from step 0'}",
            f"  outputs: model {storage.redact(config.output.model)}, checkpoints "
            f"{storage.redact(ckpt_root.url)}",
            f"  estimate: {step_s:.2f} s per step for one worker here, so about "
            f"{format_duration(plan.steps * step_s)} of training, plus start-up and evaluation",
        ]
    )


def _step_seconds(plan: TrainingPlan) -> float:
    """Seconds per optimizer step of the recipe's batch, measured on this machine."""
    import torch

    from sbertray.modeling import load_model
    from sbertray.train.loss import build_loss

    config = plan.config
    model = load_model(
        config.base_model,
        storage_config=config.storage,
        device="cpu",
        max_seq_length=config.training.max_seq_length,
        normalize=config.training.normalize,
    )
    loss = build_loss(model, config.training)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.learning_rate)
    batch = plan.train.sample.slice(0, config.training.batch_size).to_pylist()
    features = [model.preprocess([row[k] for row in batch]) for k in ("sentence_0", "sentence_1")]
    labels = torch.tensor([row["label"] for row in batch], dtype=torch.float32)
    for i in range(_TIMED_STEPS + 1):
        if i == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        loss(features, labels).backward()
        optimizer.step()
    return (time.perf_counter() - started) / _TIMED_STEPS
