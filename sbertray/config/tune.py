"""The ``tune:`` block of a recipe: the search that ``sbertray tune`` runs around it on Ray Tune.

Each key of ``search`` is a ``training`` key the trials vary: a list is a choice among its
values; ``{low, high, log}`` is a range sampled uniformly (``log: true``: on a log scale, for
learning rates). Keys left out keep the recipe's value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from sbertray.config.core import Strict

Metric = Literal["spearman_cosine", "mrr@10", "ndcg@10", "recall@1", "recall@10"]
Loss = Literal["cosine", "cosent", "angle", "mnrl", "cached_mnrl"]


class Range(Strict):
    low: float = Field(ge=0)
    high: float = Field(gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"`low` ({self.low:g}) must be below `high` ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("a `log: true` range needs `low` above 0")
        return self


def _range_or_choices(value) -> str:
    return "range" if isinstance(value, dict | Range) else "choices"


# A mapping is a range, anything else a list of choices: an error names the one that was meant.
RangeOrChoices = Annotated[
    Annotated[Range, Tag("range")] | Annotated[list[float], Tag("choices")],
    Discriminator(_range_or_choices),
]


class SearchSpace(Strict):
    """What the trials vary (each a ``training`` key, ``matryoshka`` aside)."""

    learning_rate: RangeOrChoices | None = None
    batch_size: list[int] | None = None  # the global batch
    epochs: list[int] | None = None
    warmup_ratio: RangeOrChoices | None = None
    weight_decay: RangeOrChoices | None = None
    loss: list[Loss] | None = None
    # true: train with the recipe's `training.matryoshka_dims`; false: without.
    matryoshka: list[bool] | None = None

    @model_validator(mode="after")
    def _something_varies(self) -> SearchSpace:
        chosen = self.model_dump(exclude_none=True)
        if not chosen:
            raise ValueError(
                "`tune.search` varies nothing: give at least one of "
                + ", ".join(type(self).model_fields)
            )
        for key, value in chosen.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"`tune.search.{key}` is an empty list of choices")
        return self


class TuneSpec(Strict):
    """How ``sbertray tune`` searches: the space, the metric it maximizes on the dev set, how
    many trials and how many at once, and early stopping of weak trials (ASHA)."""

    search: SearchSpace
    metric: Metric = "spearman_cosine"  # a retrieval metric needs training.retrieval_threshold
    trials: int = Field(8, gt=0)
    concurrency: int = Field(1, gt=0)  # trials at once; each gets an even share of the CPUs
    seed: int = 0  # of the sampled configurations
    # ASHA: after `grace_epochs` epochs, and at each `reduction_factor`-fold epoch count after,
    # a trial below the best 1/reduction_factor of those that got that far stops.
    early_stopping: bool = True
    grace_epochs: int = Field(1, gt=0)
    reduction_factor: int = Field(2, ge=2)
    # Trials, the report, the best recipe and model; default: `<output.model>-tune`.
    output: str | None = None
