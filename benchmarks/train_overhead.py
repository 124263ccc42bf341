"""Ray Train overhead: the same recipe and the same optimizer steps, in one run,
(a) plain single-process sentence-transformers training, (b) sbertray through Ray Train with
1 worker, (c) with 2 workers. Prints wall-time ratios (goal: b/a <= 1.10) and appends them to
benchmarks/results.json. Wall time is end to end: model load, training, checkpoint, save.

    .venv/bin/python benchmarks/train_overhead.py --pairs 3200
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _common import ROOT, STSB, Timer, record, stsb_rows  # noqa: E402

from sbertray.config import TrainConfig, load_config  # noqa: E402


def _recipe(train_file: Path, out: Path, workers: int) -> TrainConfig:
    return load_config(
        TrainConfig,
        ROOT / "jobs/configs/stsb.yaml",
        [
            f"train.path={train_file}",
            f"dev.path={STSB / 'dev.tsv'}",
            "training.epochs=1",
            "training.select_best=false",
            "training.eval_every=end",
            "dev.limit=500",
            f"scaling.num_workers={workers}",
            f"output.model={out}",
        ],
    )


def plain(config: TrainConfig, out: Path) -> int:
    """What a user would write without sbertray: one process, sentence-transformers' trainer."""
    import datasets
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import CosineSimilarityLoss

    from sbertray.modeling import load_model
    from sbertray.train.data import load_pairs

    pairs = load_pairs(config.train)
    model = load_model(config.base_model, device="cpu", max_seq_length=256, normalize=True)
    t = config.training
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=t.batch_size,
        num_train_epochs=1,
        learning_rate=t.learning_rate,
        lr_scheduler_type="linear",
        seed=t.seed,
        # The same data on both sides: drop the last partial batch like DDP does.
        dataloader_drop_last=True,
        save_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset(pairs.table),
        loss=CosineSimilarityLoss(model),
    )
    trainer.train()
    model.save(str(out / "model"))
    return trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=3200, help="STS-B training pairs (16 per step)"
    )
    args = parser.parse_args()

    import ray

    from sbertray.ray_runtime import init_ray
    from sbertray.train import train

    work = Path(tempfile.mkdtemp(prefix="sbertray-bench-"))
    rows = stsb_rows("train")[: args.pairs]
    train_file = work / "train.tsv"
    train_file.write_text(
        "sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows)
    )
    init_ray()  # started once, outside the timed runs, as on a running cluster
    timings, steps = {}, {}
    with Timer() as t:
        steps["plain"] = plain(_recipe(train_file, work / "a", 1), work / "a")
    timings["plain"] = t.seconds
    for workers in (1, 2):
        name = f"ray_{workers}w"
        with Timer() as t:
            result = train(_recipe(train_file, work / name / "model", workers))
        timings[name], steps[name] = t.seconds, result.global_step
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    ratios = {
        "ray_1w/plain": timings["ray_1w"] / timings["plain"],
        "ray_2w/plain": timings["ray_2w"] / timings["plain"],
    }
    print(f"{'run':<10}{'steps':>7}{'seconds':>10}")
    for name in timings:
        print(f"{name:<10}{steps[name]:>7}{timings[name]:>10.1f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    print(f"goal ray_1w/plain <= 1.10: {'met' if ratios['ray_1w/plain'] <= 1.10 else 'NOT met'}")
    record(
        "train_overhead",
        {
            "pairs": args.pairs,
            "steps": steps,
            "seconds": {k: round(v, 1) for k, v in timings.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
        },
    )


if __name__ == "__main__":
    main()
