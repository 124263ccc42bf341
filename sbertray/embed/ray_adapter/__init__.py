"""Ray wiring for the embed driver; this package is the only place in ``embed/`` that imports
Ray (the plan phase's tasks are in ``tasks``).

Work units are the items of a Ray Data dataset; an actor pool of ``EmbedStage`` actors (fixed,
or autoscaling between the bounds ``pool.py`` plans) takes one unit per call. Reads and writes
happen inside the actors, so no separate read/write tasks wait for a CPU. Unit results travel
back as Ray Data rows (``_to_row`` / ``_from_row``).
"""

from __future__ import annotations

import json
import logging
import pickle
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace

import ray

from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed.donor_join import JoinedDonors
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.pool import PoolPlan, PoolSizeError
from sbertray.embed.results import UnitResult
from sbertray.embed.reuse import DonorIndex
from sbertray.embed.shards import WorkUnit
from sbertray.errors import UserError
from sbertray.ray_runtime import autoscaling_limits, init_ray

_JSON_FIELDS = (
    "bad_rows",
    "bad_examples",
    "files",
    "bad_files",
)  # nested: JSON in Ray Data result rows
# Earlier output rows for the units: one index all units share, or where each unit's own is
# (``join_donors``).
Donors = DonorIndex | JoinedDonors | None


def _to_row(result: UnitResult) -> dict:
    row = asdict(result)
    for key in _JSON_FIELDS:
        row[key] = json.dumps(row[key])
    return row


def _from_row(row: dict) -> UnitResult:
    row = dict(row)
    for key in _JSON_FIELDS:
        row[key] = json.loads(row[key])
    return UnitResult(**row)


def cluster_resources(address: str | None) -> tuple[dict[str, float], dict[str, float] | None]:
    """Joins (or starts) Ray; returns what the cluster has now, and what its autoscaler may
    grow it to (node types x their max workers) where Ray reports that, else None."""
    init_ray(address)
    limits = autoscaling_limits()
    return ray.cluster_resources(), limits


class _EmbedActor:
    """One ``EmbedStage`` per actor; each call is a batch of one work unit index."""

    def __init__(self, config: EmbedConfig, encoder: EncoderSpec, run_metadata: dict, shared: list):
        from sbertray.embed.stage import EmbedStage

        self.units, reference, donors = ray.get(shared)
        # One index every unit shares, or each unit's own (``join_donors``), read per unit.
        self.joined = donors if isinstance(donors, JoinedDonors) else None
        shared_index = None if self.joined is not None else donors
        self.stage = EmbedStage(config, encoder, run_metadata, reference, shared_index)

    def __del__(self) -> None:
        # Ray Data drops the actor's instance when the pool winds down, before the process ends.
        if hasattr(self, "stage"):
            self.stage.close()

    def __call__(self, batch: dict) -> dict:
        rows = [self._process(int(i)) for i in batch["unit"]]
        return {key: [r[key] for r in rows] for key in rows[0]}

    def _process(self, index: int) -> dict:
        """The unit's result row; an exception travels back in it (``raised``) so the driver
        re-raises it as it is, while a unit lost with its actor or node has no row at all."""
        try:
            donors = self.joined.read(index) if self.joined is not None else None
            return {**_to_row(self.stage.process(self.units[index], donors)), "raised": None}
        except Exception as exc:
            return {
                **_to_row(UnitResult(self.units[index].unit_id, 0)),
                "raised": _pickled(exc),
            }


def _pickled(exc: Exception) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:  # not picklable: its type, message and where it came from
        trace = "".join(traceback.format_exception(exc))
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}\n{trace}"))


def _embed_reference(config: EmbedConfig, encoder: EncoderSpec):
    from sbertray.embed.reference import embed_reference

    return embed_reference(config, encoder)


def _shared(
    config: EmbedConfig,
    units: list[WorkUnit],
    pool: PoolPlan,
    encoder: EncoderSpec,
    donors: Donors,
) -> list:
    """Object refs of what every actor reads: the units, the embedded reference set (a task
    sized like an actor) and the donor index. They go through the object store once (each node
    maps them, zero-copy), not into every actor's constructor arguments. Per-unit donors stay
    where the join left them, in files: only where each unit's are is shared."""
    reference = ray.put(None)
    if config.reference is not None:
        task = ray.remote(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor)(
            _embed_reference
        )
        # Relative paths as the driver sees them: the task's node runs in another directory.
        located = config.model_copy(deep=True)
        ref = located.reference
        ref.path = (
            storage.absolute(ref.path)
            if isinstance(ref.path, str)
            else [storage.absolute(p) for p in ref.path]
        )
        reference = task.remote(located, encoder)
    return [ray.put(units), reference, ray.put(donors)]


class UnitsLostError(UserError, RuntimeError):
    """Units whose actor or node was lost on every attempt."""


def run_units(
    config: EmbedConfig,
    units: list[WorkUnit],
    pool: PoolPlan,
    encoder: EncoderSpec,
    run_metadata: dict,
    donors: Donors = None,
    on_result: Callable[[UnitResult], None] | None = None,
) -> list[UnitResult]:
    """Embeds ``units`` on a pool of up to ``pool.num_actors`` actors; returns each unit's
    result, handing each to ``on_result`` as it arrives (progress).

    A crashed or killed actor is restarted and its unit retried by Ray. A unit whose actor
    cannot come back (its node is gone, and no node has room for it) is left out by Ray Data
    and run again in another round, on the actors there are then, up to
    ``compute.max_retries`` rounds; its result says which round (``attempt``) committed it.
    """
    shared = _shared(config, units, pool, encoder, donors)
    actor_args = {"config": config, "encoder": encoder, "run_metadata": run_metadata}
    results: dict[str, UnitResult] = {}
    pending = list(range(len(units)))
    rounds = config.compute.max_retries + 1
    for attempt in range(1, rounds + 1):
        if attempt > 1:
            print(
                f"[sbertray] {len(pending)} units were lost with their actor or node; running "
                f"them again (attempt {attempt} of {rounds})",
                flush=True,
            )
            # Whatever is left of the cluster: start with one actor, grow to the same bound.
            pool = replace(pool, min_actors=1)
        for row in _run_round(config, pending, pool, {**actor_args, "shared": shared}):
            if raised := row.pop("raised"):
                raise pickle.loads(raised)
            result = _from_row(row)
            result.attempt = attempt
            results[result.unit_id] = result
            if on_result is not None:
                on_result(result)
        pending = [i for i in pending if units[i].unit_id not in results]
        if not pending:
            return list(results.values())
    raise UnitsLostError(
        f"{len(pending)} units were lost with their actor or node on all {rounds} attempts "
        f"(`compute.max_retries: {config.compute.max_retries}`), e.g. "
        f"{units[pending[0]].unit_id}; see the run log. Rerun to finish them: committed "
        "units are kept"
    )


def _run_round(config: EmbedConfig, pending: list[int], pool: PoolPlan, actor_args: dict):
    """One Ray Data pass over the ``pending`` units; yields result rows as they arrive."""
    context = ray.data.DataContext.get_current()
    # sbertray reports progress from the units' own counts; Ray Data's bars and execution
    # banners come back with `--verbose`.
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    context.enable_progress_bars = context.print_on_execution_start = verbose
    # The pool's first actors must start within the timeout (nodes may be added meanwhile):
    # a pool no node can ever hold is an error, not a wait forever.
    context.wait_for_min_actors_s = config.compute.placement_timeout_s
    # A unit whose actor is gone for good does not end the pass: it is missing from the
    # results, and `run_units` runs it again. (Exceptions come back as rows, not errors.)
    context.max_errored_blocks = len(pending)
    # (A dataset keeps the context it was created with: set before creating it.)
    ds = ray.data.from_items([{"unit": i} for i in pending], override_num_blocks=len(pending))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_restarts / max_task_retries (and
        # ray_remote_args_fn) with no replacement for bounding actor retries yet; this one
        # warning is silenced here only.
        warnings.filterwarnings("ignore", message="`ray_remote_args(_fn)?` is deprecated")
        ds = ds.map_batches(
            _EmbedActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                min_size=pool.min_actors or pool.num_actors,
                max_size=pool.num_actors,
                max_concurrent_calls_per_actor=pool.calls_per_actor,
                enable_true_multi_threading=pool.calls_per_actor > 1,
            ),
            num_cpus=pool.cpus_per_actor,
            num_gpus=pool.gpus_per_actor,
            fn_constructor_kwargs=actor_args,
            # A killed or crashed actor is restarted and its unit retried; retries are safe
            # because a unit always rewrites the same output name with the same rows. Bounded:
            # Ray Data's default retries forever, never ending on a unit that always crashes.
            max_restarts=config.compute.max_retries,
            max_task_retries=config.compute.max_retries,
        )
    try:
        yield from ds.iter_rows()
    except ray.exceptions.GetTimeoutError:
        raise PoolSizeError(
            f"no embedding actor could start within {config.compute.placement_timeout_s}s "
            f"(`compute.placement_timeout_s`): each asks for {pool.cpus_per_actor:g} CPU"
            + (f" + {pool.gpus_per_actor:g} GPU" if pool.gpus_per_actor else "")
            + f"; the cluster has {_resources_now()} and no node that fits was added. Check "
            "the cluster's node types or `compute.device` / `compute.cpus_per_actor`"
        ) from None


def _resources_now() -> str:
    now = ray.cluster_resources()
    return ", ".join(f"{now.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


from sbertray.embed.ray_adapter.tasks import join_donors, repeated_id_hashes  # noqa: E402

__all__ = ["cluster_resources", "join_donors", "repeated_id_hashes", "run_units"]
