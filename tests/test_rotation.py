"""The Matryoshka rotation (``sbertray.train.rotation``): the fit stays a rotation, keeps every
full-width cosine and moves what the labels rank into the first dimensions; a model with it
appended saves, loads, turns again and runs on the ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sentence_transformers.sentence_transformer import losses as stock

from sbertray.config import ConfigError, TrainingConfig, parse_config
from sbertray.embed.backends import encoder_for_model
from sbertray.embed.exported import unsupported_reason
from sbertray.train.rotation import append_rotation, fit_rotation, principal_axes

SENTENCES = ["A man is playing a guitar.", "The cat sleeps.", "Stocks fell sharply today.", ""]


def _pairs(rows: int, seed: int = 0):
    """Pairs whose label is the cosine of a 4-dimensional meaning, hidden in 32 dimensions
    among louder noise (so the principal axes put noise first), turned by one random rotation
    whatever the seed."""
    g = torch.Generator().manual_seed(seed)
    meaning_a = torch.randn(rows, 4, generator=g)
    meaning_b = meaning_a + torch.randn(rows, 4, generator=g) * torch.rand(rows, 1, generator=g)
    labels = torch.nn.functional.cosine_similarity(meaning_a, meaning_b).clamp(0, 1)
    turn = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(99)))[0]

    def embed(meaning: torch.Tensor) -> torch.Tensor:
        return torch.cat([meaning, 3 * torch.randn(rows, 28, generator=g)], dim=1) @ turn.T

    return embed(meaning_a), embed(meaning_b), labels


def _spearman(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, dims: int) -> float:
    cosine = torch.nn.functional.cosine_similarity(a[:, :dims], b[:, :dims])
    return spearmanr(cosine.numpy(), labels.numpy()).statistic


def test_the_fit_is_a_rotation_that_puts_the_ranking_first():
    a, b, labels = _pairs(3000)
    loss = stock.CosineSimilarityLoss(model=torch.nn.Identity()).compute_loss_from_embeddings
    fit = fit_rotation([a, b], labels, loss, dims=(32, 8, 4), learning_rate=1e-2)
    rotation = fit.rotation
    assert torch.allclose(rotation @ rotation.T, torch.eye(32), atol=1e-5)
    assert fit.rows == 3000 and fit.epochs >= 1
    assert min(fit.held_out_loss) == fit.held_out_loss[fit.epochs] < fit.held_out_loss[0]
    ra, rb = a @ rotation.T, b @ rotation.T
    # Full width: the same cosines; the first 4 dimensions: the meaning, not the noise.
    cosine = torch.nn.functional.cosine_similarity
    assert torch.allclose(cosine(ra, rb), cosine(a, b), atol=1e-5)
    test_a, test_b, test_labels = _pairs(2000, seed=1)
    start = principal_axes(torch.cat([a, b]))
    before = _spearman(test_a @ start.T, test_b @ start.T, test_labels, 4)
    after = _spearman(test_a @ rotation.T, test_b @ rotation.T, test_labels, 4)
    assert after > before + 0.3 and after > _spearman(test_a, test_b, test_labels, 32), (
        before,
        after,
    )


def test_a_rotated_model_keeps_its_cosines_saves_turns_again_and_exports(tiny_model, tmp_path):
    """Appended before Normalize: full-width vectors are the old ones turned; a second fit
    turns the same layer further; the ONNX export folds the layer in and gives the same
    vectors as the model."""
    import copy

    model = copy.deepcopy(tiny_model)
    before = model.encode(SENTENCES)
    first = torch.linalg.qr(torch.randn(384, 384, generator=torch.Generator().manual_seed(3)))[0]
    append_rotation(model, first)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    np.testing.assert_allclose(model.encode(SENTENCES), before @ first.numpy().T, atol=1e-5)
    second = torch.linalg.qr(torch.randn(384, 384, generator=torch.Generator().manual_seed(4)))[0]
    append_rotation(model, second)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    turned = before @ (second @ first).numpy().T
    np.testing.assert_allclose(model.encode(SENTENCES), turned, atol=1e-5)

    model.save(str(tmp_path / "rotated"))
    from sentence_transformers import SentenceTransformer

    loaded = SentenceTransformer(str(tmp_path / "rotated"), device="cpu")
    np.testing.assert_allclose(loaded.encode(SENTENCES), turned, atol=1e-5)
    assert unsupported_reason(loaded) is None
    onnx = encoder_for_model(loaded, backend="onnx", model_dir=str(tmp_path / "rotated"))
    np.testing.assert_allclose(onnx.encode(SENTENCES).embeddings, turned, atol=1e-4)


def test_matryoshka_rotation_needs_matryoshka_dims():
    assert parse_config(TrainingConfig, {"matryoshka_dims": [384, 128]}).rotates
    assert not parse_config(
        TrainingConfig, {"matryoshka_dims": [384, 128], "matryoshka_rotation": False}
    ).rotates
    assert not parse_config(TrainingConfig, {}).rotates
    with pytest.raises(ConfigError, match="`training.matryoshka_rotation` rotates for"):
        parse_config(TrainingConfig, {"matryoshka_rotation": True})


def test_a_layer_that_is_not_a_rotation_is_not_turned_further(tiny_model):
    """A residual Dense is no linear map: the rotation goes after it, and the export refuses it."""
    import copy

    from sentence_transformers.sentence_transformer.modules import Dense

    model = copy.deepcopy(tiny_model)
    del model[2]  # Normalize
    model.append(Dense(384, 384, bias=False, activation_function=None, use_residual=True))
    residual = model[2].linear.weight.detach().clone()
    append_rotation(model, torch.eye(384))
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Dense"]
    assert torch.equal(model[2].linear.weight, residual)
    assert "Use `backend: torch`" in unsupported_reason(model)
