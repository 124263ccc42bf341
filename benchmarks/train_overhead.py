"""Training speed, in one run on the same recipe and the same optimizer steps:

1. Ray Train's overhead as a fixed cost plus a per-step cost. Each contender is a fresh process
   doing the same job: load the pairs and the base model, score dev before and after training
   (sbertray's default with ``eval_every: end``), train, save. "plain" is sentence-transformers'
   trainer in one process with the loss sbertray's workers use; "Ray Train" is ``sbertray train``
   with 1 worker, submitted to a Ray that is already running, as on a cluster. Each runs at N and
   2N steps, in interleaved rounds (best of the rounds, as this machine's speed drifts); a line
   through the two wall times gives seconds per step and fixed seconds. Goals: fixed overhead
   <= 15 s, per step <= 3%.
2. On CPUs with native bf16 (AVX512-BF16, AMX): sbertray's training in bf16 autocast (its loss,
   which embeds both sides of a pair in one forward, and its CPU bf16 setup, eager attention)
   against the plain fp32 trainer a user would write (sentence-transformers' own
   CosineSimilarityLoss): steps/s after a warm-up, step end to step end, and STS-B dev Spearman.
   Goal: >= 1.3x the steps/s, Spearman within 0.003. sbertray in fp32 runs beside them, to show
   what the one forward and bf16 each bring.

Prints both and appends them to benchmarks/results.json.

    .venv/bin/python benchmarks/train_overhead.py --pairs 800    # 50 and 100 steps, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _common import ROOT, STSB, Timer, record, stsb_rows  # noqa: E402

from sbertray.config import TrainConfig, load_config  # noqa: E402

DEV_PAIRS = 500  # dev scored before and after training, on both sides


def _overrides(train_file: Path, out: Path) -> list[str]:
    return [
        f"train.path={train_file}",
        f"dev.path={STSB / 'dev.tsv'}",
        "training.epochs=1",
        "training.select_best=false",
        "training.eval_every=end",
        f"dev.limit={DEV_PAIRS}",
        "scaling.num_workers=1",
        f"output.model={out}",
    ]


def _recipe(train_file: Path, out: Path) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "jobs/configs/stsb.yaml", _overrides(train_file, out))


WARMUP_STEPS = 10  # not timed in steps/s: the first steps allocate and pick kernels


def plain(
    config: TrainConfig, out: Path, bf16: bool = False, stock_loss: bool = False
) -> tuple[int, float]:
    """Training without Ray Train: one process, sentence-transformers' trainer, dev scored before
    and after as sbertray does, with sbertray's loss or (``stock_loss``, what a user would write)
    sentence-transformers' own. Returns the optimizer steps after the warm-up and their seconds,
    timed step end to step end (the epoch-end checkpoint is not a step)."""
    import datasets
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses
    from transformers import TrainerCallback

    from sbertray.modeling import load_model
    from sbertray.train.data import load_pairs
    from sbertray.train.evaluation import build_evaluator
    from sbertray.train.loss import CosineSimilarityLoss
    from sbertray.train.worker import use_eager_attention

    pairs = load_pairs(config.train)
    evaluator = build_evaluator(load_pairs(config.dev), "dev").evaluator
    model = load_model(config.base_model, device="cpu", max_seq_length=256, normalize=True)
    if bf16:
        use_eager_attention(model)  # as sbertray's workers do for CPU bf16
    evaluator(model)
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
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            step_ends.append(time.perf_counter())

    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset(pairs.table),
        loss=(losses.CosineSimilarityLoss if stock_loss else CosineSimilarityLoss)(model),
        callbacks=[StepClock()],
    )
    trainer.train()
    evaluator(model)
    model.save(str(out / "model"))
    timed = step_ends[WARMUP_STEPS - 1 :]
    return len(timed) - 1, timed[-1] - timed[0]


def _run(command: list[str], log: Path) -> float:
    """Wall seconds of one contender's process; exits with its output's tail if it fails."""
    with Timer() as t, log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{' '.join(command)} failed ({code}):\n" + log.read_text()[-3000:])
    return t.seconds


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
        "--pairs", type=int, default=800, help="STS-B pairs of the short run (16 per step)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept")
    parser.add_argument("--plain-run", nargs=2, metavar=("TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_run:  # the plain contender's own process
        train_file, out = map(Path, args.plain_run)
        plain(_recipe(train_file, out), out)
        return

    import ray

    from sbertray.hardware import cpu_has_native_bf16
    from sbertray.ray_runtime import init_ray
    from sbertray.train import evaluate

    work = Path(tempfile.mkdtemp(prefix="sbertray-bench-"))
    init_ray()  # the running cluster that `sbertray train` joins, started outside the timings
    address = ray.get_runtime_context().gcs_address
    batch = _recipe(work, work).training.batch_size
    wall: dict[str, dict[int, float]] = {"plain": {}, "ray_1w": {}}
    for round_ in range(args.rounds):
        for pairs in (args.pairs, 2 * args.pairs):
            train_file, steps = _pairs_file(work, pairs), pairs // batch
            run = work / f"{pairs}-{round_}"
            plain_cmd = [sys.executable, __file__, "--plain-run", str(train_file)]
            plain_cmd.append(str(run / "plain"))
            ray_cmd = [sys.executable, "-m", "sbertray", "train", "--address", address]
            ray_cmd += ["jobs/configs/stsb.yaml", *_overrides(train_file, run / "ray")]
            seconds = {
                "plain": _run(plain_cmd, run.with_suffix(".plain.log")),
                "ray_1w": _run(ray_cmd, run.with_suffix(".ray.log")),
            }
            trained = json.loads((run / "ray" / "train_result.json").read_text())["global_step"]
            assert trained == steps, f"Ray Train ran {trained} steps, plain {steps}"
            for name, t in seconds.items():
                wall[name][steps] = min(t, wall[name].get(steps, t))
            print(f"round {round_ + 1}, {steps} steps: plain {seconds['plain']:.1f} s, "
                  f"Ray Train {seconds['ray_1w']:.1f} s", flush=True)  # fmt: skip
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
        contenders = {  # name: (bf16, stock_loss)
            "plain_fp32": (False, True),
            "sbertray_fp32": (False, False),
            "sbertray_bf16": (True, False),
        }
        fastest: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, the fastest of each kept
            for name, (bf16_on, stock_loss) in contenders.items():
                out = work / name
                steps, seconds = plain(_recipe(train_file, out), out, bf16_on, stock_loss)
                fastest[name] = max(steps / seconds, fastest.get(name, 0.0))
        # Seeded: every round trains the same weights, so the last round's model is scored once.
        runs = {
            name: {
                "steps_per_s": steps_per_s,
                "dev_spearman": evaluate(str(work / name / "model"), dev).spearman_cosine,
            }
            for name, steps_per_s in fastest.items()
        }

        def ratio(a: str, b: str) -> float:
            return round(runs[a]["steps_per_s"] / runs[b]["steps_per_s"], 3)

        bf16 = {
            "speedup": ratio("sbertray_bf16", "plain_fp32"),
            "one_forward_fp32": ratio("sbertray_fp32", "plain_fp32"),
            "bf16_alone": ratio("sbertray_bf16", "sbertray_fp32"),
            "spearman_delta": round(
                runs["sbertray_bf16"]["dev_spearman"] - runs["plain_fp32"]["dev_spearman"], 4
            ),
            "runs": runs,
        }
        for name, run in runs.items():
            print(f"{name}: {run['steps_per_s']:.2f} steps/s, "
                  f"dev Spearman {run['dev_spearman']:.5f}")  # fmt: skip
        print(f"sbertray bf16 vs the plain fp32 trainer: {bf16['speedup']:.2f}x steps/s (goal "
              f">= 1.3), dev Spearman {bf16['spearman_delta']:+.4f} (goal within 0.003); "
              f"of it, one forward a pair {bf16['one_forward_fp32']:.2f}x (fp32), "
              f"bf16 {bf16['bf16_alone']:.2f}x")  # fmt: skip
    else:
        print("bf16 training: not measured, this CPU has no native bf16 (AVX512-BF16 or AMX)")
    shutil.rmtree(work, ignore_errors=True)
    record(
        "train_overhead",
        {
            "pairs": [args.pairs, 2 * args.pairs],
            "rounds": args.rounds,
            "seconds": {k: {s: round(v, 1) for s, v in p.items()} for k, p in wall.items()},
            "overhead": overhead,
            "bf16": bf16,
        },
    )


if __name__ == "__main__":
    main()
