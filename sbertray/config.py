"""Typed configs for every job, loaded from YAML with ``key.path=value`` overrides.

Recipes are data: each YAML file in ``jobs/configs/`` loads into one of the models below. Unknown
keys are errors that name the key (a typo must not silently fall back to a default), and
``${VAR}`` / ``${VAR:-default}`` pull secrets and endpoints from the environment.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sbertray.errors import UserError

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Strict):
    """How to reach object storage. Credentials are never put here: they come from the AWS
    environment variables / credential chain (or ``${VAR}`` references resolved at load)."""

    endpoint_url: str | None = None  # S3-compatible endpoint; default: $AWS_ENDPOINT_URL
    region: str | None = None  # default: $AWS_REGION, then us-east-1
    anonymous: bool = False  # public buckets


class PairColumns(_Strict):
    """Names of the columns in the input file that hold each part of a training pair."""

    sentence_0: str = "sentence_0"
    sentence_1: str = "sentence_1"
    label: str = "label"


class PairDataConfig(_Strict):
    """Sentence pairs with a float similarity label.

    | column      | type                         |
    |-------------|------------------------------|
    | sentence_0  | string, or a record (struct) |
    | sentence_1  | string, or a record (struct) |
    | label       | float in 0..1 after scaling  |
    """

    path: str  # file, directory, glob, or `datasets` save_to_disk directory; local or s3://
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "datasets"] = "auto"
    columns: PairColumns = Field(default_factory=PairColumns)
    label_scale: float = 1.0  # multiplied into the label, e.g. 0.2 for STS-B's 0..5 scores
    # How a record (dict) becomes text: `repr` is Python's str(dict), the form seed 003's card
    # shows; `json` is compact JSON; `template` formats `record_template` with the record's keys.
    record_text: Literal["repr", "json", "template"] = "repr"
    record_template: str | None = None
    on_bad_row: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(default=None, gt=0)  # first N rows only (quick runs)
    name: str | None = None  # data set name shown in evaluator metrics and the model card

    @model_validator(mode="after")
    def _template_needs_text(self) -> PairDataConfig:
        if self.record_text == "template" and not self.record_template:
            raise ValueError(
                "`record_text: template` needs `record_template`, e.g. '{title}: {text}'"
            )
        return self


class TrainingConfig(_Strict):
    batch_size: int = Field(16, gt=0)  # global batch per optimizer step, split across workers
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # overrides epochs when set
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["linear", "constant", "constant_with_warmup", "cosine"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    max_seq_length: int | None = Field(default=None, gt=0)  # None keeps the base model's
    normalize: bool = True  # a Normalize module at the end of the model (or none)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16/bf16 need `use_gpu`
    logging_steps: int = Field(50, gt=0)
    eval_every: Literal["epoch", "end"] = "epoch"  # dev evaluation after each epoch, or at the end
    checkpoint_steps: int | None = Field(default=None, gt=0)  # None: one checkpoint per epoch
    # Keep the epoch with the best dev Spearman instead of the last one (needs `dev`; evaluates
    # and checkpoints every epoch). transformers' load_best_model_at_end does the bookkeeping.
    select_best: bool = False
    keep_checkpoints: int = Field(2, gt=0)


class ScalingConfigSpec(_Strict):
    """Passed straight to ``ray.train.ScalingConfig``."""

    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    # None: an even share of the cluster's CPUs, so one worker on a laptop uses every core.
    cpus_per_worker: float | None = Field(default=None, gt=0)
    # Worker-group restarts from the last checkpoint within one run (a killed worker, a lost
    # node) before the run fails; a failed run still resumes when rerun.
    max_failures: int = Field(0, ge=0)


class TrainOutputConfig(_Strict):
    model: str  # where the trained model directory goes; local path or s3://
    checkpoints: str | None = None  # Ray Train storage_path; default: `<model>-checkpoints`
    run_name: str | None = None  # Ray Train run name; default: derived from the output path

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoints or f"{self.model.rstrip('/')}-checkpoints"


class TrainConfig(_Strict):
    """A fine-tuning recipe (one per file in ``jobs/configs/``)."""

    name: str
    base_model: str = DEFAULT_BASE_MODEL  # hub id, local path, or s3:// path
    train: PairDataConfig
    dev: PairDataConfig | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scaling: ScalingConfigSpec = Field(default_factory=ScalingConfigSpec)
    output: TrainOutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        n = self.scaling.num_workers
        if self.training.batch_size % n:
            raise ValueError(
                f"`training.batch_size` ({self.training.batch_size}) must be divisible by "
                f"`scaling.num_workers` ({n}): it is the global batch per optimizer step"
            )
        if self.training.select_best and (self.dev is None or self.training.eval_every != "epoch"):
            raise ValueError(
                "`training.select_best` needs a `dev` set and `training.eval_every: epoch`"
            )
        if self.training.select_best and self.training.checkpoint_steps:
            raise ValueError(
                "`training.select_best` checkpoints every epoch; drop `training.checkpoint_steps`"
            )
        if self.training.precision != "fp32" and not self.scaling.use_gpu:
            raise ValueError(
                f"`training.precision: {self.training.precision}` needs `scaling.use_gpu: true`; "
                "use fp32 on CPU"
            )
        return self


# --------------------------------------------------------------------------------------------
# Loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"`{where}` references ${{{name}}}, which is not set in the environment")

    return _ENV_RE.sub(sub, value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[1]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` must look like `key.path=value`")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{key}`: `{part}` is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            lines.append(f"unknown key `{loc}`" + (f" (did you mean `{hint[0]}`?)" if hint else ""))
        elif err["type"] == "missing":
            lines.append(f"missing required key `{loc}`")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"`{loc}`: {err['msg']}{shown}" if loc else err["msg"])
    return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def parse_config(model: type[ConfigT], data: dict, *, source: str = "config") -> ConfigT:
    try:
        return model.model_validate(_expand_env(data, ""))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model, source)) from None


def load_config(
    model: type[ConfigT], path: str | Path, overrides: list[str] | None = None
) -> ConfigT:
    """Reads a YAML config into ``model``. Relative local paths in it stay relative to the
    current directory (recipes in this repo are written relative to the repo root)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return parse_config(model, apply_overrides(data, overrides or []), source=str(path))


# --------------------------------------------------------------------------------------------
# Embedding job


class EmbedInputConfig(_Strict):
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


class EmbedOutputConfig(_Strict):
    path: str  # output prefix; local or s3://
    rows_per_file: int = Field(100_000, gt=0)  # input row groups are grouped into files this big
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    # A run holds `_lock.json` here; a lock this long without a heartbeat (or whose process is
    # gone from this host) is taken over.
    lock_stale_after_s: float = Field(600.0, gt=0)


class ReferenceConfig(_Strict):
    """A reference set embedded once per run; each input row gets its top-k most similar."""

    path: str | list[str]
    id_column: str = "id"
    text_column: str = "text"
    top_k: int = Field(5, gt=0)


class BadInputConfig(_Strict):
    on_null_text: Literal["fail", "skip", "empty"] = "fail"  # null or non-string text
    on_invalid_utf8: Literal["fail", "replace"] = "fail"
    on_bad_file: Literal["fail", "skip"] = "fail"  # unreadable / corrupt Parquet


class ComputeConfig(_Strict):
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
    num_actors: int | None = Field(default=None, gt=0)  # None: sized from cluster resources
    cpus_per_actor: float | None = Field(default=None, gt=0)  # None: derived, see pool.py
    max_retries: int = Field(3, ge=0)  # actor restarts / task retries after a crash

    @model_validator(mode="after")
    def _check(self) -> ComputeConfig:
        # The registry holds every backend rule; imported here because it imports config users.
        from sbertray.embed import backends

        if self.backend != "auto" and self.backend not in backends.BACKENDS:
            raise ValueError(
                f"`compute.backend: {self.backend}` is not a backend; use auto or one of "
                f"{', '.join(backends.BACKENDS)}"
            )
        if self.precision not in ("auto", *backends.precisions()):
            raise ValueError(
                f"`compute.precision: {self.precision}` is not a precision; use auto or one of "
                f"{', '.join(backends.precisions())}"
            )
        backends.check_compute(self)
        return self


class EmbedConfig(_Strict):
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


# --------------------------------------------------------------------------------------------
# Nightly pipeline


class ConfigRef(_Strict):
    """Another config file plus overrides, so the nightly job reuses recipes as they are."""

    config: str
    overrides: list[str] = Field(default_factory=list)


class PromotionConfig(_Strict):
    # A candidate is promoted only if its dev Spearman beats the current model's (evaluated on
    # the same dev set in the same run) by at least this much.
    min_improvement: float = 0.0


class NightlyConfig(_Strict):
    """Fine-tune when the training data changed, promote only a better model, then embed the new
    or changed shards into ``<output>/model=<hash12>/`` (a new model re-embeds everything)."""

    name: str = "nightly"
    train: ConfigRef | None = None  # a TrainConfig recipe; omit to only embed
    embed: ConfigRef  # an EmbedConfig; its `model` is used until a trained model is promoted
    models: str  # candidate models go to <models>/<run_id>/
    output: str  # embeddings root; state in <output>/_nightly_state.json
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
