"""The fine-tuning recipe (one per file in ``jobs/configs/``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sbertray.config.core import DEFAULT_BASE_MODEL, StorageConfig, Strict
from sbertray.config.tune import TuneSpec
from sbertray.hardware import cpu_has_native_bf16


class PairColumns(Strict):
    """Names of the columns in the input file that hold each part of a training pair."""

    sentence_0: str = "sentence_0"  # the anchor (query) for `mnrl`
    sentence_1: str = "sentence_1"  # its positive for `mnrl`
    # null: the file has no labels, every pair is a positive (`mnrl` / `cached_mnrl` only).
    label: str | None = "label"
    # A hard negative for sentence_0 (triplets; `mnrl` / `cached_mnrl` only).
    negative: str | None = None


class PairDataConfig(Strict):
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
    # An empty or blank sentence is a bad row, unless the data means it (seed 000's categories
    # are sometimes empty): `keep` trains on it and reports how many.
    empty_text: Literal["bad_row", "keep"] = "bad_row"
    limit: int | None = Field(default=None, gt=0)  # first N rows only (quick runs)
    # Keep only the pairs labelled at least this (after label_scale): the positives that
    # `mnrl` trains on, e.g. 0.8 for STS-B. The others are dropped and counted.
    min_label: float | None = Field(default=None, ge=0, le=1)
    name: str | None = None  # data set name shown in evaluator metrics and the model card

    @model_validator(mode="after")
    def _template_needs_text(self) -> PairDataConfig:
        if self.record_text == "template" and not self.record_template:
            raise ValueError(
                "`record_text: template` needs `record_template`, e.g. '{title}: {text}'"
            )
        return self


LABELLED_LOSSES = ("cosine", "cosent", "angle")
RETRIEVAL_METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10")


class TrainingConfig(Strict):
    # cosine: MSE of cosine against the label (the seeds' CosineSimilarityLoss); cosent and
    # angle: rank a batch's pairs by cosine in their labels' order (sentence-transformers'
    # CoSENTLoss / AnglELoss). All read the pairs' 0..1 labels. mnrl: each anchor against every
    # positive (and negative) of the global batch, gathered across workers
    # (MultipleNegativesRankingLoss); cached_mnrl: the same in `mini_batch_size` pieces
    # (GradCache), so a large batch fits in bounded memory. Both treat every pair as a positive.
    loss: Literal["cosine", "cosent", "angle", "mnrl", "cached_mnrl"] = "cosine"
    mini_batch_size: int = Field(32, gt=0)  # cached_mnrl's forward size per worker
    # Train the first N dimensions to carry the meaning too (MatryoshkaLoss), e.g. [384, 128, 64]
    # for `output.truncate_dim: 128` embeddings. Largest first, at most the model's dimension.
    matryoshka_dims: list[int] | None = None
    # Each dim's weight in the summed loss (default 1 each): more on a small width makes its
    # truncated vectors keep more of the full score.
    matryoshka_weights: list[float] | None = None
    # With matryoshka_dims: after training, fit an orthogonal rotation of the vectors that puts
    # their meaning first (a Dense layer before Normalize; full-width cosines unchanged). On by
    # default; false keeps the model's own layers.
    matryoshka_rotation: bool | None = None
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
    # Mixed precision (autocast): fp16 on GPUs; bf16 on GPUs and on CPUs with native bf16.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    logging_steps: int = Field(50, gt=0)
    eval_every: Literal["epoch", "end"] = "epoch"  # dev evaluation after each epoch, or at the end
    checkpoint_steps: int | None = Field(default=None, gt=0)  # None: one checkpoint per epoch
    # Keep the epoch with the best dev Spearman instead of the last one (needs `dev`; evaluates
    # and checkpoints every epoch). transformers' load_best_model_at_end does the bookkeeping.
    select_best: bool = False
    keep_checkpoints: int = Field(2, gt=0)
    # Also score retrieval on `dev`: each first sentence searches every second sentence, and
    # those it is paired with at a label of at least this are relevant (MRR@10, NDCG@10, ...).
    retrieval_threshold: float | None = Field(default=None, ge=0, le=1)
    # The dev metric that `select_best` maximizes (a retrieval one needs retrieval_threshold).
    select_metric: Literal["spearman_cosine", "mrr@10", "ndcg@10", "recall@1", "recall@10"] = (
        "spearman_cosine"
    )

    @model_validator(mode="after")
    def _matryoshka_dims_descend(self) -> TrainingConfig:
        dims = self.matryoshka_dims
        if dims is not None and (
            not dims or any(d <= 0 for d in dims) or dims != sorted(set(dims), reverse=True)
        ):
            raise ValueError(
                f"`training.matryoshka_dims` {dims}: positive, distinct, largest first, "
                "e.g. [384, 256, 128, 64]"
            )
        weights = self.matryoshka_weights
        if weights is not None and (
            len(weights) != len(dims or []) or any(w <= 0 for w in weights)
        ):
            raise ValueError(
                f"`training.matryoshka_weights` {weights}: one positive weight per "
                f"`training.matryoshka_dims` entry ({dims})"
            )
        if self.matryoshka_rotation and not dims:
            raise ValueError(
                "`training.matryoshka_rotation` rotates for the `training.matryoshka_dims` "
                "widths: set those too, e.g. [384, 256, 128, 64]"
            )
        return self

    @property
    def rotates(self) -> bool:
        """Whether training ends by fitting a Matryoshka rotation (``rotation.py``)."""
        return bool(self.matryoshka_dims) and self.matryoshka_rotation is not False


class ScalingConfigSpec(Strict):
    """Passed straight to ``ray.train.ScalingConfig``."""

    # 0: Ray Train's local mode, training in the driver's process: no controller or worker
    # processes to start (a tiny run took 6 CPU-s instead of 27 here), for small runs and
    # debugging; no `max_failures` restarts, and `sbertray tune` needs workers.
    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    # None: an even share of the cluster's CPUs, so one worker on a laptop uses every core.
    cpus_per_worker: float | None = Field(default=None, gt=0)
    # Worker-group restarts from the last checkpoint within one run (a killed worker, a lost
    # node) before the run fails; a failed run still resumes when rerun.
    max_failures: int = Field(0, ge=0)

    @property
    def in_driver(self) -> bool:
        """Ray Train's local mode: the driver's process is the one worker."""
        return self.num_workers == 0

    @property
    def world_size(self) -> int:
        """Training processes: the global batch is split across this many."""
        return max(1, self.num_workers)

    @model_validator(mode="after")
    def _check(self) -> ScalingConfigSpec:
        if self.in_driver and self.max_failures:
            raise ValueError(
                "`scaling.max_failures` restarts Ray Train workers, and `scaling.num_workers: "
                "0` trains in the driver: set `num_workers` to 1 or more, or drop it"
            )
        return self


class TrainOutputConfig(Strict):
    model: str  # where the trained model directory goes; local path or s3://
    checkpoints: str | None = None  # Ray Train storage_path; default: `<model>-checkpoints`
    run_name: str | None = None  # Ray Train run name; default: derived from the output path
    # A completed run's checkpoints (optimizer state: ~260 MB each for MiniLM) are deleted once
    # the model is written, as nothing resumes a finished run; true keeps them.
    keep_checkpoints: bool = False

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoints or f"{self.model.rstrip('/')}-checkpoints"


class TrainConfig(Strict):
    """A fine-tuning recipe (one per file in ``jobs/configs/``)."""

    name: str
    base_model: str = DEFAULT_BASE_MODEL  # hub id, local path, or s3:// path
    train: PairDataConfig
    dev: PairDataConfig | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scaling: ScalingConfigSpec = Field(default_factory=ScalingConfigSpec)
    output: TrainOutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tune: TuneSpec | None = None  # the search `sbertray tune` runs; `train` ignores it

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        n = self.scaling.world_size
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
        self._check_loss_data(self.training.loss)
        self._check_tune()
        if self.training.select_metric in RETRIEVAL_METRICS and (
            self.dev is None or self.training.retrieval_threshold is None
        ):
            raise ValueError(
                f"`training.select_metric: {self.training.select_metric}` is a retrieval metric: "
                "it needs a `dev` set and `training.retrieval_threshold` (e.g. 0.8)"
            )
        precision = self.training.precision
        if precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("`training.precision: fp16` needs `scaling.use_gpu: true`")
        if precision == "bf16" and not (self.scaling.use_gpu or cpu_has_native_bf16()):
            # Emulated bf16 runs slower than fp32: refuse it rather than slow a run down.
            raise ValueError(
                "`training.precision: bf16` needs GPUs (`scaling.use_gpu: true`) or CPUs with "
                "native bf16 (AVX512-BF16 or AMX); this CPU has neither: use fp32"
            )
        return self

    def _check_loss_data(self, loss: str) -> None:
        cols = self.train.columns
        if loss in LABELLED_LOSSES and (cols.label is None or cols.negative is not None):
            raise ValueError(
                f"`training.loss: {loss}` learns from labelled pairs: `train.columns.label` must "
                "name the label column and `train.columns.negative` stay unset (triplets and "
                "unlabelled pairs train with `mnrl` or `cached_mnrl`)"
            )
        if loss not in LABELLED_LOSSES and cols.label is not None and self.train.min_label is None:
            raise ValueError(
                f"`training.loss: {loss}` takes every training pair as a positive, but "
                f"`train.columns.label` ({cols.label}) says the pairs are scored: set "
                "`train.min_label` (e.g. 0.8) to train on the positives only, or "
                "`train.columns.label: null` when every pair is one"
            )
        if self.dev is not None and self.dev.columns.label is None:
            raise ValueError("`dev.columns.label` is needed: the dev set is scored by its labels")

    def _check_tune(self) -> None:
        spec = self.tune
        if spec is None:
            return
        if self.dev is None:
            raise ValueError("`tune` needs a `dev` set: the trials are compared on it")
        if spec.metric in RETRIEVAL_METRICS and self.training.retrieval_threshold is None:
            raise ValueError(
                f"`tune.metric: {spec.metric}` is a retrieval metric: set "
                "`training.retrieval_threshold` (e.g. 0.8)"
            )
        if self.scaling.in_driver:
            raise ValueError(
                "`tune` runs each trial as a Ray Train run of its own: `scaling.num_workers` "
                "must be 1 or more"
            )
        workers = self.scaling.num_workers
        if bad := [b for b in spec.search.batch_size or [] if b <= 0 or b % workers]:
            raise ValueError(
                f"`tune.search.batch_size` {bad}: each must be a positive multiple of "
                f"`scaling.num_workers` ({workers})"
            )
        for loss in spec.search.loss or []:
            self._check_loss_data(loss)
        if True in (spec.search.matryoshka or []) and not self.training.matryoshka_dims:
            raise ValueError(
                "`tune.search.matryoshka: [.., true]` trains with `training.matryoshka_dims`: "
                "set them, e.g. [384, 256, 128, 64]"
            )
