"""The batch-embedding job and the nightly pipeline around it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sbertray.config.core import DEFAULT_BASE_MODEL, StorageConfig, Strict


class EmbedInputConfig(Strict):
    """Parquet shards to embed.

    | column          | type                          |
    |-----------------|-------------------------------|
    | id_column       | any scalar, unique per row    |
    | text_column     | string (binary: decoded UTF-8)|
    | pair_column     | string, in pair mode          |
    | passthrough     | copied unchanged              |
    """

    path: str | list[str]  # directory (hive partitions kept), glob, file, or list; local/s3://
    text_column: str = "text"
    pair_column: str | None = None  # pair mode: also embed this column and score cosine
    # None: a stable generated id, "<file relative path>#<row number>".
    id_column: str | None = "id"
    passthrough: list[str] = Field(default_factory=list)


class IndexConfig(Strict):
    """The vector index of a Lance output (``output.format: lance``), built or refreshed after
    each run once the table holds ``min_rows`` rows; below that a search scans every vector,
    which is exact and takes milliseconds. Unset sizes are chosen from the row count
    (``embed/lance_index.py``)."""

    type: Literal["ivf_pq", "hnsw", "none"] = "ivf_pq"  # hnsw: Lance's IVF_HNSW_SQ
    metric: Literal["cosine", "l2", "dot"] = "cosine"
    min_rows: int = Field(100_000, ge=256)  # IVF and PQ training need a few hundred rows
    num_partitions: int | None = Field(default=None, gt=0)
    num_sub_vectors: int | None = Field(default=None, gt=0)  # ivf_pq: bytes per stored code
    # Search effort (recorded in the manifest, used by `sbertray search`): partitions probed,
    # and candidates re-ranked by their stored vector per result (ivf_pq).
    nprobes: int | None = Field(default=None, gt=0)
    refine_factor: int | None = Field(default=None, gt=0)


class EmbedOutputConfig(Strict):
    path: str  # output prefix (Parquet) or the Lance dataset; local or s3://
    # parquet: part files under `path`; lance: one Lance dataset at `path`, with sbertray's own
    # files (the unit parts that make reruns incremental, manifest, report) in `path/_sbertray`.
    format: Literal["parquet", "lance"] = "parquet"
    index: IndexConfig | None = None  # lance only; None: the defaults above
    # lance: versions kept after each run (older ones deleted); None keeps every version.
    retain_versions: int | None = Field(default=None, gt=0)
    # The most rows in one output file: an input file with more is split at row-group
    # boundaries. (Small input files are grouped into outputs of `compute.unit_rows`.)
    rows_per_file: int = Field(100_000, gt=0)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    # A run holds `_lock.json` here; a lock this long without a heartbeat (or whose process is
    # gone from this host) is taken over.
    lock_stale_after_s: float = Field(600.0, gt=0)
    # incremental: an output written with other settings (model, dtype, columns, ...) is refused,
    # never silently rewritten; replace: rewrite it with these settings (`--replace` on the CLI).
    mode: Literal["incremental", "replace"] = "incremental"
    # Compact embeddings (see embed/compact.py): fewer dimensions and fewer bits per value.
    # Scores (pair cosine, top-k) are always computed from the full float32 vectors.
    embedding_dtype: Literal["float32", "float16", "int8", "binary"] = "float32"
    truncate_dim: int | None = Field(default=None, gt=0)  # Matryoshka-style: the first N dims
    # int8 ranges (JSON [[min per dim], [max per dim]]); null: calibrated once on a sample of the
    # first run, kept in the manifest, and reused by later runs into the same output.
    int8_ranges: str | None = None

    @model_validator(mode="after")
    def _int8_ranges_need_int8(self) -> EmbedOutputConfig:
        if self.int8_ranges is not None and self.embedding_dtype != "int8":
            raise ValueError(
                f"`output.int8_ranges` is for `output.embedding_dtype: int8`, and this output "
                f"stores {self.embedding_dtype}: drop `int8_ranges` or set the dtype to int8"
            )
        if self.format != "lance" and (self.index is not None or self.retain_versions):
            raise ValueError(
                "`output.index` and `output.retain_versions` are for `output.format: lance`; "
                "a Parquet output is searched exactly (`sbertray search`)"
            )
        compact = self.embedding_dtype in ("int8", "binary")
        if self.format == "lance" and compact and self.vector_index.type != "none":
            raise ValueError(
                f"Lance indexes float32 and float16 vectors, not "
                f"`embedding_dtype: {self.embedding_dtype}`: set `output.index.type: none` "
                "or embedding_dtype float32 / float16"
            )
        return self

    @property
    def vector_index(self) -> IndexConfig:
        return self.index or IndexConfig()


class ReferenceConfig(Strict):
    """A reference set embedded once per run; each input row gets its top-k most similar."""

    path: str | list[str]
    id_column: str = "id"
    text_column: str = "text"
    top_k: int = Field(5, gt=0)


class BadInputConfig(Strict):
    on_null_text: Literal["fail", "skip", "empty"] = "fail"  # null or non-string text
    on_invalid_utf8: Literal["fail", "replace"] = "fail"
    on_bad_file: Literal["fail", "skip"] = "fail"  # unreadable / corrupt Parquet


class ComputeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPU actors where the cluster has GPUs
    # A name in `sbertray.embed.backends` (torch, onnx, openvino) or auto: GPUs -> torch; CPUs ->
    # openvino (onnx for int8), torch for models the export does not cover.
    backend: str = "auto"
    # auto: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; onnx -> fp32.
    # int8 (onnx only) is dynamic per-channel quantization of the MatMuls; used only when asked.
    precision: str = "auto"
    # Padded tokens per forward pass (texts sorted by length inside each block first, so short
    # texts go many to a batch and long ones few) and a cap on rows per pass.
    # None: by device (CPU 1024 / 256, GPU 65536 / 4096; see embed/encoder.py).
    token_budget: int | None = Field(default=None, gt=0)
    max_batch_rows: int | None = Field(default=None, gt=0)
    num_actors: int | None = Field(default=None, gt=0)  # a fixed pool; None: autoscaling
    # Bounds of the autoscaling pool. None: it starts with the actors the cluster can place now
    # (at least 1: on a cold cluster the autoscaler adds a node for it) and grows to what the
    # autoscaler's node types allow where Ray reports them, else to the resources there are now.
    min_actors: int | None = Field(default=None, gt=0)
    max_actors: int | None = Field(default=None, gt=0)
    # The wait for the pool's first actors (nodes being added meanwhile) before a clear error,
    # instead of waiting forever for a pool no node can hold.
    placement_timeout_s: int = Field(900, gt=0)
    cpus_per_actor: float | None = Field(default=None, gt=0)  # None: derived, see pool.py
    # GPU actors sharing each GPU. None: one per CPU of the GPU nodes' CPUs per GPU, at most 16
    # (one actor's CPU work cannot keep a GPU busy with a small model; see pool.py). Each holds
    # a CUDA context and its batches (estimated up to ~2 GB): lower it on small GPUs.
    actors_per_gpu: int | None = Field(default=None, gt=0)
    max_retries: int = Field(3, ge=0)  # actor restarts / task retries after a crash
    # Input files smaller than this are grouped into work units (each one output file) of about
    # this many rows. None: the input's rows / 32 as a power of two, from 1,024 to
    # `output.rows_per_file`. Pin it to keep the grouping when the input doubles or halves.
    unit_rows: int | None = Field(default=None, gt=0)
    # Where units run. auto: in this process, without starting Ray (about 10 s of start-up and
    # shutdown on a laptop), when no cluster is given (`--address` / $RAY_ADDRESS), no Ray runs
    # in this process, no GPU is visible, and at most `local_max_rows` rows are expected to need
    # the model (rows of changed files minus the earlier output rows that can donate vectors);
    # else, and with `ray`, on a Ray Data actor pool. `local`: always in this process, on CPU.
    executor: Literal["auto", "ray", "local"] = "auto"
    local_max_rows: int = Field(20_000, ge=0)
    # Row-level reuse: the earlier output's vectors (keys and computed columns, uncompressed) up
    # to this size are read into one index that every actor shares; above it, they are joined
    # to the units by key on Ray (`embed/donor_join.py`), so no process holds them all.
    reuse_index_max_mb: int = Field(256, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ComputeConfig:
        # `backend` and `precision` are checked against the backend registry where the embed
        # plan is made (`embed.backends.check_config`): config sits below the backends.
        if self.num_actors and (self.min_actors or self.max_actors):
            raise ValueError("set `compute.num_actors` (a fixed pool) or min/max_actors, not both")
        if self.min_actors and self.max_actors and self.min_actors > self.max_actors:
            raise ValueError("`compute.min_actors` is larger than `compute.max_actors`")
        if self.executor == "local" and self.device == "cuda":
            raise ValueError("`compute.executor: local` runs on CPU; use `device: auto` or `cpu`")
        return self


class EmbedConfig(Strict):
    name: str = "embed"
    model: str = DEFAULT_BASE_MODEL  # training output, local path, s3:// path, or hub id
    input: EmbedInputConfig
    output: EmbedOutputConfig
    reference: ReferenceConfig | None = None
    bad_input: BadInputConfig = Field(default_factory=BadInputConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> EmbedConfig:
        if self.reference is not None and self.input.pair_column is not None:
            raise ValueError("set either `input.pair_column` (pair mode) or `reference`, not both")
        return self


# The nightly pipeline


class ConfigRef(Strict):
    """Another config file plus overrides, so the nightly job reuses recipes as they are."""

    config: str
    overrides: list[str] = Field(default_factory=list)


class PromotionConfig(Strict):
    # A candidate is promoted only if its dev Spearman beats the current model's (evaluated on
    # the same dev set in the same run) by at least this much.
    min_improvement: float = 0.0


class NightlyConfig(Strict):
    """Fine-tune when the training data changed, promote only a better model, then embed the new
    or changed shards into ``<output>/model=<hash12>/`` (a new model re-embeds everything)."""

    name: str = "nightly"
    train: ConfigRef | None = None  # a TrainConfig recipe; omit to only embed
    embed: ConfigRef  # an EmbedConfig; its `model` is used until a trained model is promoted
    models: str  # candidate models go to <models>/<run_id>/
    output: str  # embeddings root; state in <output>/_nightly_state.json
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
