"""The GPU feed ceiling, measured without a GPU: how many short texts/s the CPU side of a GPU
embedding actor can prepare, with the model step skipped.

Each run is ``run_embed`` over local Parquet with a benchmark-only backend, ``feed-only``: the
GPU actor's own tokenizer (the model's Hugging Face fast tokenizer, in tokenizer processes) and
batch sizes (``GPU_TOKEN_BUDGET``, ``GPU_MAX_BATCH_ROWS``), padded batches turned into torch
tensors, and a forward that returns zero vectors instead of running the model. Everything else
is the real stage: reading, text checks, content keys, the repeated-text rule, output columns,
writing and committing the Parquet files. Pinning is skipped: it needs CUDA.

Texts are STS-B sentences made distinct (so the repeated-text rule saves nothing). Rows/s are
counted from the first unit's start to the last unit's commit (the manifest's
``units_span_s``), in one process given 1 CPU and then every core here, as a GPU actor is given
its node's CPUs per GPU (it tokenizes on all of them). The 1-CPU run also times tokenizing
apart from the rest of the stage, which stays on the actor's own thread(s) whatever its CPUs.
For 16 CPUs per GPU it prints a projection, not a measurement: the rest of the stage as
measured plus tokenizing spread over 16 processes, one unit at a time (an actor overlaps two,
which can only do better, up to the rest's own limit, also printed).

    .venv/bin/python benchmarks/gpu_feed.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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


def feed_only_backend(tokenize_seconds: list[float]):
    """The torch backend's encoder as a GPU actor gets it (its Rust tokenizer in processes, one
    per CPU of the actor; GPU batch sizes), with the model step skipped. Time spent tokenizing
    is added to ``tokenize_seconds[0]``."""
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

        encoder = TextEncoder(
            real._tokenize,
            forward,
            dim=real.dim,
            max_seq_length=real.max_seq_length,
            pad_id=real.pad_id,
            token_budget=GPU_TOKEN_BUDGET,
            max_batch_rows=GPU_MAX_BATCH_ROWS,
            tokenize_processes=spec.threads or 1,
        )
        token_ids = encoder.token_ids

        def timed_token_ids(texts):
            start = time.perf_counter()
            tokens = token_ids(texts)
            tokenize_seconds[0] += time.perf_counter() - start
            return tokens

        encoder.token_ids = timed_token_ids
        return encoder

    return Backend(name="feed-only", precisions={"cpu": ("fp32",)}, build=build)


def feed(input_dir: str, output_dir: str) -> dict:
    """One in-process run (no Ray; threads: the CPUs ``NUM_CPUS_ENV`` gives it) of the feed."""
    from sbertray.config import EmbedConfig, parse_config
    from sbertray.embed import backends
    from sbertray.embed.run import run_embed

    tokenize_seconds = [0.0]  # units run one after another in-process: no overlap to count
    backends.register(feed_only_backend(tokenize_seconds))
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
    return {
        "rows": summary.embedded_rows,
        "span_s": timings["units_span_s"],
        "tokenize_s": tokenize_seconds[0],
    }


def write_inputs(root: Path, texts: list[str]) -> Path:
    folder = root / "in"
    folder.mkdir(parents=True)
    for n, ids in enumerate(np.array_split(np.arange(len(texts)), max(1, len(texts) // FILE_ROWS))):
        table = pa.table({"id": pa.array(ids, pa.int64()), "text": [texts[i] for i in ids]})
        pq.write_table(table, folder / f"part-{n}.parquet", row_group_size=4096)
    return folder


def feed_run(folder: Path, out: Path, cpus: int) -> dict:
    """One feed process given ``cpus`` CPUs (its tokenizer processes): rows, span, tokenizing."""
    proc = subprocess.run(
        [sys.executable, __file__, "--feed", str(folder), str(out)],
        env={**os.environ, NUM_CPUS_ENV: str(cpus)},
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"the feed process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--feed", nargs=2, help=argparse.SUPPRESS)  # one feed process
    args = parser.parse_args()
    if args.feed:
        print(json.dumps(feed(*args.feed)))
        return

    cores = len(os.sched_getaffinity(0))
    texts = [f"{s} (#{i})" for i, s in enumerate(stsb_sentences(args.rows))]
    with tempfile.TemporaryDirectory(prefix="sbertray-feed-") as tmp:
        work = Path(tmp)
        folder = write_inputs(work, texts)
        with Timer() as t:
            one = feed_run(folder, work / "out-1", 1)
            every = feed_run(folder, work / f"out-{cores}", cores)
    one_rate, every_rate = one["rows"] / one["span_s"], every["rows"] / every["span_s"]
    efficiency = every_rate / (one_rate * cores)
    rest_s = one["span_s"] - one["tokenize_s"]  # the stage around tokenizing, per process
    per_gpu = one["rows"] / (rest_s + one["tokenize_s"] / CPUS_PER_GPU)
    rest_limit = one["rows"] / rest_s
    print(f"GPU feed ceiling (model step skipped), {args.rows:,} short texts, {t.seconds:.0f} s:")
    print(f"  1 CPU:  {one_rate:10,.0f} texts/s ({one['tokenize_s'] / one['span_s']:.0%} of it "
          f"tokenizing, {rest_s:.2f} s the rest of the stage)")  # fmt: skip
    print(f"  {cores} CPUs: {every_rate:10,.0f} texts/s (scaling efficiency {efficiency:.0%})")
    print(f"  projected for a GPU actor with {CPUS_PER_GPU} CPUs (the rest of the stage as "
          f"measured + tokenizing over {CPUS_PER_GPU} processes): {per_gpu:,.0f} texts/s (goal "
          f">= 150,000); the rest of the stage alone allows {rest_limit:,.0f}")  # fmt: skip
    record(
        "gpu_feed",
        {
            "rows": args.rows,
            "tokenizer": "processes",
            "texts_per_s": {"1_cpu": round(one_rate), f"{cores}_cpus": round(every_rate)},
            "scaling_efficiency": round(efficiency, 3),
            "tokenize_share_1_cpu": round(one["tokenize_s"] / one["span_s"], 3),
            "projected_per_gpu_16_cpus": round(per_gpu),
            "rest_of_stage_limit": round(rest_limit),
        },
    )


if __name__ == "__main__":
    main()
