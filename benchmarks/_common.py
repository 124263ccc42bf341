"""Shared helpers for the benchmark scripts: STS-B text, results file, timing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STSB = ROOT.parent / "shared" / "data" / "stsb"
RESULTS = Path(__file__).with_name("results.json")
# The tests' throwaway S3 server (tests/local_s3.py) serves the benchmarks too.
sys.path.insert(0, str(ROOT / "tests"))


def stsb_rows(split: str = "train") -> list[tuple[str, str, float]]:
    lines = (STSB / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(a, b, float(s)) for a, b, s in (line.split("\t") for line in lines)]


def stsb_sentences(n: int) -> list[str]:
    """n STS-B sentences (train then dev, repeated as needed)."""
    pool = [s for a, b, _ in stsb_rows("train") + stsb_rows("dev") for s in (a, b)]
    return [pool[i % len(pool)] for i in range(n)]


def record(name: str, result: dict) -> None:
    """Appends one run to benchmarks/results.json with the machine it ran on."""
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    runs.append(
        {
            "benchmark": name,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "cpus": torch.get_num_threads(),
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
            **result,
        }
    )
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def run_sbertray(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """One ``python -m sbertray ...`` process on a local Ray of its own; its wall time and
    output. Exits with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with Timer() as t:
        proc = subprocess.run(
            [sys.executable, "-m", "sbertray", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return t.seconds, proc
