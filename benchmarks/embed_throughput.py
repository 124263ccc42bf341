"""Embedding throughput, measured side by side in one run on the same texts:

1. plain `SentenceTransformer.encode` in one process over all texts in memory (the reference);
2. the naive Ray Data pattern: read_parquet -> map_batches(callable class calling encode,
   default batch size, a fixed pool of 1 actor that leaves a CPU free) -> write_parquet;
3. `sbertray embed`, Parquet -> Parquet on local disk: the default (auto: OpenVINO, bf16 where
   native), fp32 (auto backend: OpenVINO), fp32 and bf16 on the torch backend, int8 ONNX;
4. the same with input and output on S3 (a local SeaweedFS server).

Prints rows/s, the ratios 3/1, 4/1, 3/2 and the peak RSS of each job (driver + Ray workers),
and appends them to benchmarks/results.json. The model's ONNX export (once per model, cached
next to it or in ~/.cache/sbertray) is made before the timed runs and its time printed.

    .venv/bin/python benchmarks/embed_throughput.py --rows 4000          # a few minutes
    .venv/bin/python benchmarks/embed_throughput.py --rows 20000 --long  # ~200-token texts
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _common import Timer, record, stsb_sentences  # noqa: E402

SHARDS = 8


class PeakRSS:
    """Samples the summed RSS of this process and its descendants: the local Ray it started
    (GCS, raylet, actors), so other work on the machine is not counted."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # exited between listing and reading
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_texts(rows: int, long: bool) -> list[str]:
    base = stsb_sentences(rows * (12 if long else 1))
    if not long:
        return base
    return [" ".join(base[i * 12 : (i + 1) * 12]) for i in range(rows)]  # ~200 tokens each


def write_shards(fs, root: str, texts: list[str]) -> None:
    fs.create_dir(root, recursive=True)
    per = -(-len(texts) // SHARDS)
    for n in range(SHARDS):
        part = texts[n * per : (n + 1) * per]
        table = pa.table(
            {"id": pa.array(range(n * per, n * per + len(part)), pa.int64()), "text": part}
        )
        with fs.open_output_stream(f"{root}/shard-{n}.parquet") as f:
            pq.write_table(table, f, row_group_size=1024)


def plain_encode(texts: list[str]) -> float:
    from sentence_transformers import SentenceTransformer

    from sbertray.modeling import bundled_model_path

    model = SentenceTransformer(bundled_model_path(), device="cpu")
    with Timer() as t:
        model.encode(texts, batch_size=32)
    return t.seconds


class NaiveEncoder:
    """The pattern from Ray's docs: a callable class that calls encode on each batch."""

    def __init__(self):
        from sentence_transformers import SentenceTransformer

        from sbertray.modeling import bundled_model_path

        self.model = SentenceTransformer(bundled_model_path(), device="cpu")

    def __call__(self, batch):
        batch["embedding"] = list(self.model.encode(list(batch["text"])))
        return batch


def naive_ray(in_dir: str, out_dir: str) -> float:
    import ray

    with Timer() as t:
        ds = ray.data.read_parquet(in_dir)
        ds = ds.map_batches(NaiveEncoder, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        ds.write_parquet(out_dir)
    return t.seconds


def sbertray_embed(in_path: str, out_path: str, precision: str, backend: str = "auto") -> float:
    from sbertray.config import EmbedConfig, parse_config
    from sbertray.embed.run import run_embed

    config = parse_config(
        EmbedConfig,
        {
            "input": {"path": in_path, "id_column": "id", "text_column": "text"},
            "output": {"path": out_path, "rows_per_file": 1024},
            "compute": {"precision": precision, "backend": backend},
        },
    )
    with Timer() as t:
        run_embed(config)
    return t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--long", action="store_true", help="~200-token texts (like seed 003)")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()

    import pyarrow.fs as pafs
    import ray
    from local_s3 import LocalS3

    from sbertray.embed import exported
    from sbertray.modeling import bundled_model_path
    from sbertray.ray_runtime import init_ray

    texts = make_texts(args.rows, args.long)
    work = Path(tempfile.mkdtemp(prefix="sbertray-bench-"))
    s3 = None if args.skip_s3 else LocalS3()
    seconds, rss = {}, {}
    try:
        write_shards(pafs.LocalFileSystem(), str(work / "in"), texts)
        if s3:
            s3.start()
            os.environ.update(s3.env())  # before Ray starts, so its workers inherit them
            s3.create_bucket("bench")
            write_shards(s3.filesystem(), "bench/in", texts)
        with Timer() as export:
            for precision in ("fp32", "int8"):
                exported.ensure(bundled_model_path(), precision)
        print(f"ONNX export + int8 quantization (cached after): {export.seconds:.1f}s", flush=True)
        init_ray()
        local = str(work / "in")

        def embed(name: str, precision: str, backend: str = "auto"):
            return lambda: sbertray_embed(local, str(work / name), precision, backend)

        runs = [
            ("1_plain_encode_fp32", lambda: plain_encode(texts)),
            ("2_naive_ray_data", lambda: naive_ray(local, str(work / "naive"))),
            ("3_sbertray_local", embed("default", "auto")),
            ("3_sbertray_local_fp32", embed("fp32", "fp32")),
            ("3_sbertray_local_torch_fp32", embed("torch_fp32", "fp32", "torch")),
            ("3_sbertray_local_torch_bf16", embed("torch_bf16", "bf16", "torch")),
            ("3_sbertray_local_int8_onnx", embed("int8", "int8", "onnx")),
        ]
        if s3:
            runs.append(
                ("4_sbertray_s3", lambda: sbertray_embed("s3://bench/in", "s3://bench/out", "auto"))
            )
        for name, run in runs:
            with PeakRSS() as mem:
                seconds[name] = run()
            rss[name] = mem.peak
            print(
                f"{name:<28} {len(texts) / seconds[name]:>9,.0f} rows/s  "
                f"peak RSS {mem.peak / 2**30:.2f} GiB",
                flush=True,
            )
    finally:
        ray.shutdown()
        if s3:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    rate = {k: len(texts) / v for k, v in seconds.items()}
    ratios = {
        "3/1 (sbertray default / plain fp32)": rate["3_sbertray_local"]
        / rate["1_plain_encode_fp32"],
        "3fp32/1 (sbertray fp32 / plain fp32)": rate["3_sbertray_local_fp32"]
        / rate["1_plain_encode_fp32"],
        "3torch_fp32/1 (sbertray torch fp32 / plain fp32)": rate["3_sbertray_local_torch_fp32"]
        / rate["1_plain_encode_fp32"],
        "3int8/1 (sbertray int8 onnx / plain fp32)": rate["3_sbertray_local_int8_onnx"]
        / rate["1_plain_encode_fp32"],
        "3/2 (sbertray / naive Ray Data)": rate["3_sbertray_local"] / rate["2_naive_ray_data"],
    }
    if s3:
        ratios["4/1 (sbertray on S3 / plain fp32)"] = (
            rate["4_sbertray_s3"] / rate["1_plain_encode_fp32"]
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    record(
        "embed_throughput",
        {
            "rows": len(texts),
            "long_texts": args.long,
            "rows_per_s": {k: round(v, 1) for k, v in rate.items()},
            "peak_rss_gib": {k: round(v / 2**30, 2) for k, v in rss.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
        },
    )


if __name__ == "__main__":
    main()
