"""Pearson/Spearman of cosine similarity against gold labels, via sentence-transformers'
``EmbeddingSimilarityEvaluator`` (the same numbers the seed cards report), and retrieval
metrics from the same pairs, via its ``InformationRetrievalEvaluator``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sbertray.config import PairDataConfig, StorageConfig
from sbertray.config.train import RETRIEVAL_METRICS
from sbertray.train.data import DataError, PairData, load_pairs

EVAL_BATCH_SIZE = 64  # inference only: larger than any recipe's train batch, still small on CPU


# The dev metrics by name, as `training.select_metric` and `tune.metric` name them.
DEV_METRICS = ("spearman_cosine", *RETRIEVAL_METRICS)
# RetrievalMetrics field -> the metric's name
_RETRIEVAL_KEYS = {
    "mrr_at_10": "mrr@10",
    "ndcg_at_10": "ndcg@10",
    "recall_at_1": "recall@1",
    "recall_at_10": "recall@10",
}


def dim_name(name: str, dim: int) -> str:
    """The name of the evaluator that scores the first ``dim`` dimensions of the vectors."""
    return f"{name}-{dim}d"


def result_key(name: str, metric: str) -> str:
    """The key of a dev metric in the results of the evaluator named ``name`` (the trainer logs
    it with ``eval_`` before it): the retrieval evaluator's keys name the score function."""
    return f"{name}_{metric}" if metric == "spearman_cosine" else f"{name}_cosine_{metric}"


@dataclass(frozen=True)
class RetrievalMetrics:
    """Each query (a pair's first sentence) retrieves from every pair's second sentence; the
    relevant ones are those it is paired with at a label of at least ``threshold``."""

    threshold: float
    queries: int
    corpus: int
    mrr_at_10: float
    ndcg_at_10: float
    recall_at_1: float
    recall_at_10: float


@dataclass(frozen=True)
class SimilarityMetrics:
    name: str
    pearson_cosine: float
    spearman_cosine: float
    num_pairs: int
    retrieval: RetrievalMetrics | None = None
    # Spearman of the vectors cut to their first N dimensions (re-normalized), by N: how much
    # an `output.truncate_dim: N` embedding keeps (what Matryoshka training is for).
    spearman_by_dim: dict[int, float] | None = None

    @classmethod
    def from_results(
        cls,
        results: dict,
        name: str,
        num_pairs: int,
        task: RetrievalTask | None = None,
        dims: tuple[int, ...] = (),
    ) -> SimilarityMetrics:
        """From an evaluator's result dict (keys prefixed with ``name``); ``task``: the
        retrieval it scored too, if any; ``dims``: the truncations it scored."""
        retrieval = None
        if task is not None:
            retrieval = RetrievalMetrics(
                threshold=task.threshold,
                queries=len(task.queries),
                corpus=len(task.corpus),
                **{
                    field: float(results[result_key(name, key)])
                    for field, key in _RETRIEVAL_KEYS.items()
                },
            )
        return cls(
            name=name,
            pearson_cosine=float(results[f"{name}_pearson_cosine"]),
            spearman_cosine=float(results[result_key(name, "spearman_cosine")]),
            num_pairs=num_pairs,
            retrieval=retrieval,
            spearman_by_dim={
                d: float(results[result_key(dim_name(name, d), "spearman_cosine")]) for d in dims
            }
            or None,
        )

    def as_dict(self) -> dict:
        scores = {
            "dataset": self.name,
            "pearson_cosine": self.pearson_cosine,
            "spearman_cosine": self.spearman_cosine,
            "num_pairs": self.num_pairs,
        }
        if self.spearman_by_dim:
            scores["spearman_cosine_by_dim"] = {str(d): v for d, v in self.spearman_by_dim.items()}
        return scores | ({"retrieval": asdict(self.retrieval)} if self.retrieval else {})


@dataclass(frozen=True)
class RetrievalTask:
    """Queries, corpus and relevance judgements drawn from labelled pairs."""

    threshold: float
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # document id -> text
    relevant: dict[str, set[str]]  # query id -> relevant document ids

    @classmethod
    def from_pairs(cls, table, threshold: float) -> RetrievalTask:
        """Every distinct second sentence is a document; every first sentence paired with one
        at a label of at least ``threshold`` is a query, and those documents its relevant ones."""
        seconds = table.column("sentence_1").to_pylist()
        ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(seconds))}
        relevant: dict[str, set[str]] = {}
        for first, second, label in zip(
            table.column("sentence_0").to_pylist(),
            seconds,
            table.column("label").to_pylist(),
            strict=True,
        ):
            if label >= threshold:
                relevant.setdefault(first, set()).add(ids[second])
        if not relevant:
            raise DataError(
                f"no pair has a label of at least {threshold} (the retrieval threshold)"
            )
        queries = {f"q{i}": text for i, text in enumerate(relevant)}
        return cls(
            threshold=threshold,
            queries=queries,
            corpus={cid: text for text, cid in ids.items()},
            relevant={qid: relevant[text] for qid, text in queries.items()},
        )


@dataclass(frozen=True)
class DevEvaluator:
    """What scores a model on a dev set: ``evaluator`` is sentence-transformers' (the trainer
    runs it and the model card shows its table); ``metrics`` reads its results."""

    evaluator: object
    name: str
    num_pairs: int
    task: RetrievalTask | None
    dims: tuple[int, ...] = ()

    def metrics(self, results: dict) -> SimilarityMetrics:
        return SimilarityMetrics.from_results(
            results, self.name, self.num_pairs, self.task, self.dims
        )


def metric_scores(dev_metrics: dict) -> dict[str, float]:
    """A ``SimilarityMetrics.as_dict()`` by metric name (``spearman_cosine``, ``mrr@10``, ...):
    the names ``training.select_metric`` and ``tune.metric`` use."""
    retrieval = dev_metrics.get("retrieval") or {}
    return {"spearman_cosine": dev_metrics["spearman_cosine"]} | {
        key: retrieval[field] for field, key in _RETRIEVAL_KEYS.items() if field in retrieval
    }


def build_evaluator(
    pairs: PairData,
    name: str,
    *,
    retrieval_threshold: float | None = None,
    truncate_dims: tuple[int, ...] = (),
    show_progress_bar: bool = False,
) -> DevEvaluator:
    """sentence-transformers' ``EmbeddingSimilarityEvaluator`` over the pairs; one more for each
    of ``truncate_dims`` on the vectors cut to that many dimensions (as its Matryoshka examples
    do: each encodes the pairs again); with ``retrieval_threshold``, an
    ``InformationRetrievalEvaluator`` on the same pairs (``RetrievalTask``). Several run as one
    ``SequentialEvaluator`` whose results carry them all."""
    from sentence_transformers.base.evaluation import SequentialEvaluator
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
    )

    table = pairs.table
    dims = tuple(truncate_dims)
    columns = [table.column(c).to_pylist() for c in ("sentence_0", "sentence_1", "label")]

    def similarity(name: str, dim: int | None = None):
        return EmbeddingSimilarityEvaluator(
            *columns,
            batch_size=EVAL_BATCH_SIZE,
            main_similarity="cosine",
            similarity_fn_names=["cosine"],
            name=name,
            write_csv=False,
            show_progress_bar=show_progress_bar,
            truncate_dim=dim,
        )

    evaluators = [similarity(name), *(similarity(dim_name(name, d), d) for d in dims)]
    task = None
    if retrieval_threshold is not None:
        task = RetrievalTask.from_pairs(table, retrieval_threshold)
        evaluators.append(_retrieval_evaluator(task, name, show_progress_bar))
    if len(evaluators) == 1:
        return DevEvaluator(evaluators[0], name, table.num_rows, None)
    return DevEvaluator(SequentialEvaluator(evaluators), name, table.num_rows, task, dims)


def _retrieval_evaluator(task: RetrievalTask, name: str, show_progress_bar: bool):
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )
    from sentence_transformers.util import cos_sim

    return InformationRetrievalEvaluator(
        queries=task.queries,
        corpus=task.corpus,
        relevant_docs=task.relevant,
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[1, 10],
        score_functions={"cosine": cos_sim},
        batch_size=EVAL_BATCH_SIZE,
        show_progress_bar=show_progress_bar,
        write_csv=False,
        name=name,
    )


def evaluate_model(
    model,
    pairs: PairData,
    *,
    name: str = "dev",
    retrieval_threshold: float | None = None,
    truncate_dims: tuple[int, ...] = (),
    show_progress_bar: bool = False,
) -> SimilarityMetrics:
    """Scores an already loaded SentenceTransformer on validated pairs (and on retrieval among
    them, with ``retrieval_threshold``; on its vectors cut to each of ``truncate_dims``)."""
    dev = build_evaluator(
        pairs,
        name,
        retrieval_threshold=retrieval_threshold,
        truncate_dims=truncate_dims,
        show_progress_bar=show_progress_bar,
    )
    return dev.metrics(dev.evaluator(model))


def evaluate(
    model: str,
    data: PairDataConfig,
    *,
    storage_config: StorageConfig | None = None,
    device: str | None = None,
    progress: bool = False,
    retrieval_threshold: float | None = None,
    truncate_dims: tuple[int, ...] = (),
) -> SimilarityMetrics:
    """Loads ``model`` (path, s3://, hub id or the bundled default) and scores it on ``data``;
    ``retrieval_threshold``: retrieval metrics too (``RetrievalTask``); ``truncate_dims``: the
    Spearman of the first N dimensions too, for each N; ``progress``: say what runs and draw
    the encoding's progress bar (the CLI)."""
    from sbertray.modeling import load_model

    pairs = load_pairs(data, storage_config)
    if progress:
        print(
            f"[sbertray] embedding {pairs.table.num_rows:,} pairs ({2 * pairs.table.num_rows:,} "
            "sentences) with the model; scoring their cosine against the labels",
            flush=True,
        )
    loaded = load_model(model, storage_config=storage_config, device=device)
    return evaluate_model(
        loaded,
        pairs,
        name=data.name or "dev",
        retrieval_threshold=retrieval_threshold,
        truncate_dims=_check_dims(truncate_dims, loaded),
        show_progress_bar=progress,
    )


def _check_dims(dims: tuple[int, ...], model) -> tuple[int, ...]:
    width = model.get_embedding_dimension()
    if bad := [d for d in dims if not 0 < d <= width]:
        raise DataError(f"truncate dims {bad}: the model's vectors have {width} dimensions")
    return tuple(dims)
