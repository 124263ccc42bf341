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

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import ROOT, record  # noqa: E402
from scale import tiny_text  # noqa: E402

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


def embed(config: Path) -> dict:
    """One `sbertray embed` process, sampled; its wall time, peaks and manifest totals."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sbertray", "embed", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(out[-2000:] + err[-3000:])
    print("    " + "\n    ".join(line for line in out.splitlines() if "embedding" in line))
    path = yaml.safe_load(config.read_text())["output"]["path"]
    timings = json.loads((Path(path) / "_manifest.json").read_text())["timings"]
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


def write_snapshot(root: Path, ids: np.ndarray, texts: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for n, part in enumerate(np.array_split(ids, FILES)):
        table = pa.table({"id": part, "text": [texts[i] for i in part]})
        pq.write_table(table, root / f"snapshot-{n:02d}.parquet", row_group_size=16_384)


def config(work: Path, name: str, model: str, index_max_mb: int) -> Path:
    path = work / f"{name}.yaml"
    settings = {
        "model": model,
        "input": {"path": str(work / "in"), "id_column": "id"},
        # Units of the same size at every N: an actor's memory follows its unit's rows.
        "output": {"path": str(work / name), "rows_per_file": 16_384},
        "compute": {"executor": "ray", "reuse_index_max_mb": index_max_mb},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def night_two(work: Path, rows: int, model: str, ways: list[str]) -> dict:
    rng = np.random.default_rng(0)
    texts = [tiny_text(i) for i in range(rows)]
    write_snapshot(work / "in", np.arange(rows), texts)
    first = embed(config(work, "first", model, 0))
    print(f"  {rows:,} rows, first night: {first}")
    for i in rng.choice(rows, rows // 20, replace=False):
        texts[i] += " (edited)"
    write_snapshot(work / "in", rng.permutation(rows), texts)
    result = {"first": first}
    for way, bound in (("index", 1 << 30), ("join", 0)):
        if way not in ways:
            continue
        shutil.copytree(work / "first", work / way)
        result[way] = embed(config(work, way, model, bound))
        print(f"  {rows:,} rows, rerun by {way}: {result[way]}")
        shutil.rmtree(work / way)
    shutil.rmtree(work / "first")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="100000,1000000", help="table sizes, comma-separated")
    parser.add_argument("--ways", default="index,join", help="index: needs ~6.4 KB a row of RAM")
    args = parser.parse_args()
    ways = args.ways.split(",")
    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="sbertray-reuse-scale-") as tmp:
        os.environ["SBERTRAY_CACHE"] = tmp
        from tiny_model import tiny_model_path

        from sbertray.embed.prepared import prepare_model

        model = tiny_model_path()
        prepare_model(model, export=True)  # once, as for any model
        results = {str(n): night_two(Path(tmp) / str(n), n, model, ways) for n in sizes}
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    for way in ways:
        for key in (
            "driver_peak_mb",
            "largest_worker_mb",
            "largest_worker_private_mb",
            "shm_peak_mb",
        ):
            ratio = large[way][key] / max(1, small[way][key])
            results[f"{way}_{key}_ratio"] = round(ratio, 2)
            print(f"  {way}: {key} {sizes[-1]:,} / {sizes[0]:,} rows = {ratio:.2f}x")
    record("reuse_scale", results)


if __name__ == "__main__":
    main()
