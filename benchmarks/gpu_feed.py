"""The GPU feed ceiling, measured without a GPU: how many short texts/s the CPU side of the
GPU embedding actors sharing one GPU can prepare, with the model step skipped.

Each run is ``run_embed`` over local Parquet with a benchmark-only backend, ``feed-only``: the
GPU actor's own tokenizer (the model's Hugging Face fast tokenizer, in tokenizer processes, one
per CPU of the actor) and batch sizes (``GPU_TOKEN_BUDGET``, ``GPU_MAX_BATCH_ROWS``), padded
batches turned into torch tensors, and a forward that returns zero vectors instead of running
the model. Everything else is the real stage: reading, text checks, content keys, the
repeated-text rule, output columns, writing and committing the Parquet files. Pinning is
skipped: it needs CUDA.

Texts are STS-B sentences made distinct (so the repeated-text rule saves nothing). Rows/s are
counted from the first unit's start to the last unit's commit (the manifest's
``units_span_s``). Measured here, each run its own process (an actor): one actor on 1 CPU; one
actor on the CPUs the pool gives each GPU actor (``pool.plan_pool``); as many 1-CPU actors at
once as there are cores (how actors in processes of their own scale). For a GPU node with 16
CPUs per GPU it prints a projection, not a measurement: the pool's actors per GPU, each at the
rate measured for one actor with its CPUs, times the scaling measured across actors.

    .venv/bin/python benchmarks/gpu_feed.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, record, stsb_sentences  # noqa: E402

from sbertray.ray_runtime import NUM_CPUS_ENV  # noqa: E402

CPUS_PER_GPU = 16  # an H200 node here: 16 CPU cores per GPU
FILE_ROWS = 20_000


def feed_only_backend():
    """The torch backend's encoder as a GPU actor gets it (its Rust tokenizer in processes, one
    per CPU of the actor; GPU batch sizes), with the model step skipped."""
    from dataclasses import replace

    import torch

    from sbertray.embed.backends import torch as torch_backend
    from sbertray.embed.backends.base import Backend
    from sbertray.embed.encoder import GPU_MAX_BATCH_ROWS, GPU_TOKEN_BUDGET, TextEncoder

    def build(spec, model_dir, model=None) -> TextEncoder:
        real = torch_backend.build(replace(spec, device="cpu"), model_dir, model)

        def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            torch.from_numpy(input_ids), torch.from_numpy(attention_mask)  # the host tensors
            return np.zeros((len(input_ids), real.dim), dtype=np.float32)

        return TextEncoder(
            real._tokenize,
            forward,
            dim=real.dim,
            max_seq_length=real.max_seq_length,
            pad_id=real.pad_id,
            token_budget=GPU_TOKEN_BUDGET,
            max_batch_rows=GPU_MAX_BATCH_ROWS,
            tokenize_processes=spec.threads or 1,
        )

    return Backend(name="feed-only", precisions={"cpu": ("fp32",)}, build=build)


def feed(input_dir: str, output_dir: str) -> dict:
    """One in-process run (no Ray; threads: the CPUs ``NUM_CPUS_ENV`` gives it) of the feed."""
    from sbertray.config import EmbedConfig, parse_config
    from sbertray.embed import backends
    from sbertray.embed.run import run_embed

    backends.register(feed_only_backend())
    config = parse_config(
        EmbedConfig,
        {
            "input": {"path": input_dir, "id_column": "id", "text_column": "text"},
            "output": {"path": output_dir},
            "compute": {"backend": "feed-only", "executor": "local"},
        },
    )
    summary = run_embed(config)
    timings = json.loads((Path(output_dir) / "_manifest.json").read_text())["timings"]
    return {"rows": summary.embedded_rows, "span_s": timings["units_span_s"]}


def write_inputs(root: Path, texts: list[str]) -> Path:
    folder = root / "in"
    folder.mkdir(parents=True)
    for n, ids in enumerate(np.array_split(np.arange(len(texts)), max(1, len(texts) // FILE_ROWS))):
        table = pa.table({"id": pa.array(ids, pa.int64()), "text": [texts[i] for i in ids]})
        pq.write_table(table, folder / f"part-{n}.parquet", row_group_size=4096)
    return folder


def feed_rates(folder: Path, work: Path, actors: int, cpus: int) -> list[float]:
    """Texts/s of each of ``actors`` feed processes run at once, each given ``cpus`` CPUs."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--feed",
                str(folder),
                str(work / f"out-{actors}x{cpus}-{i}"),
            ],
            env={**os.environ, NUM_CPUS_ENV: str(cpus)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(actors)
    ]
    rates = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"a feed process failed:\n{err[-3000:]}")
        result = json.loads(out.strip().splitlines()[-1])
        rates.append(result["rows"] / result["span_s"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--feed", nargs=2, help=argparse.SUPPRESS)  # one feed process
    args = parser.parse_args()
    if args.feed:
        print(json.dumps(feed(*args.feed)))
        return

    from sbertray.config import ComputeConfig
    from sbertray.embed.pool import plan_pool

    node = plan_pool(
        {"CPU": float(CPUS_PER_GPU), "GPU": 1.0}, ComputeConfig(), 10**6, cpus_per_gpu=CPUS_PER_GPU
    )
    cores = len(os.sched_getaffinity(0))
    texts = [f"{s} (#{i})" for i, s in enumerate(stsb_sentences(args.rows))]
    with tempfile.TemporaryDirectory(prefix="sbertray-feed-") as tmp:
        work = Path(tmp)
        folder = write_inputs(work, texts)
        with Timer() as t:
            rates = {cpus: feed_rates(folder, work, 1, cpus)[0] for cpus in sorted({1, cores})}
            together = feed_rates(folder, work, cores, 1)
    one = rates[1]
    scaling = sum(together) / (one * cores)
    actor_cpus = int(node.cpus_per_actor)
    if actor_cpus not in rates:
        sys.exit(f"the pool's GPU actors have {actor_cpus} CPUs; this machine has {cores}")
    per_gpu = node.num_actors * rates[actor_cpus] * scaling
    print(f"GPU feed ceiling (model step skipped), {args.rows:,} short texts, {t.seconds:.0f} s:")
    for cpus, rate in rates.items():
        print(f"  1 actor, {cpus} CPU(s): {rate:10,.0f} texts/s ({rate / (one * cpus):.0%} of "
              f"{cpus} x 1 CPU)")  # fmt: skip
    print(f"  {cores} actors of 1 CPU at once: {sum(together):10,.0f} texts/s ({scaling:.0%} of "
          f"{cores} x 1)")  # fmt: skip
    print(f"  projected for a GPU with {CPUS_PER_GPU} CPUs, as the pool plans it ({node.num_actors} "
          f"actors x {node.cpus_per_actor:g} CPU, {node.gpus_per_actor:g} GPU each; each at the "
          f"rate measured, times the scaling measured): {per_gpu:,.0f} texts/s (goal >= 150,000)")  # fmt: skip
    record(
        "gpu_feed",
        {
            "rows": args.rows,
            "texts_per_s": {
                **{f"1_actor_{cpus}_cpus": round(rate) for cpus, rate in rates.items()},
                f"{cores}_actors_1_cpu_each": round(sum(together)),
            },
            "scaling_across_actors": round(scaling, 3),
            "pool_16_cpus_per_gpu": {
                "actors": node.num_actors,
                "cpus_each": node.cpus_per_actor,
                "gpu_each": node.gpus_per_actor,
            },
            "projected_per_gpu_16_cpus": round(per_gpu),
        },
    )


if __name__ == "__main__":
    main()
