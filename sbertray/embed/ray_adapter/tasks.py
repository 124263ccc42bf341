"""The plan phase's Ray tasks: the id check's map/reduce (``checks.check_ids``) and the donor
join (``donor_join``). This process submits them and holds object references and counts only."""

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


def _keys_task(config, content_hash, units, indexes, buckets, dest):
    donor_join.write_pieces(
        dest, donor_join.unit_key_pieces(config, content_hash, units, indexes, buckets)
    )


def _donor_task(out, paths, columns, buckets, dest):
    donor_join.write_pieces(dest, donor_join.donor_pieces(out, paths, columns, buckets))


def _join_task(group_of_unit, key_files, donor_files, bucket, dest):
    pieces, matched = donor_join.join_bucket(
        [donor_join.read_piece(f, bucket) for f in key_files],
        [donor_join.read_piece(f, bucket) for f in donor_files],
        group_of_unit,
    )
    donor_join.write_pieces(dest, pieces)
    return matched


def _gather_task(units, joined_files, group, dest):
    pieces = [donor_join.read_piece(f, group) for f in joined_files]
    gathered = donor_join.gather_group(pieces, units)
    donor_join.write_pieces(dest, gathered)
    return [table.num_rows for table in gathered]


def join_donors(
    config: EmbedConfig,
    units: list[WorkUnit],
    out: storage.Location,
    donors: list[DonorFile],
    columns: list[str],
    content_hash: str,
) -> tuple[donor_join.JoinedDonors, int]:
    """Where each unit's donor rows (``donor_join``) are, in ``units``' order, and how many of
    the units' rows they cover. A step's tasks start once the step before has written all its
    files, which are deleted once read."""
    plan = donor_join.plan_join(units, donors, int(ray.cluster_resources().get("CPU", 0)))
    root = out.child(donor_join.JOIN_DIR)
    storage.delete(root)  # a killed run's (this run holds the output's lock)
    for folder in ("keys", "donors", "joined", "gathered"):
        root.fs.create_dir(root.child(folder).path, recursive=True)
    key_files = [root.child("keys", f"{n}.arrow") for n in range(len(plan.key_maps))]
    donor_files = [root.child("donors", f"{n}.arrow") for n in range(len(plan.donor_maps))]
    keys_task = ray.remote(num_cpus=1)(_keys_task)
    donor_task = ray.remote(num_cpus=1)(_donor_task)
    maps = [
        keys_task.remote(config, content_hash, [units[i] for i in chunk], chunk, plan.buckets, dest)
        for chunk, dest in zip(plan.key_maps, key_files, strict=True)
    ]
    maps += [
        donor_task.remote(out, [donors[i].path for i in chunk], columns, plan.buckets, dest)
        for chunk, dest in zip(plan.donor_maps, donor_files, strict=True)
    ]
    ray.get(maps)
    join_task = ray.remote(num_cpus=1)(_join_task)
    group_of_unit = ray.put(plan.group_of_unit())
    joined_files = [root.child("joined", f"{b}.arrow") for b in range(plan.buckets)]
    matched = sum(
        ray.get(
            [
                join_task.remote(group_of_unit, key_files, donor_files, b, dest)
                for b, dest in enumerate(joined_files)
            ]
        )
    )
    storage.delete(root.child("keys"))
    storage.delete(root.child("donors"))
    gather = ray.remote(num_cpus=1)(_gather_task)
    # Done before the pool starts: its actors may take every CPU the gathers wait for.
    rows = ray.get(
        [
            gather.remote(group, joined_files, g, donor_join.group_file(root, g))
            for g, group in enumerate(plan.groups)
        ]
    )
    storage.delete(root.child("joined"))
    places = [
        (g, n) if count else None for g, counts in enumerate(rows) for n, count in enumerate(counts)
    ]
    return donor_join.JoinedDonors(root, places), matched
