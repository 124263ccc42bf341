"""sbertray's CosineSimilarityLoss against sentence-transformers' own, on the real model: one
forward for pairs of close widths, two for lopsided ones, the same loss and gradients either way."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CosineSimilarityLoss as StockCosineSimilarityLoss,
)

from sbertray.train.loss import MAX_MERGED_PADDING, CosineSimilarityLoss, merged_padding


@pytest.fixture(scope="module")
def model(bundled_model_path):
    """A model of the module's own: these tests fill its gradients. Eval mode, so no dropout."""
    return SentenceTransformer(bundled_model_path, device="cpu").eval()


def _loss_and_grads(model, loss, sides, labels) -> tuple[float, torch.Tensor, int]:
    """The loss, every weight's gradient flattened into one vector, and the model's forwards."""
    forwards = []
    hook = model[0].register_forward_hook(lambda *_: forwards.append(1))
    model.zero_grad(set_to_none=True)
    value = loss([model.preprocess(texts) for texts in sides], labels)
    value.backward()
    hook.remove()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return value.item(), torch.cat(grads), len(forwards)


def _assert_same_training_signal(model, sides, labels) -> int:
    ours = _loss_and_grads(model, CosineSimilarityLoss(model), sides, labels)
    stock = _loss_and_grads(model, StockCosineSimilarityLoss(model), sides, labels)
    assert stock[2] == 2
    assert ours[0] == pytest.approx(stock[0], rel=1e-5)
    assert torch.allclose(ours[1], stock[1], rtol=1e-3, atol=1e-7)
    assert torch.nn.functional.cosine_similarity(ours[1], stock[1], dim=0) > 0.99999
    return ours[2]


def test_pairs_of_close_widths_take_one_forward_with_the_stock_gradients(model, stsb_dev):
    first, second, scores = stsb_dev
    sides, labels = [first[:16], second[:16]], torch.tensor(scores[:16] / 5, dtype=torch.float32)
    widths = [model.preprocess(texts)["input_ids"].shape[1] for texts in sides]
    assert widths[0] != widths[1]  # the narrower side is padded in the merged forward
    assert merged_padding(widths) <= MAX_MERGED_PADDING
    assert _assert_same_training_signal(model, sides, labels) == 1


def test_lopsided_pairs_take_a_forward_each(model, stsb_dev):
    first, second, scores = stsb_dev
    documents = [" ".join(second[i : i + 6]) for i in range(16)]
    sides, labels = [first[:16], documents], torch.tensor(scores[:16] / 5, dtype=torch.float32)
    widths = [model.preprocess(texts)["input_ids"].shape[1] for texts in sides]
    assert merged_padding(widths) > MAX_MERGED_PADDING
    assert _assert_same_training_signal(model, sides, labels) == 2
