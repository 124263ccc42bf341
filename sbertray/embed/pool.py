"""Sizing the embedding actor pool from the resources Ray reports.

Reads and writes happen inside the actors (each reads its unit's row groups and commits its own
output file), so the pipeline has no separate read/write tasks waiting for a CPU: a pool that
fits in the cluster can always run to completion. A pool that does not fit would wait forever
for actors that can never start, so that is an error here, before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sbertray.config import ComputeConfig
from sbertray.embed import backends
from sbertray.errors import UserError
from sbertray.hardware import usable_cpus
from sbertray.ray_runtime import NUM_CPUS_ENV, ray_running

# A GPU actor reads, tokenizes and writes Parquet on its CPUs: a MiniLM-size model leaves a GPU
# idle behind one actor. Actors in processes of their own scale with CPUs far better than one
# actor's tokenizer processes do (benchmarks/gpu_feed.py), because the rest of a unit's work
# (Parquet, keys, padding) stays on the actor's own thread. So a GPU is shared (fractional
# GPUs) by an actor per GPU_ACTOR_CPUS of its node's CPUs, up to MAX_ACTORS_PER_GPU (each holds
# a CUDA context and two units' batches, by estimate up to about 2 GB); with the node's CPUs
# per GPU unknown, one actor per GPU with GPU_ACTOR_CPUS.
GPU_ACTOR_CPUS = 1
MAX_ACTORS_PER_GPU = 16
# Units one GPU actor works on at once: while one is on the GPU, the next is read and tokenized
# and the last written, so the GPU does not wait on the CPU (the encoder is thread-safe).
CALLS_PER_GPU_ACTOR = 2


class PoolSizeError(UserError, ValueError):
    """The requested pool cannot run on this cluster."""


@dataclass(frozen=True)
class PoolPlan:
    num_actors: int  # the most actors the pool grows to
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # intra-op threads per actor: its CPU share
    device: str  # "cpu" | "cuda"
    calls_per_actor: int = 1  # units in flight per actor (CPU actors: 1, their cores are busy)
    in_process: bool = False  # the driver runs the units itself, no Ray (``compute.executor``)
    min_actors: int = 0  # the pool starts with this many; 0: num_actors (a fixed pool)

    @property
    def autoscaling(self) -> bool:
        return 0 < self.min_actors < self.num_actors

    def describe(self) -> str:
        if self.in_process:
            return f"in this process (no Ray), {self.threads} thread(s)"
        each = f"{self.cpus_per_actor:g} CPU" + (
            f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        )
        count = (
            f"{self.min_actors}-{self.num_actors} (autoscaling)"
            if self.autoscaling
            else str(self.num_actors)
        )
        return f"{count} {self.device} actor(s), {each} each, {self.threads} thread(s)"


def plan_pool(
    cluster: dict[str, float],
    compute: ComputeConfig,
    num_units: int,
    limits: dict[str, float] | None = None,
    cpus_per_gpu: float | None = None,
) -> PoolPlan:
    """Returns the pool for ``num_units`` work units on a cluster with ``cluster`` resources now
    (``ray.cluster_resources()``) and ``limits``, what its autoscaler may grow it to (None: not
    known, or no autoscaler). ``cpus_per_gpu``: the fewest CPUs per GPU of its GPU nodes
    (``ray_runtime.cpus_per_gpu``; None: not known).

    GPU actors (half precision): ``compute.actors_per_gpu`` per GPU, or one per GPU_ACTOR_CPUS
    of the node's CPUs per GPU (at most MAX_ACTORS_PER_GPU), sharing those CPUs. CPU actors: one
    per CPU share, each with its share as threads, so actors never oversubscribe cores. The pool
    starts with the actors the cluster can place now (at least one: on a cold cluster the
    autoscaler adds a node for it) and grows to what the limits allow, as Ray Data's autoscaling
    actor pool. Configs only CPU backends run (onnx, openvino; int8) get CPU actors on GPU
    clusters too.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    # A cold cluster whose autoscaler does not say what it can add: ask, and let the bounded
    # wait for the first actor (`compute.placement_timeout_s`) catch a pool that never starts.
    known = limits is not None or cpus >= 1
    most = {k: max(float((limits or {}).get(k, 0)), v) for k, v in (("CPU", cpus), ("GPU", gpus))}
    units = max(1, num_units)
    gpu_possible = most["GPU"] >= 1 or (not known and compute.device == "cuda")
    if compute.device == "cuda" and not gpu_possible:
        raise PoolSizeError(
            "`compute.device: cuda` but the Ray cluster reports no GPUs, and no node type its "
            "autoscaler can add has any"
        )
    if compute.device != "cpu" and gpu_possible and backends.may_run_on(compute, "cuda"):
        return _gpu_pool(compute, units, most, gpus, known, int(cpus_per_gpu or 0))
    if known and most["CPU"] < 1:
        raise PoolSizeError(
            f"the Ray cluster reports {cpus:g} CPUs and no node type its autoscaler can add has "
            "any; an embedding actor needs at least 1"
        )
    return _cpu_pool(compute, units, most, cpus, known)


def _gpu_pool(
    compute: ComputeConfig,
    units: int,
    most: dict[str, float],
    gpus_now: float,
    known: bool,
    node_cpus: int,
) -> PoolPlan:
    """GPU actors sharing each GPU and its node's CPUs per GPU (``plan_pool``)."""
    per_gpu = compute.actors_per_gpu or min(MAX_ACTORS_PER_GPU, max(1, node_cpus // GPU_ACTOR_CPUS))
    per_cpu = compute.cpus_per_actor or float(max(GPU_ACTOR_CPUS, node_cpus // per_gpu))
    slots = int(most["GPU"]) * per_gpu
    wanted = compute.num_actors or compute.max_actors or slots or units
    if compute.num_actors and known and wanted > slots:
        raise PoolSizeError(
            f"`compute.num_actors: {wanted}` GPU actors but the cluster has {most['GPU']:g} "
            f"GPUs x {per_gpu} actor(s) each (`compute.actors_per_gpu`)"
        )
    actors = min(wanted, units)
    if known:
        _check_cpus(actors if compute.num_actors else 1, per_cpu, most["CPU"])
    low = _min_actors(compute, actors, int(gpus_now) * per_gpu)
    threads = max(1, int(per_cpu))
    return PoolPlan(
        actors, per_cpu, 1.0 / per_gpu, threads, "cuda", CALLS_PER_GPU_ACTOR, False, low
    )


def _cpu_pool(
    compute: ComputeConfig, units: int, most: dict[str, float], cpus_now: float, known: bool
) -> PoolPlan:
    """CPU actors, one per CPU share, each with its share as threads (``plan_pool``)."""
    if compute.cpus_per_actor:
        per_cpu = compute.cpus_per_actor
    elif cpus_now >= 1:
        # Fewer units than CPUs: give each actor more threads instead of idling cores.
        share = min(compute.num_actors or units, units, int(cpus_now))
        per_cpu = float(max(1, int(cpus_now // share)))
    else:  # a cold cluster: the nodes to come are not known yet
        per_cpu = 1.0
    fits = max(1, int(most["CPU"] // per_cpu)) if known else units
    actors = min(compute.num_actors or compute.max_actors or fits, units)
    if known:
        _check_cpus(actors if compute.num_actors else 1, per_cpu, most["CPU"])
    low = _min_actors(compute, actors, int(cpus_now // per_cpu))
    return PoolPlan(actors, per_cpu, 0.0, max(1, int(per_cpu)), "cpu", 1, False, low)


def _min_actors(compute: ComputeConfig, actors: int, placeable_now: int) -> int:
    """The pool's starting size: what fits now (at least one), or ``compute.min_actors``."""
    if compute.num_actors:
        return actors
    return min(actors, compute.min_actors or max(1, placeable_now))


def runs_in_process(compute: ComputeConfig, address: str | None, rows_to_embed: int) -> bool:
    """Whether the driver should run the units itself (``compute.executor``): small work on
    this machine, where starting a local Ray and its actors would cost more than the work."""
    if compute.executor != "auto":
        return compute.executor == "local"
    return (
        not (address or os.environ.get("RAY_ADDRESS"))
        and not ray_running()
        and not (compute.device == "cuda" or _gpu_visible())
        and rows_to_embed <= compute.local_max_rows
    )


def in_process_pool() -> PoolPlan:
    """One in-process stage with a thread per core (capped like a local Ray's CPUs)."""
    cpus = usable_cpus()
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
    if actors and actors * per_cpu > cpus:
        raise PoolSizeError(
            f"{actors} actors x {per_cpu:g} CPUs = {actors * per_cpu:g} CPUs, but the cluster has "
            f"{cpus:g}: the pool could never start. Lower `compute.num_actors` or `compute.cpus_per_actor`"
        )
