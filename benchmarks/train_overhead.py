"""Training speed, in one run on the same recipe and the same optimizer steps:

1. Ray Train's overhead as a fixed cost plus a per-step cost: plain single-process
   sentence-transformers training and sbertray through Ray Train (1 worker), each at N and 2N
   steps; a line through the two wall times gives seconds per step and fixed seconds (model
   load, Ray Train start, checkpoint, save). Goals: fixed overhead <= 15 s, per step <= 3%.
2. On CPUs with native bf16 (AVX512-BF16, AMX): plain training in bf16 autocast against fp32,
   steps/s and STS-B dev Spearman. Goal: >= 1.3x the steps/s, Spearman within 0.003.

Prints both and appends them to benchmarks/results.json.

    .venv/bin/python benchmarks/train_overhead.py --pairs 1600    # 100 and 200 steps
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


def _recipe(train_file: Path, out: Path, workers: int = 1) -> TrainConfig:
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


def plain(config: TrainConfig, out: Path, bf16: bool = False) -> int:
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
        bf16=bf16,
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


def _fit(points: dict[int, float]) -> tuple[float, float]:
    """(fixed seconds, seconds per step) of the line through (steps, seconds) at two sizes."""
    (s1, t1), (s2, t2) = sorted(points.items())
    per_step = (t2 - t1) / (s2 - s1)
    return t1 - per_step * s1, per_step


def _pairs_file(work: Path, pairs: int) -> Path:
    rows = stsb_rows("train")[:pairs]
    path = work / f"train-{pairs}.tsv"
    path.write_text(
        "sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows)
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=1600, help="STS-B pairs of the short run (16 per step)"
    )
    args = parser.parse_args()

    import ray

    from sbertray.embed.encoder import cpu_has_native_bf16
    from sbertray.ray_runtime import init_ray
    from sbertray.train import evaluate, train

    work = Path(tempfile.mkdtemp(prefix="sbertray-bench-"))
    init_ray()  # started once, outside the timed runs, as on a running cluster
    # Imported before the timed runs: else the first plain run alone pays for the imports (a
    # Ray Train worker is a new process each run, so it pays every time: a fixed cost).
    import datasets  # noqa: F401
    import sentence_transformers  # noqa: F401

    wall: dict[str, dict[int, float]] = {"plain": {}, "ray_1w": {}}
    for pairs in (args.pairs, 2 * args.pairs):
        train_file = _pairs_file(work, pairs)
        with Timer() as t:
            steps = plain(_recipe(train_file, work / "a"), work / "a")
        wall["plain"][steps] = t.seconds
        with Timer() as t:
            result = train(_recipe(train_file, work / f"ray-{pairs}" / "model"))
        wall["ray_1w"][result.global_step] = t.seconds
        print(f"{steps} steps: plain {wall['plain'][steps]:.1f} s, "
              f"Ray Train {wall['ray_1w'][result.global_step]:.1f} s", flush=True)  # fmt: skip
    ray.shutdown()
    (plain_fixed, plain_step), (ray_fixed, ray_step) = _fit(wall["plain"]), _fit(wall["ray_1w"])
    overhead = {
        "fixed_s": round(ray_fixed - plain_fixed, 1),
        "per_step_pct": round(100 * (ray_step / plain_step - 1), 1),
    }
    print(f"plain: {plain_fixed:.1f} s fixed + {plain_step * 1000:.0f} ms/step; Ray Train: "
          f"{ray_fixed:.1f} s fixed + {ray_step * 1000:.0f} ms/step")  # fmt: skip
    print(f"Ray Train overhead: {overhead['fixed_s']} s fixed (goal <= 15), "
          f"{overhead['per_step_pct']}% per step (goal <= 3)")  # fmt: skip

    bf16 = None
    if cpu_has_native_bf16():
        train_file = _pairs_file(work, 2 * args.pairs)
        dev = _recipe(train_file, work).dev.model_copy(update={"limit": None})  # all 1,500
        runs = {}
        for name in ("fp32", "bf16"):
            out = work / f"plain-{name}"
            with Timer() as t:
                steps = plain(_recipe(train_file, out), out, bf16=name == "bf16")
            runs[name] = {
                "steps_per_s": steps / t.seconds,
                "dev_spearman": evaluate(str(out / "model"), dev).spearman_cosine,
            }
        bf16 = {
            "speedup": round(runs["bf16"]["steps_per_s"] / runs["fp32"]["steps_per_s"], 3),
            "spearman_delta": round(runs["bf16"]["dev_spearman"] - runs["fp32"]["dev_spearman"], 4),
            "runs": runs,
        }
        print(f"bf16 autocast vs fp32 (plain trainer): {bf16['speedup']:.2f}x steps/s (goal "
              f">= 1.3), dev Spearman {bf16['spearman_delta']:+.4f} (goal within 0.003)")  # fmt: skip
    else:
        print("bf16 training: not measured, this CPU has no native bf16 (AVX512-BF16 or AMX)")
    shutil.rmtree(work, ignore_errors=True)
    record(
        "train_overhead",
        {
            "pairs": [args.pairs, 2 * args.pairs],
            "seconds": {k: {s: round(v, 1) for s, v in p.items()} for k, p in wall.items()},
            "overhead": overhead,
            "bf16": bf16,
        },
    )


if __name__ == "__main__":
    main()
