"""The plan phase's Ray tasks: the id check's map/reduce (``checks.check_ids``) and the donor
join (``donor_join``). This process submits them and holds object references only."""

from __future__ import annotations

import numpy as np
import ray

from sbertray import storage
from sbertray.config import EmbedConfig
from sbertray.embed import donor_join
from sbertray.embed.checks import map_hashes, repeated_hashes
from sbertray.embed.reuse import DonorFile
from sbertray.embed.shards import EmbedInputError, InputFile, WorkUnit

_MAPS_IN_FLIGHT = 8  # id-check maps running at once


def _map_hashes_task(config: EmbedConfig, files: list[InputFile], buckets: int):
    """``checks.map_hashes`` as a Ray task of ``buckets`` returns."""
    return _returns(map_hashes(config, files, buckets), buckets)


def repeated_id_hashes(
    config: EmbedConfig, chunks: list[list[InputFile]], buckets: int, planned: list[np.ndarray]
) -> np.ndarray:
    """The id check's map/reduce (``checks.check_ids``) as Ray tasks: this process holds object
    refs only."""
    # No CPU asked: reading ids is I/O, short, and runs before any actor, so it must not wait
    # for a node to be added (the pool's own wait is bounded by `compute.placement_timeout_s`).
    map_task = ray.remote(num_cpus=0, num_returns=buckets)(_map_hashes_task)
    reduce_task = ray.remote(num_cpus=0)(repeated_hashes)
    mapped = [[ray.put(part) for part in planned]]
    for wave in range(0, len(chunks), _MAPS_IN_FLIGHT):
        refs = [
            map_task.remote(config, files, buckets)
            for files in chunks[wave : wave + _MAPS_IN_FLIGHT]
        ]
        refs = [_refs(r, buckets) for r in refs]
        ray.wait([r[0] for r in refs], num_returns=len(refs))
        mapped += refs
    try:
        parts = ray.get([reduce_task.remote(*[m[b] for m in mapped]) for b in range(buckets)])
    except ray.exceptions.RayTaskError as exc:  # a map's null id or unreadable column
        if isinstance(exc.cause, EmbedInputError):
            raise exc.cause from None
        raise
    return np.concatenate(parts)


def _returns(values: list, count: int):
    """A task's ``count`` returns: Ray takes a single return as the value itself."""
    return values[0] if count == 1 else values


def _refs(refs, count: int) -> list:
    return [refs] if count == 1 else list(refs)


def _keys_task(config, content_hash, units, indexes, buckets):
    pieces = donor_join.unit_key_pieces(config, content_hash, units, indexes, buckets)
    return _returns(pieces, buckets)


def _donor_task(out, paths, columns, buckets):
    return _returns(donor_join.donor_pieces(out, paths, columns, buckets), buckets)


def _join_task(group_of_unit, units, *pieces):
    pieces, matched = donor_join.join_bucket(pieces[:units], pieces[units:], group_of_unit)
    return [*pieces, matched]


def _gather_task(units, *pieces):
    return donor_join.gather_group(list(pieces), units)


def join_donors(
    config: EmbedConfig,
    units: list[WorkUnit],
    out: storage.Location,
    donors: list[DonorFile],
    columns: list[str],
    content_hash: str,
) -> tuple[list[tuple[ray.ObjectRef, int]], int]:
    """Where each unit's donor rows (``donor_join``) are: its group's object and its place in
    it, in ``units``' order; and how many of the units' rows they cover. This process holds
    references and counts."""
    plan = donor_join.plan_join(units, donors, int(ray.cluster_resources().get("CPU", 0)))
    buckets, groups = plan.buckets, len(plan.groups)
    keys_task = ray.remote(num_cpus=1, num_returns=buckets)(_keys_task)
    donor_task = ray.remote(num_cpus=1, num_returns=buckets)(_donor_task)
    # No reference to a step's inputs is kept here: Ray frees a bucket's map outputs once its
    # join ran, a group's join outputs once its gather ran; the store holds ~1 donor copy.
    mapped = [
        keys_task.remote(config, content_hash, [units[i] for i in chunk], chunk, buckets)
        for chunk in plan.key_maps
    ]
    mapped += [
        donor_task.remote(out, [donors[i].path for i in chunk], columns, buckets)
        for chunk in plan.donor_maps
    ]
    mapped = [_refs(m, buckets) for m in mapped]
    join_task = ray.remote(num_cpus=1, num_returns=groups + 1)(_join_task)
    group_of_unit = ray.put(plan.group_of_unit())
    joined = [
        join_task.remote(group_of_unit, len(plan.key_maps), *[m[b] for m in mapped])
        for b in range(buckets)
    ]
    del mapped
    counts = [j.pop() for j in joined]
    gather = ray.remote(num_cpus=1)(_gather_task)
    gathered = [gather.remote(g, *[j[n] for j in joined]) for n, g in enumerate(plan.groups)]
    del joined
    matched = sum(ray.get(counts))
    # Done before the pool starts: its actors may take every CPU the gathers wait for.
    ray.wait(gathered, num_returns=len(gathered), fetch_local=False)
    per_unit = [
        (ref, n)
        for ref, group in zip(gathered, plan.groups, strict=True)
        for n in range(len(group))
    ]
    return per_unit, matched
