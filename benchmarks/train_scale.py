"""Training on a large pair set (issue 26): memory, time to the first step and steps/s as the
pairs grow, against the in-memory path this checkout replaced.

N STS-B pairs (the 5,749 training pairs, cycled) in 8 Parquet files, on local disk and on the
tests' S3 server, trained for ``--steps`` optimizer steps of global batch 32 on one Ray Train
worker with a one-layer, 384-wide MiniLM (MiniLM's tokenizer: the text work is real, the model
cheap), so the figures are the data path's. Each run is a ``sbertray train`` process; the
sampler of ``reuse_scale.py`` reads, every 0.2 s, the driver's RSS and the largest Ray worker's
RSS and private memory (RSS less shared pages).

- **streamed**: this checkout (the pairs validated into shards, each worker streaming its share).
- **in-memory**: the same command run from ``--baseline`` (a git revision, checked out into a
  temporary worktree): the driver reads and validates every pair into one table and ships it
  into every worker. Run up to ``--baseline-max`` pairs (at 10M its driver needs ~10 GB).

Time to the first step is from the process's start to its "step 1/" line; steps/s is measured
from that line to the last. A short run's steps/s drifts by 10-20% on this shared machine, so
the data path's own cost is also measured in one process, side by side: milliseconds per batch
of 32 pairs, tokenized, from each path's dataloader (sentence-transformers' trainer over an
in-memory ``datasets.Dataset``, and the stream over the prepared shards) at 200k pairs. Goals: at 10M pairs the driver's and the worker's peak within 1.2x
of 100k's; the first step within 60 s plus the time to read the first block; steps/s no lower
than the in-memory path's.

    .venv/bin/python benchmarks/train_scale.py                        # 100k, 1M, 10M
    .venv/bin/python benchmarks/train_scale.py --pairs 100000,1000000 --where local
    .venv/bin/python benchmarks/train_scale.py --loader-only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pyarrow import fs as pafs

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, record, stsb_rows  # noqa: E402
from reuse_scale import start_sampled  # noqa: E402

FILES = 8
BATCH = 32


def write_pairs(fs, root: str, pairs: int) -> None:
    """``pairs`` STS-B training pairs, cycled, each text made distinct by its row number (so
    the files compress as real text does, not as 5,749 repeated rows)."""
    rows = stsb_rows("train")
    base = pa.table(
        {
            "sentence_0": [a for a, _, _ in rows],
            "sentence_1": [b for _, b, _ in rows],
            "label": [s / 5 for _, _, s in rows],
        }
    )
    fs.create_dir(root, recursive=True)
    for n, part in enumerate(np.array_split(np.arange(pairs), FILES)):
        table = base.take(part % len(rows))
        number = pa.array(part).cast(pa.string())
        texts = {
            c: pc.binary_join_element_wise(table[c], number, " #") for c in table.column_names[:2]
        }
        table = pa.table({**texts, "label": table["label"]})
        with fs.open_output_stream(f"{root}/pairs-{n}.parquet") as f:
            pq.write_table(table, f, row_group_size=65_536)


def recipe(work: Path, name: str, data: str, model: str, steps: int) -> Path:
    path = work / f"{name}.yaml"
    settings = {
        "name": name,
        "base_model": model,
        "train": {"path": data, "name": "stsb-cycled"},
        "training": {
            "batch_size": BATCH,
            "max_steps": steps,
            "logging_steps": 1,
            "checkpoint_steps": 10 * steps,  # none written: the data path is measured
            "max_seq_length": 64,
        },
        "scaling": {"num_workers": 1},
        "output": {"model": str(work / name / "model"), "checkpoints": str(work / name / "ckpt")},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def train(tree: Path, config: Path) -> dict:
    """One ``sbertray train`` process from ``tree``'s code, sampled."""
    start = time.perf_counter()
    proc, sampler = start_sampled(["train", str(config)], tree, stderr=subprocess.STDOUT)
    steps, planned, lines = [], None, []
    for line in proc.stdout:
        lines.append(line)
        now = time.perf_counter() - start
        if "[sbertray] training " in line and planned is None:
            planned = now
        if line.startswith("[sbertray] step ") and "/" in line.split()[2]:
            steps.append((int(line.split()[2].split("/")[0]), now))
    proc.wait()
    sampler.stop.set()
    sampler.join()
    if proc.returncode or len(steps) < 2:
        sys.exit("".join(lines[-40:]))
    (first, t_first), (last, t_last) = steps[0], steps[-1]
    mb = 1 << 20
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "plan_s": round(planned, 1),  # read and validate (and, streamed, write the shards)
        "first_step_s": round(t_first, 1),
        "steps_per_s": round((last - first) / (t_last - t_first), 2),
        "driver_peak_mb": round(sampler.driver / mb),
        "largest_worker_mb": round(sampler.worker / mb),
        "largest_worker_private_mb": round(sampler.worker_private / mb),
    }


def loader_ms(work: Path, pairs: int = 200_000, batches: int = 400, rounds: int = 3) -> dict:
    """Milliseconds per tokenized batch from each path's dataloader, best of ``rounds``."""
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from tiny_model import tiny_model_path

    from sbertray.config import PairDataConfig
    from sbertray.train.prepare import prepare_pairs
    from sbertray.train.stream import PairStream, StreamLoader

    write_pairs(pafs.LocalFileSystem(), str(work / "loader-in"), pairs)
    spec = PairDataConfig(path=str(work / "loader-in"))
    prepared = prepare_pairs(spec, None, str(work / "loader-prep"), sample_rows=1000)
    table = pa.concat_tables(pq.read_table(s.url) for s in prepared.shards)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=BATCH,
        dataloader_drop_last=True,
        report_to="none",
        use_cpu=True,
    )
    model = SentenceTransformer(tiny_model_path(), device="cpu")
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=datasets.Dataset(table)
    )

    def per_batch(loader) -> float:
        it = iter(loader)
        next(it)  # the stream reads its first window here
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - start) / batches * 1000

    times: dict[str, list[float]] = {"in-memory": [], "streamed": []}
    for _ in range(rounds):
        times["in-memory"].append(per_batch(trainer.get_train_dataloader()))
        stream = PairStream(prepared.shards, None, global_batch=BATCH, world=1, rank=0, seed=42)
        times["streamed"].append(per_batch(StreamLoader(stream, trainer.data_collator)))
    best = {way: round(min(t), 2) for way, t in times.items()}
    best["ratio"] = round(best["streamed"] / best["in-memory"], 2)
    print(f"  ms per batch of {BATCH} at {pairs:,} pairs: {best}", flush=True)
    return best


def baseline_tree(work: Path, revision: str) -> Path:
    tree = work / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), revision],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="100000,1000000,10000000")
    parser.add_argument("--where", default="local,s3", help="local, s3 or both")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--baseline", default="ac97b6a", help="the in-memory path's revision")
    parser.add_argument("--baseline-max", type=int, default=1_000_000)
    parser.add_argument("--loader-only", action="store_true", help="only the ms per batch")
    args = parser.parse_args()
    if args.loader_only:
        with tempfile.TemporaryDirectory(prefix="sbertray-train-scale-") as tmp:
            os.environ.setdefault("SBERTRAY_CACHE", str(Path(tmp) / "cache"))
            record("train_scale_loader", loader_ms(Path(tmp)))
        return
    from local_s3 import LocalS3
    from tiny_model import tiny_model_path

    sizes = [int(n) for n in args.pairs.split(",")]
    results: dict = {"steps": args.steps, "batch": BATCH, "baseline": args.baseline}
    with (
        tempfile.TemporaryDirectory(prefix="sbertray-train-scale-") as tmp,
        LocalS3(volumes=600) as s3,
    ):
        work = Path(tmp)
        os.environ.update(s3.env())
        os.environ["SBERTRAY_CACHE"] = str(work / "cache")
        s3.create_bucket("bench")
        model = tiny_model_path()
        old = baseline_tree(work, args.baseline)
        try:
            for where in args.where.split(","):
                for pairs in sizes:
                    if where == "s3":
                        data = f"s3://bench/pairs-{pairs}"
                        write_pairs(s3.filesystem(), f"bench/pairs-{pairs}", pairs)
                    else:
                        data = str(work / f"pairs-{pairs}")
                        write_pairs(pafs.LocalFileSystem(), data, pairs)
                    runs = {"streamed": ROOT, "in-memory": old}
                    for way, tree in runs.items():
                        if way == "in-memory" and pairs > args.baseline_max:
                            continue
                        name = f"{way}-{where}-{pairs}"
                        result = train(tree, recipe(work, name, data, model, args.steps))
                        results[name] = result
                        print(f"  {where} {pairs:,} pairs, {way}: {result}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT)
    for where in args.where.split(","):
        small, large = (
            results[f"streamed-{where}-{sizes[0]}"],
            results[f"streamed-{where}-{sizes[-1]}"],
        )
        for key in ("driver_peak_mb", "largest_worker_mb", "largest_worker_private_mb"):
            ratio = large[key] / max(1, small[key])
            results[f"{where}_{key}_ratio"] = round(ratio, 2)
            print(f"  {where}: {key} {sizes[-1]:,} / {sizes[0]:,} pairs = {ratio:.2f}x")
        for pairs in sizes:
            if (old := results.get(f"in-memory-{where}-{pairs}")) is not None:
                new = results[f"streamed-{where}-{pairs}"]
                ratio = new["steps_per_s"] / old["steps_per_s"]
                results[f"{where}_{pairs}_steps_per_s_ratio"] = round(ratio, 2)
                print(f"  {where}: {pairs:,} pairs, steps/s streamed / in-memory = {ratio:.2f}x")
    record("train_scale", results)


if __name__ == "__main__":
    main()
