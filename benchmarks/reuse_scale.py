"""The second night at scale (issue 26): a reuse rerun's memory as the table grows.

N rows of distinct short texts in 16 Parquet files are embedded once (`compute.executor: ray`,
a one-layer 384-wide MiniLM, so vectors are MiniLM-sized and the model is cheap); then every
file is rewritten with 5% of texts edited and all rows shuffled across the files, as a daily
snapshot export does, and embedded again into a copy of the first output, once per way the
donors reach the units:

- **index**: the earlier output's vectors read into one index in the driver and shared with
  every actor through the object store (the only way before issue 26; still used below
  `compute.reuse_index_max_mb`);
- **join**: joined to each unit on Ray by content key (`embed/donor_join.py`).

Each run is an `sbertray embed` process; a sampler reads, every 0.2 s, the driver's RSS, the
largest Ray worker's (actors and tasks) RSS and private memory, and the shared memory in use
(Ray's object store lives in /dev/shm here). Goals: the join's driver and largest worker at the
largest N within 1.2x of the smallest N's.

    .venv/bin/python benchmarks/reuse_scale.py                # 100k and 1M rows
    .venv/bin/python benchmarks/reuse_scale.py --rows 100000,4000000 --ways join
    .venv/bin/python benchmarks/reuse_scale.py --ways join --where s3     # on the tests' S3 server
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pyarrow import fs as pafs

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import ROOT, record  # noqa: E402
from scale import tiny_text  # noqa: E402

from sbertray import storage  # noqa: E402

FILES = 16


class Sampler(threading.Thread):
    """Peaks, every 0.2 s: a process's RSS, its Ray workers' RSS and private memory (RSS less
    shared pages: a worker that reads objects maps the object store's pages, which count in its
    RSS but live once per node, in /dev/shm here), and the /dev/shm in use."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.stop = psutil.Process(pid), threading.Event()
        self.shm_base = shutil.disk_usage("/dev/shm").used
        self.driver = self.worker = self.worker_private = self.shm = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.driver = max(self.driver, self.proc.memory_info().rss)
                for child in self.proc.children(recursive=True):
                    try:
                        if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::"):
                            mem = child.memory_info()
                            self.worker = max(self.worker, mem.rss)
                            self.worker_private = max(self.worker_private, mem.rss - mem.shared)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.shm = max(self.shm, shutil.disk_usage("/dev/shm").used - self.shm_base)
            time.sleep(0.2)


def start_sampled(args: list[str], tree: Path = ROOT, stderr=subprocess.PIPE):
    """``python -m sbertray ARGS`` run from ``tree``'s code (its own Ray, not $RAY_ADDRESS's),
    with a started ``Sampler``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sbertray", *args],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    sampler = Sampler(proc.pid)
    sampler.start()
    return proc, sampler


def embed(config: Path) -> dict:
    """One `sbertray embed` process, sampled; its wall time, peaks and manifest totals."""
    start = time.perf_counter()
    proc, sampler = start_sampled(["embed", str(config)])
    out, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(out[-2000:] + err[-3000:])
    print("    " + "\n    ".join(line for line in out.splitlines() if "embedding" in line))
    path = yaml.safe_load(config.read_text())["output"]["path"]
    manifest = storage.read_bytes(storage.resolve(storage.join(path, "_manifest.json")))
    timings = json.loads(manifest)["timings"]
    phases = re.search(r"time by phase: plan ([\d.]+) s, embed ([\d.]+) s", out)
    mb = 1 << 20
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "plan_s": float(phases.group(1)),  # the donors' index or join included
        "embed_s": float(phases.group(2)),
        "driver_peak_mb": round(sampler.driver / mb),
        "largest_worker_mb": round(sampler.worker / mb),
        "largest_worker_private_mb": round(sampler.worker_private / mb),
        "shm_peak_mb": round(sampler.shm / mb),
        "texts_embedded": timings["texts_embedded"],
        "reused_rows": timings["reused_rows"],
    }


def write_snapshot(root: str, ids: np.ndarray, texts: list[str]) -> None:
    loc = storage.resolve(root)
    loc.fs.create_dir(loc.path, recursive=True)
    for n, part in enumerate(np.array_split(ids, FILES)):
        table = pa.table({"id": part, "text": [texts[i] for i in part]})
        with loc.fs.open_output_stream(f"{loc.path}/snapshot-{n:02d}.parquet") as f:
            pq.write_table(table, f, row_group_size=16_384)


def config(work: Path, base: str, name: str, model: str, index_max_mb: int) -> Path:
    path = work / f"{name}.yaml"
    settings = {
        "model": model,
        "input": {"path": f"{base}/in", "id_column": "id"},
        # Units of the same size at every N: an actor's memory follows its unit's rows.
        "output": {"path": f"{base}/{name}", "rows_per_file": 16_384},
        "compute": {"executor": "ray", "reuse_index_max_mb": index_max_mb},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def copy(src: str, dst: str) -> None:
    a, b = storage.resolve(src), storage.resolve(dst)
    pafs.copy_files(a.path, b.path, source_filesystem=a.fs, destination_filesystem=b.fs)


def night_two(work: Path, base: str, rows: int, model: str, ways: list[str]) -> dict:
    """``base``: where the input and outputs go, a local folder or an s3:// prefix."""
    rng = np.random.default_rng(0)
    texts = [tiny_text(i) for i in range(rows)]
    write_snapshot(f"{base}/in", np.arange(rows), texts)
    first = embed(config(work, base, "first", model, 0))
    print(f"  {rows:,} rows, first night: {first}", flush=True)
    for i in rng.choice(rows, rows // 20, replace=False):
        texts[i] += " (edited)"
    write_snapshot(f"{base}/in", rng.permutation(rows), texts)
    result = {"first": first}
    for way, bound in (("index", 1 << 30), ("join", 0)):
        if way not in ways:
            continue
        copy(f"{base}/first", f"{base}/{way}")
        result[way] = embed(config(work, base, way, model, bound))
        print(f"  {rows:,} rows, rerun by {way}: {result[way]}", flush=True)
        storage.delete(storage.resolve(f"{base}/{way}"))
    storage.delete(storage.resolve(base))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="100000,1000000", help="table sizes, comma-separated")
    parser.add_argument("--ways", default="index,join", help="index: needs ~6.4 KB a row of RAM")
    parser.add_argument("--where", default="local", help="local, s3 (the tests' S3 server) or both")
    args = parser.parse_args()
    ways = args.ways.split(",")
    sizes = [int(n) for n in args.rows.split(",")]
    from local_s3 import LocalS3

    results: dict = {}
    with (
        tempfile.TemporaryDirectory(prefix="sbertray-reuse-scale-") as tmp,
        LocalS3(volumes=600) as s3,
    ):
        os.environ.update(s3.env())
        s3.create_bucket("bench")
        os.environ["SBERTRAY_CACHE"] = tmp
        from tiny_model import tiny_model_path

        from sbertray.embed.prepared import prepare_model

        model = tiny_model_path()
        prepare_model(model, export=True)  # once, as for any model
        for where in args.where.split(","):
            for n in sizes:
                base = f"s3://bench/{n}" if where == "s3" else f"{tmp}/{n}"
                results[_key(where, n)] = night_two(Path(tmp), base, n, model, ways)
            small, large = results[_key(where, sizes[0])], results[_key(where, sizes[-1])]
            for way in ways:
                for measure in (
                    "driver_peak_mb",
                    "largest_worker_mb",
                    "largest_worker_private_mb",
                    "shm_peak_mb",
                ):
                    ratio = large[way][measure] / max(1, small[way][measure])
                    prefix = "" if where == "local" else "s3_"
                    results[f"{prefix}{way}_{measure}_ratio"] = round(ratio, 2)
                    print(f"  {where} {way}: {measure} {sizes[-1]:,} / {sizes[0]:,} = {ratio:.2f}x")
    record("reuse_scale", results)


def _key(where: str, rows: int) -> str:
    return str(rows) if where == "local" else f"s3-{rows}"


if __name__ == "__main__":
    main()
