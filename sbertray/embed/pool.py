"""Sizing the embedding actor pool from the resources Ray reports.

Reads and writes happen inside the actors (each reads its unit's row groups and commits its own
output file), so the pipeline has no separate read/write tasks waiting for a CPU: a pool that
fits in the cluster can always run to completion. A pool that does not fit would wait forever
for actors that can never start, so that is an error here, before any work.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sbertray.config import ComputeConfig
from sbertray.embed import backends
from sbertray.errors import UserError
from sbertray.ray_runtime import NUM_CPUS_ENV

# A GPU actor still tokenizes, reads and writes Parquet on the CPU.
CPUS_PER_GPU_ACTOR = 1.0
# Units one GPU actor works on at once: while one is on the GPU, the next is read and tokenized
# and the last written, so the GPU does not wait on the CPU (the encoder is thread-safe).
CALLS_PER_GPU_ACTOR = 2


class PoolSizeError(UserError, ValueError):
    """The requested pool cannot run on this cluster."""


@dataclass(frozen=True)
class PoolPlan:
    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # intra-op threads per actor: its CPU share
    device: str  # "cpu" | "cuda"
    calls_per_actor: int = 1  # units in flight per actor (CPU actors: 1, their cores are busy)
    in_process: bool = False  # the driver runs the units itself, no Ray (``compute.executor``)

    def describe(self) -> str:
        if self.in_process:
            return f"in this process (no Ray), {self.threads} thread(s)"
        each = f"{self.cpus_per_actor:g} CPU" + (
            f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        )
        return f"{self.num_actors} {self.device} actor(s), {each} each, {self.threads} thread(s)"


def plan_pool(cluster: dict[str, float], compute: ComputeConfig, num_units: int) -> PoolPlan:
    """Returns the pool for ``num_units`` work units on a cluster with ``cluster`` resources
    (``ray.cluster_resources()``).

    GPU actors: one per GPU (half precision). CPU actors: as many as there are CPUs (and units),
    each with an equal share of CPUs as threads, so actors never oversubscribe cores. Configs
    only CPU backends run (onnx, openvino; int8) get CPU actors on GPU clusters too.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    units = max(1, num_units)
    if compute.device == "cuda" and gpus < 1:
        raise PoolSizeError("`compute.device: cuda` but the Ray cluster reports no GPUs")
    if compute.device != "cpu" and gpus >= 1 and backends.may_run_on(compute, "cuda"):
        per_cpu = compute.cpus_per_actor or CPUS_PER_GPU_ACTOR
        wanted = compute.num_actors or int(gpus)
        if wanted > gpus:
            raise PoolSizeError(
                f"`compute.num_actors: {wanted}` GPU actors but the cluster has {gpus:g} GPUs"
            )
        actors = min(wanted, units)
        _check_cpus(actors, per_cpu, cpus)
        return PoolPlan(actors, per_cpu, 1.0, max(1, int(per_cpu)), "cuda", CALLS_PER_GPU_ACTOR)

    if cpus < 1:
        raise PoolSizeError(
            f"the Ray cluster reports {cpus:g} CPUs; an embedding actor needs at least 1"
        )
    if compute.cpus_per_actor:
        per_cpu = compute.cpus_per_actor
    else:
        # Fewer units than CPUs: give each actor more threads instead of idling cores.
        per_cpu = float(max(1, int(cpus // min(compute.num_actors or units, units, int(cpus)))))
    actors = min(compute.num_actors or max(1, int(cpus // per_cpu)), units)
    _check_cpus(actors, per_cpu, cpus)
    return PoolPlan(actors, per_cpu, 0.0, max(1, int(per_cpu)), "cpu")


def runs_in_process(compute: ComputeConfig, address: str | None, rows_to_embed: int) -> bool:
    """Whether the driver should run the units itself (``compute.executor``): small work on
    this machine, where starting a local Ray and its actors would cost more than the work."""
    if compute.executor != "auto":
        return compute.executor == "local"
    ray = sys.modules.get("ray")
    return (
        not (address or os.environ.get("RAY_ADDRESS"))
        and not (ray is not None and ray.is_initialized())
        and not (compute.device == "cuda" or _gpu_visible())
        and rows_to_embed <= compute.local_max_rows
    )


def in_process_pool() -> PoolPlan:
    """One in-process stage with a thread per core (capped like a local Ray's CPUs)."""
    cpus = len(os.sched_getaffinity(0))
    if os.environ.get(NUM_CPUS_ENV):
        cpus = min(cpus, int(os.environ[NUM_CPUS_ENV]))
    return PoolPlan(1, float(cpus), 0.0, cpus, "cpu", in_process=True)


def _gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, without importing torch or CUDA."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def _check_cpus(actors: int, per_cpu: float, cpus: float) -> None:
    if actors * per_cpu > cpus:
        raise PoolSizeError(
            f"{actors} actors x {per_cpu:g} CPUs = {actors * per_cpu:g} CPUs, but the cluster has "
            f"{cpus:g}: the pool could never start. Lower `compute.num_actors` or `compute.cpus_per_actor`"
        )
