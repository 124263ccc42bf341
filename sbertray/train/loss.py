"""The training losses a recipe names (``training.loss``), each sentence-transformers' own, with
both sentences of a pair embedded in one forward pass where that is cheaper, and optionally
wrapped in ``MatryoshkaLoss`` (``training.matryoshka_dims``)."""

from __future__ import annotations

from collections.abc import Iterable

from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer import losses as stock
from torch import Tensor, nn

from sbertray.config import TrainingConfig

# A merged forward pads both sides to the wider one: past about 1.25 padded slots per token of
# two forwards it was measured slower than two forwards in fp32 (figures: docs/benchmarks.md).
MAX_MERGED_PADDING = 1.25


def merged_padding(widths: list[int]) -> float:
    """Token slots of one forward padded to the widest side, per slot of separate forwards."""
    return len(widths) * max(widths) / sum(widths)


class _PairInOneForward:
    """The ``forward`` of a loss computed from the embeddings of a pair's two sides
    (``compute_loss_from_embeddings``): both sides in one forward of twice the rows when their
    padded widths are close.

    The stock losses always embed the first column on its own, as suits short queries against
    long documents. sbertray's pairs are mostly two sentences of a kind, and there one forward
    does the word-embedding gradient, the dropout masks and every kernel call once instead of
    twice, with matmuls of twice the rows (docs/benchmarks.md measures it). Loss and gradients
    are the same, up to dropout sampling.

    The classes below keep the stock names on purpose: the model card's hub tag
    (``loss:CosineSimilarityLoss``) names the loss by class name, and each is that loss.
    """

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        widths = [f["input_ids"].shape[-1] for f in features if "input_ids" in f]
        merge = len(widths) == len(features) and merged_padding(widths) <= MAX_MERGED_PADDING
        # embed_columns merges what it can; it falls back to a forward per side by itself
        # when the sides' features differ in kind.
        embeddings = embed_columns(self.model, features, separate_first=not merge)
        return self.compute_loss_from_embeddings(embeddings, labels)


class CosineSimilarityLoss(_PairInOneForward, stock.CosineSimilarityLoss):
    """MSE between a pair's cosine and its label (the seed cards' loss)."""


class CoSENTLoss(_PairInOneForward, stock.CoSENTLoss):
    """Ranks the pairs of a batch by cosine in their labels' order."""


class AnglELoss(_PairInOneForward, stock.AnglELoss):
    """CoSENT on the angle difference in complex space (no vanishing gradient near cos = +-1)."""


class MultipleNegativesRankingLoss(_PairInOneForward, stock.MultipleNegativesRankingLoss):
    """Each anchor's positive against every other positive (and negative) of the batch."""


LOSSES: dict[str, type[nn.Module]] = {
    "cosine": CosineSimilarityLoss,
    "cosent": CoSENTLoss,
    "angle": AnglELoss,
}


def _in_batch_negatives(model, training: TrainingConfig) -> nn.Module:
    """MNRL over the global batch: each worker's embeddings are gathered from every worker
    (with gradients), so an anchor has the whole global batch as negatives, not its worker's
    slice. ``cached_mnrl`` is GradCache's version, which embeds in ``mini_batch_size`` pieces
    (its own forward, so no merged pair)."""
    if training.loss == "cached_mnrl":
        return stock.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=training.mini_batch_size, gather_across_devices=True
        )
    return MultipleNegativesRankingLoss(model, gather_across_devices=True)


def build_loss(model, training: TrainingConfig) -> nn.Module:
    """The recipe's loss over ``model``; with ``matryoshka_dims``, trained at each of those
    leading dimensions too (sentence-transformers' ``MatryoshkaLoss``)."""
    if training.loss in LOSSES:
        loss = LOSSES[training.loss](model)
    else:
        loss = _in_batch_negatives(model, training)
    if training.matryoshka_dims:
        loss = stock.MatryoshkaLoss(
            model,
            loss,
            matryoshka_dims=training.matryoshka_dims,
            matryoshka_weights=training.matryoshka_weights,
        )
    return loss


def rotation_loss(model, training: TrainingConfig):
    """The loss the Matryoshka rotation (``rotation.py``) is fitted with, as a function of
    embeddings already computed (one tensor per text column) and labels. Labelled pairs:
    CoSENT, whatever the recipe's loss, since it asks only that a batch's truncated cosines
    rank as the labels do, which is what the dev Spearman scores; cosine's MSE also asks them
    to match the labels' scale, and kept less of the full score (README, "Matryoshka").
    Unlabelled: MNRL over the batch in hand, in one process."""
    if training.loss in LOSSES:
        return stock.CoSENTLoss(model).compute_loss_from_embeddings
    return stock.MultipleNegativesRankingLoss(model).compute_loss_from_embeddings
