"""Pearson/Spearman of cosine similarity against gold labels, via sentence-transformers'
``EmbeddingSimilarityEvaluator`` (the same numbers the seed cards report)."""

from __future__ import annotations

from dataclasses import dataclass

from sbertray.config import PairDataConfig, StorageConfig
from sbertray.train.data import PairData, load_pairs

EVAL_BATCH_SIZE = 64  # inference only: larger than any recipe's train batch, still small on CPU


@dataclass(frozen=True)
class SimilarityMetrics:
    name: str
    pearson_cosine: float
    spearman_cosine: float
    num_pairs: int

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
        return {
            "dataset": self.name,
            "pearson_cosine": self.pearson_cosine,
            "spearman_cosine": self.spearman_cosine,
            "num_pairs": self.num_pairs,
        }


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


def evaluate(
    model: str,
    data: PairDataConfig,
    *,
    storage_config: StorageConfig | None = None,
    device: str | None = None,
    progress: bool = False,
) -> SimilarityMetrics:
    """Loads ``model`` (path, s3://, hub id or the bundled default) and scores it on ``data``;
    ``progress``: say what runs and draw the encoding's progress bar (the CLI)."""
    from sbertray.modeling import load_model

    pairs = load_pairs(data, storage_config)
    if progress:
        print(
            f"[sbertray] embedding {pairs.table.num_rows:,} pairs ({2 * pairs.table.num_rows:,} "
            "sentences) with the model; scoring their cosine against the labels",
            flush=True,
        )
    loaded = load_model(model, storage_config=storage_config, device=device)
    return evaluate_model(loaded, pairs, name=data.name or "dev", show_progress_bar=progress)
