"""The embed job's plan phase: everything that can fail without the model running (config,
model, input footers and columns, ids, reference set, output), the units still to embed, the
earlier output that can donate vectors, and where the units run."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import sbertray
from sbertray import output_paths, storage
from sbertray.config import EmbedConfig, stable_hash
from sbertray.embed import backends, commit, compact, reference, replacing, reuse, shards
from sbertray.embed.checks import (
    check_id_types,
    check_ids,
    check_output_outside_input,
    check_texts,
    hash_ids,
    needs_text_read,
)
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.pool import PoolPlan, in_process_pool, plan_pool, runs_in_process
from sbertray.embed.prepared import PreparedModel, prepare_job_model
from sbertray.embed.results import UnitResult
from sbertray.embed.shards import EmbedInputError, InputPlan, WorkUnit
from sbertray.embed.stage import check_output_columns, output_schema
from sbertray.ray_runtime import cpus_per_gpu, ray_running

# Ids of small files read whole while planning whose hashes are kept for the id check, at most:
# 8 MB. Past it the check's maps read the other files' ids again (one request a small file):
# holding every small file's hashes put 8 bytes an input row in the driver for the whole run.
_KEPT_ID_HASHES = 1_000_000


@dataclass(frozen=True)
class EmbedPlan:
    """What a run will do, checked before any actor starts."""

    config: EmbedConfig  # output path made absolute
    out: storage.Location
    model: PreparedModel
    inputs: InputPlan
    run_metadata: dict  # in every output file's schema metadata (`sbertray` key) and the manifest
    last_manifest: dict | None  # the output's, as planning found it (None: nothing committed)

    @property
    def run_id(self) -> str:
        return self.run_metadata["run_id"]

    @property
    def model_for_actors(self) -> str:
        """Object-storage models are resolved by each node into its own cache; anything else
        is the path (or hub id) the driver resolved."""
        model = self.config.model
        return model if storage.is_url(model) and not storage.is_local(model) else self.model.path


def plan_embed(config: EmbedConfig, model: PreparedModel | None = None) -> EmbedPlan:
    """Checks the config, model, input and output, in that order, and plans the units.
    ``model``: ``prepare_job_model(config)`` where the caller has it already.

    Raises:
        ConfigError: a backend or precision nothing runs; passthrough columns that collide with
            the output's own; an output inside the input.
        ModelError: the model cannot be found (before any data is read).
        EmbedInputError: no input files, missing or non-text column, bad file
            (``on_bad_file: fail``), null / duplicate / mixed-type ids, a bad reference set.
        StorageError: output not writable / endpoint down.
        SettingsChangedError: the output holds rows written with other settings.
    """
    backends.check_config(config.compute)
    config = config.model_copy(deep=True)
    config.output.path = storage.absolute(config.output.path)
    check_output_columns(config)
    check_output_outside_input(config)
    output_paths.check_lasting({"output.path": config.output.path})
    out = storage.resolve(output_paths.embed_parts_url(config.output), config.storage)
    model = model or prepare_job_model(config)
    compact.check(config.output, model.spec.dim)
    inputs = plan_input(config)
    reference.check_reference(config)
    storage.check_writable(out)
    replacing.check_format(storage.resolve(config.output.path, config.storage), config.output)
    last = commit.read_manifest(out)
    ranges = (
        compact.resolve_int8_ranges(config, last, model, inputs)
        if config.output.embedding_dtype == "int8"
        else None
    )
    config_dict = config.model_dump()
    run_metadata = {
        "model": storage.redact(config.model),
        "model_hash": model.model_hash,
        **model.spec.facts(),
        "config_hash": stable_hash(config_dict),
        "content_hash": commit.content_hash(
            config, model.model_hash, output_schema(config, model.spec.dim), ranges
        ),
        "config": storage.redact_value(config_dict),
        "run_id": f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}",
        "sbertray_version": sbertray.__version__,
    }
    if ranges is not None:
        run_metadata["int8_ranges"] = ranges
    replacing.check_unchanged(last, run_metadata, storage.redact(out.url))
    return EmbedPlan(config, out, model, inputs, run_metadata, last)


def plan_input(config: EmbedConfig) -> InputPlan:
    """Discovers, checks and cuts the input. Bad files raise (``on_bad_file: fail``) or are set
    aside (``skip``); a missing column, a non-text text column, no Parquet files at all, ids of
    different types and texts a `fail` policy refuses raise, before any work (null and repeated
    ids: ``check_input_ids``)."""
    fs, found = shards.discover(config.input.path, config.storage)
    if not found:
        raise EmbedInputError(
            f"input `{storage.redact(str(config.input.path))}`: no Parquet files found"
        )
    good, bad, schemas, texts_to_read = [], [], [], []
    # Footers one after another cost a round trip each in object storage: read them at once.
    footers = storage.map_parallel(
        lambda f: shards.read_footer(fs, f, config.input.id_column), found
    )
    id_hashes, kept = {}, 0
    for checked, meta, ids in footers:
        if checked.error:
            if config.bad_input.on_bad_file == "fail":
                raise EmbedInputError(
                    f"{checked.error}\n(set `bad_input.on_bad_file: skip` to embed the other files)"
                )
            bad.append(checked)
            continue
        schema = meta.schema.to_arrow_schema()
        shards.check_columns(config, checked, schema)
        good.append(checked)
        schemas.append(schema)
        if needs_text_read(config, meta, schema):
            texts_to_read.append(checked)
        if ids is not None and kept + len(ids) <= _KEPT_ID_HASHES:
            id_hashes[checked.rel] = hash_ids(config, checked, ids)
            kept += len(ids)
    check_id_types(config, good, schemas)
    check_texts(config, fs, texts_to_read)
    size = shards.choose_unit_rows(config, sum(f.num_rows for f in good))
    units = shards.plan_units(good, config.output.rows_per_file, size)
    return InputPlan(files=good, units=units, bad_files=bad, id_hashes=id_hashes)


def check_input_ids(plan: EmbedPlan) -> None:
    """Null and repeated ids are refused before any work (``checks.check_ids``: on Ray tasks
    when this process has joined a cluster). Skipped when the last committed run read these
    very files (same names, sizes and mtimes) with the same input settings: it checked them."""
    last = plan.last_manifest
    if last is not None:
        checked = [(f["rel"], f["size"], f["mtime"]) for f in last.get("files", [])]
        current = [(f.rel, f.size, f.mtime) for f in plan.inputs.files]
        same_input = last["config"]["input"] == plan.run_metadata["config"]["input"]
        if same_input and checked == current and not last.get("bad_files"):
            return
    map_reduce = None
    if ray_running():
        from sbertray.embed import ray_adapter

        map_reduce = ray_adapter.repeated_id_hashes
    check_ids(plan.config, plan.inputs.files, plan.inputs.id_hashes, map_reduce)


def find_committed(plan: EmbedPlan) -> tuple[set[str], dict[str, UnitResult]]:
    """The files already under the output, and the units among them that this run need not
    embed again (same content hash, same input fingerprint)."""
    out = plan.out
    existing = {i.path for i in storage.list_files(out)} if storage.exists(out) else set()
    content_hash = plan.run_metadata["content_hash"]
    return existing, commit.committed_units(out, plan.inputs, content_hash, existing)


def donor_files(
    plan: EmbedPlan, existing: set[str], done: dict[str, UnitResult]
) -> list[reuse.DonorFile]:
    """The output parts this run replaces or removes that were written with this run's content
    hash: their rows' vectors are copied, not recomputed."""
    from sbertray.embed.stage import computed_columns

    kept = {plan.out.child(r.output).path for r in done.values() if r.output}
    candidates = sorted(p for p in commit.output_parts(existing) if p not in kept)
    columns = computed_columns(plan.config)
    return reuse.donor_files(plan.out, candidates, plan.run_metadata["content_hash"], columns)


def joins_donors(config: EmbedConfig, donors: list[reuse.DonorFile]) -> bool:
    """Whether the donors reach the units by the join on Ray (``donor_join``) rather than one
    index every unit shares: when they are larger than ``compute.reuse_index_max_mb`` and the
    run may use Ray."""
    compute = config.compute
    too_large = sum(d.bytes for d in donors) > compute.reuse_index_max_mb << 20
    return too_large and compute.executor != "local"


def choose_pool(
    plan: EmbedPlan, todo: list[WorkUnit], reusable_rows: int, ray_address: str | None
) -> PoolPlan:
    """This process for small work (``compute.executor``), else a pool sized from the cluster."""
    expected = max(0, sum(u.num_rows for u in todo) - reusable_rows)
    if runs_in_process(plan.config.compute, ray_address, expected):
        return in_process_pool()
    from sbertray.embed import ray_adapter

    resources, limits = ray_adapter.cluster_resources(ray_address)
    return plan_pool(resources, plan.config.compute, len(todo), limits, cpus_per_gpu=cpus_per_gpu())


def resolve_encoder(plan: EmbedPlan, pool: PoolPlan) -> EncoderSpec:
    """The one ``EncoderSpec`` the run's units get on this pool."""
    try:
        return backends.encoder_spec(
            plan.config.compute,
            model=plan.model_for_actors,
            model_hash=plan.model.model_hash,
            device=pool.device,
            threads=pool.threads,
            exportable=plan.model.exportable,
        )
    except ValueError as exc:
        raise EmbedInputError(f"compute: {exc}") from None
