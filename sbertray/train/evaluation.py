"""Pearson/Spearman of cosine similarity against gold labels, via sentence-transformers'
``EmbeddingSimilarityEvaluator`` (the same numbers the seed cards report), and retrieval
metrics from the same pairs, via its ``InformationRetrievalEvaluator``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from sbertray.config import PairDataConfig, StorageConfig
from sbertray.train.data import DataError, PairData, load_pairs

EVAL_BATCH_SIZE = 64  # inference only: larger than any recipe's train batch, still small on CPU


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

    @classmethod
    def from_results(cls, results: dict, name: str, num_pairs: int) -> SimilarityMetrics:
        """From an EmbeddingSimilarityEvaluator's prefixed result dict."""
        return cls(
            name=name,
            pearson_cosine=float(results[f"{name}_pearson_cosine"]),
            spearman_cosine=float(results[f"{name}_spearman_cosine"]),
            num_pairs=num_pairs,
        )

    def as_dict(self) -> dict:
        scores = {
            "dataset": self.name,
            "pearson_cosine": self.pearson_cosine,
            "spearman_cosine": self.spearman_cosine,
            "num_pairs": self.num_pairs,
        }
        return scores | ({"retrieval": asdict(self.retrieval)} if self.retrieval else {})


def build_evaluator(pairs: PairData, name: str, *, show_progress_bar: bool = False):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    table = pairs.table
    return EmbeddingSimilarityEvaluator(
        table.column("sentence_0").to_pylist(),
        table.column("sentence_1").to_pylist(),
        table.column("label").to_pylist(),
        batch_size=EVAL_BATCH_SIZE,
        main_similarity="cosine",
        similarity_fn_names=["cosine"],
        name=name,
        write_csv=False,
        show_progress_bar=show_progress_bar,
    )


def evaluate_model(
    model, pairs: PairData, *, name: str = "dev", show_progress_bar: bool = False
) -> SimilarityMetrics:
    """Scores an already loaded SentenceTransformer on validated pairs."""
    results = build_evaluator(pairs, name, show_progress_bar=show_progress_bar)(model)
    return SimilarityMetrics.from_results(results, name, pairs.table.num_rows)


def evaluate_retrieval(model, pairs: PairData, threshold: float, *, progress: bool = False):
    """MRR@10, NDCG@10 and recall@1/10 of retrieving each relevant pair's second sentence by
    its first (``RetrievalMetrics``)."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )
    from sentence_transformers.util import cos_sim

    table = pairs.table
    firsts, seconds = table.column("sentence_0").to_pylist(), table.column("sentence_1").to_pylist()
    corpus = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(seconds))}
    relevant: dict[str, set[str]] = {}
    for first, second, label in zip(
        firsts, seconds, table.column("label").to_pylist(), strict=True
    ):
        if label >= threshold:
            relevant.setdefault(first, set()).add(corpus[second])
    if not relevant:
        raise DataError(f"no pair has a label of at least {threshold} (the retrieval threshold)")
    queries = {f"q{i}": text for i, text in enumerate(relevant)}
    scores = InformationRetrievalEvaluator(
        queries=queries,
        corpus={cid: text for text, cid in corpus.items()},
        relevant_docs={qid: relevant[text] for qid, text in queries.items()},
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[1, 10],
        score_functions={"cosine": cos_sim},
        batch_size=EVAL_BATCH_SIZE,
        show_progress_bar=progress,
        write_csv=False,
    )(model)
    return RetrievalMetrics(
        threshold=threshold,
        queries=len(queries),
        corpus=len(corpus),
        **{
            field: float(scores[f"cosine_{metric}"])
            for field, metric in (
                ("mrr_at_10", "mrr@10"),
                ("ndcg_at_10", "ndcg@10"),
                ("recall_at_1", "recall@1"),
                ("recall_at_10", "recall@10"),
            )
        },
    )


def evaluate(
    model: str,
    data: PairDataConfig,
    *,
    storage_config: StorageConfig | None = None,
    device: str | None = None,
    progress: bool = False,
    retrieval_threshold: float | None = None,
) -> SimilarityMetrics:
    """Loads ``model`` (path, s3://, hub id or the bundled default) and scores it on ``data``;
    ``retrieval_threshold``: retrieval metrics too (``evaluate_retrieval``); ``progress``: say
    what runs and draw the encoding's progress bar (the CLI)."""
    from sbertray.modeling import load_model

    pairs = load_pairs(data, storage_config)
    if progress:
        print(
            f"[sbertray] embedding {pairs.table.num_rows:,} pairs ({2 * pairs.table.num_rows:,} "
            "sentences) with the model; scoring their cosine against the labels",
            flush=True,
        )
    loaded = load_model(model, storage_config=storage_config, device=device)
    metrics = evaluate_model(loaded, pairs, name=data.name or "dev", show_progress_bar=progress)
    if retrieval_threshold is None:
        return metrics
    retrieval = evaluate_retrieval(loaded, pairs, retrieval_threshold, progress=progress)
    return replace(metrics, retrieval=retrieval)
