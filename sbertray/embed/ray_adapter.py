"""Ray Data wiring for the embed driver; the only module in ``embed/`` that imports Ray.

Work units are the items of a Ray Data dataset; a fixed-size actor pool of ``EmbedStage``
actors takes one unit per call. Reads and writes happen inside the actors, so no separate
read/write tasks wait for a CPU (see ``pool.py``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import ray

from sbertray.config import EmbedConfig
from sbertray.embed.commit import UnitResult
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.pool import PoolPlan
from sbertray.embed.reuse import DonorIndex
from sbertray.embed.shards import WorkUnit
from sbertray.ray_runtime import init_ray


def cluster_resources(address: str | None) -> dict[str, float]:
    """Joins (or starts) Ray and returns what the cluster has."""
    init_ray(address)
    return ray.cluster_resources()


class _EmbedActor:
    """One ``EmbedStage`` per actor; each call is a batch of one work unit index."""

    def __init__(self, config: EmbedConfig, encoder: EncoderSpec, run_metadata: dict, shared: list):
        from sbertray.embed.stage import EmbedStage

        self.units, reference, donors = ray.get(shared)
        self.stage = EmbedStage(config, encoder, run_metadata, reference, donors)

    def __call__(self, batch: dict) -> dict:
        rows = [self.stage.process(self.units[int(i)]).to_row() for i in batch["unit"]]
        return {key: [r[key] for r in rows] for key in rows[0]}


def _embed_reference(config: EmbedConfig, encoder: EncoderSpec):
    from sbertray.embed.stage import embed_reference

    return embed_reference(config, encoder)


def run_units(
    config: EmbedConfig,
    units: list[WorkUnit],
    pool: PoolPlan,
    encoder: EncoderSpec,
    run_metadata: dict,
    donors: DonorIndex | None = None,
    on_result: Callable[[UnitResult], None] | None = None,
) -> list[UnitResult]:
    """Embeds ``units`` on a pool of ``pool.num_actors`` actors; returns each unit's result,
    handing each to ``on_result`` as it arrives (progress)."""
    reference = None
    if config.reference is not None:
        task = ray.remote(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor)(
            _embed_reference
        )
        reference = task.remote(config, encoder)
    # Units, the reference set and the donor index go through the object store once (each
    # node maps it, zero-copy), not into every actor's constructor arguments.
    shared = [
        ray.put(units),
        reference if reference is not None else ray.put(None),
        ray.put(donors),
    ]
    ds = ray.data.from_items(
        [{"unit": i} for i in range(len(units))], override_num_blocks=len(units)
    )
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_restarts / max_task_retries (and
        # ray_remote_args_fn) with no replacement for bounding actor retries yet; this one
        # warning is silenced here only.
        warnings.filterwarnings("ignore", message="`ray_remote_args(_fn)?` is deprecated")
        ds = ds.map_batches(
            _EmbedActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=pool.num_actors,
                max_concurrent_calls_per_actor=pool.calls_per_actor,
                enable_true_multi_threading=pool.calls_per_actor > 1,
            ),
            num_cpus=pool.cpus_per_actor,
            num_gpus=pool.gpus_per_actor,
            fn_constructor_kwargs={
                "config": config,
                "encoder": encoder,
                "run_metadata": run_metadata,
                "shared": shared,
            },
            # A killed or crashed actor is restarted and its unit retried; retries are safe
            # because a unit always rewrites the same output name with the same rows. Bounded:
            # Ray Data's default retries forever, never ending on a unit that always crashes.
            max_restarts=config.compute.max_retries,
            max_task_retries=config.compute.max_retries,
        )
    context = ray.data.DataContext.get_current()
    # sbertray reports progress from the units' own counts; Ray Data's bars and execution
    # banners come back with `--verbose`.
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    context.enable_progress_bars = context.print_on_execution_start = verbose
    results = []
    for row in ds.iter_rows():
        results.append(UnitResult.from_row(row))
        if on_result is not None:
            on_result(results[-1])
    return results
