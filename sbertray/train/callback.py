"""The training loop's link to Ray Train and the console: a transformers callback that reports
each checkpoint to Ray Train and prints progress on rank 0."""

from __future__ import annotations

import time
from pathlib import Path

from sbertray.progress import format_duration
from sbertray.train import checkpoints
from sbertray.train.checkpoints import CheckpointStore
from sbertray.train.evaluation import DEV_METRICS, DevEvaluator, dim_name, result_key


class _RayTrainReport:
    """Hands each saved checkpoint to Ray Train (rank 0's copy: it holds the model, optimizer,
    scheduler and trainer state), marks it complete once uploaded, and prints progress on rank
    0. Mixed into transformers' ``TrainerCallback`` by ``report_callback``."""

    def __init__(
        self,
        rank: int,
        store: CheckpointStore,
        dev: DevEvaluator | None = None,
        *,
        keep_in_driver: int | None = None,
    ):
        """``keep_in_driver``: a run in the driver's process (Ray Train's local mode, which
        stores no checkpoint) stores its checkpoints itself and keeps this many."""
        self.rank, self.store, self.dev = rank, store, dev
        self.keep_in_driver = keep_in_driver
        self.printed_step = -1  # the trainer may log one step more than once
        self.first = None  # (time, step) of this process's first logged step, for the ETA

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.rank or not logs or "loss" not in logs or state.global_step == self.printed_step:
            return
        self.printed_step = state.global_step
        now = time.monotonic()
        self.first = self.first or (now, state.global_step)
        done = state.global_step - self.first[1]
        left = (
            (now - self.first[0]) / done * (state.max_steps - state.global_step) if done else None
        )
        print(
            f"[sbertray] step {state.global_step}/{state.max_steps} "
            f"epoch {state.epoch:.2f} loss {logs['loss']:.4f} "
            f"lr {logs.get('learning_rate', 0):.2e} ETA "
            + (format_duration(left) if left is not None else "?"),
            flush=True,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """The base model's dev score as step 0 of the eval log, so the report shows the gain
        from the start (kept in the trainer state, so a resumed run has it too)."""
        if self.rank == 0 and self.dev is not None and state.global_step == 0 and model:
            scores = {f"eval_{k}": v for k, v in self.dev.evaluator(model).items()}
            state.log_history.append({"step": 0, "epoch": 0.0, **scores})
            self.on_evaluate(args, state, control, metrics=scores)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.rank or self.dev is None:
            return
        shown_keys = [
            f"eval_{result_key(self.dev.name, m)}" for m in ("spearman_cosine", "mrr@10")
        ] + [
            f"eval_{result_key(dim_name(self.dev.name, d), 'spearman_cosine')}"
            for d in self.dev.dims
        ]
        scores = {k: metrics[k] for k in shown_keys if k in (metrics or {})}
        if scores:
            shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in scores.items())
            print(f"[sbertray] step {state.global_step}: {shown}", flush=True)

    def _dev_scores(self, state) -> dict[str, float]:
        """The dev scores logged at this step, by metric name (``spearman_cosine``, ``mrr@10``,
        ...): what ``sbertray tune`` compares trials on and ASHA stops them by."""
        if self.dev is None:
            return {}
        logged = [e for e in state.log_history if e.get("step") == state.global_step]
        keys = {f"eval_{result_key(self.dev.name, m)}": m for m in DEV_METRICS}
        return {keys[k]: v for entry in logged for k, v in entry.items() if k in keys}

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        ckpt_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpoint = None
        if self.rank == 0 and ckpt_dir.is_dir():
            self.store.unmark(state.global_step)
            if self.keep_in_driver:  # stored and marked here; Ray Train gets the metrics only
                self.store.save(state.global_step, ckpt_dir, self.keep_in_driver)
            else:
                checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(
            {"global_step": state.global_step, "epoch": state.epoch, **self._dev_scores(state)},
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoints.dir_name(state.global_step),
        )
        if checkpoint is not None:  # the upload is synchronous: the files are all there
            self.store.mark(state.global_step)


def report_callback(
    rank: int,
    store: CheckpointStore,
    dev: DevEvaluator | None = None,
    *,
    keep_in_driver: int | None = None,
):
    """``_RayTrainReport`` as a transformers callback (transformers is imported on the workers
    only)."""
    from transformers import TrainerCallback

    callback = type("RayTrainReport", (_RayTrainReport, TrainerCallback), {})
    return callback(rank, store, dev, keep_in_driver=keep_in_driver)
