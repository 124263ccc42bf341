"""Facts about this machine's hardware that configs, planners and backends all read: kept at
the bottom of the package so that any layer may ask without importing the layers above it."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at least as fast as fp32 instead of being emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, which containers and `taskset` narrow),
    not the machine's count."""
    return len(os.sched_getaffinity(0))


def has_cuda() -> bool:
    """A CUDA device torch can use (False where torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
