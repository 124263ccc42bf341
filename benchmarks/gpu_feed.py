"""The GPU feed ceiling, measured without a GPU: how many short texts/s the CPU side of a GPU
embedding actor can prepare, with the model step skipped.

Each run is ``run_embed`` over local Parquet with a benchmark-only backend, ``feed-only``: the
GPU actor's own tokenizer (the model's Hugging Face fast tokenizer) and batch sizes
(``GPU_TOKEN_BUDGET``, ``GPU_MAX_BATCH_ROWS``), padded batches turned into torch tensors, and a
forward that returns zero vectors instead of running the model. Everything else is the real
stage: reading, text checks, content keys, the repeated-text rule, output columns, writing and
committing the Parquet files. Pinning is skipped: it needs CUDA.

Texts are STS-B sentences made distinct (so the repeated-text rule saves nothing). Rows/s are
counted from the first unit's start to the last unit's commit (the manifest's
``units_span_s``), in one process given 1 CPU and then every core here, as a GPU actor is given
its node's CPUs per GPU (it tokenizes on all of them; units run one after another here, where
an actor overlaps two). The figure for 16 CPUs per GPU is a projection from the 1-CPU rate and
the scaling measured here, printed as such.

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
    """The torch backend's encoder as a GPU actor gets it (its Rust tokenizer on the actor's
    threads, GPU batch sizes), with the model step skipped."""
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
            tokenize_threads=spec.threads or 1,
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


def feed_rate(folder: Path, out: Path, cpus: int) -> float:
    """Texts/s of one feed process given ``cpus`` CPUs (its tokenizer threads)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--feed", str(folder), str(out)],
        env={**os.environ, NUM_CPUS_ENV: str(cpus)},
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"the feed process failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    return run["rows"] / run["span_s"]


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
            one = feed_rate(folder, work / "out-1", 1)
            every = feed_rate(folder, work / f"out-{cores}", cores)
    efficiency = every / (one * cores)
    per_gpu = one * CPUS_PER_GPU * efficiency
    print(f"GPU feed ceiling (model step skipped), {args.rows:,} short texts, {t.seconds:.0f} s:")
    print(f"  1 CPU:  {one:10,.0f} texts/s")
    print(f"  {cores} CPUs: {every:10,.0f} texts/s (scaling efficiency {efficiency:.0%})")
    print(
        f"  projected for a GPU actor with {CPUS_PER_GPU} CPUs (1 CPU's rate x {CPUS_PER_GPU} x "
        f"the efficiency measured here): {per_gpu:,.0f} texts/s (goal >= 150,000)"
    )
    record(
        "gpu_feed",
        {
            "rows": args.rows,
            "texts_per_s": {"1_cpu": round(one), f"{cores}_cpus": round(every)},
            "scaling_efficiency": round(efficiency, 3),
            "projected_per_gpu_16_cpus": round(per_gpu),
        },
    )


if __name__ == "__main__":
    main()
