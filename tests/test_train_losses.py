"""The recipe's loss (`training.loss`) and Matryoshka training (`training.matryoshka_dims`),
each trained through Ray Train on an eighth of STS-B train with the tiny model and scored on
500 STS-B dev pairs (mechanics and direction: each beats the base model; quality figures are
measured with MiniLM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from sbertray.config import ConfigError, TrainConfig, load_config
from sbertray.embed.similarity import pair_cosine
from sbertray.train import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DEV_SPEARMAN = "stsb-dev_spearman_cosine"


def _recipe(stsb_dir: Path, tmp_path: Path, tiny_model_path: str, *overrides: str) -> TrainConfig:
    lines = (stsb_dir / "train.tsv").read_text(encoding="utf-8").splitlines()
    subset = tmp_path / "train_subset.tsv"
    if not subset.exists():
        subset.write_text("\n".join([lines[0], *lines[1::8]]) + "\n", encoding="utf-8")
    return load_config(
        TrainConfig,
        REPO / "jobs/configs/stsb.yaml",
        [
            f"base_model={tiny_model_path}",
            "training.epochs=1",
            f"train.path={subset}",
            "training.eval_every=end",
            "training.select_best=false",
            "dev.limit=500",
            *overrides,
        ],
    )


@pytest.mark.parametrize(("loss", "card_name"), [("cosent", "CoSENTLoss"), ("angle", "AnglELoss")])
def test_each_loss_beats_the_base_model(
    ray_2cpu, stsb_dir, tmp_path, tiny_model_path, loss, card_name
):
    model = tmp_path / loss
    result = train(
        _recipe(
            stsb_dir, tmp_path, tiny_model_path, f"training.loss={loss}", f"output.model={model}"
        )
    )
    base, trained = result.eval_log[0][DEV_SPEARMAN], result.dev_metrics["spearman_cosine"]
    assert result.eval_log[0]["step"] == 0 and trained > base + 0.01, (base, trained)
    assert f"loss:{card_name}" in (model / "README.md").read_text()  # the card's hub tag


def _spearman_at(model_dir: Path, dims: int, stsb_dev) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", truncate_dim=dims)
    first, second, gold = (part[:500] for part in stsb_dev)  # the dev pairs training scored
    return spearmanr(pair_cosine(model.encode(first), model.encode(second)), gold).statistic


def test_matryoshka_training_makes_the_first_dimensions_carry_more(
    ray_2cpu, stsb_dir, stsb_dev, tmp_path, tiny_model_path
):
    plain, nested = tmp_path / "plain", tmp_path / "nested"
    train(_recipe(stsb_dir, tmp_path, tiny_model_path, f"output.model={plain}"))
    result = train(
        _recipe(
            stsb_dir,
            tmp_path,
            tiny_model_path,
            "training.matryoshka_dims=[384, 128, 64]",
            f"output.model={nested}",
        )
    )
    assert "loss:MatryoshkaLoss" in (nested / "README.md").read_text()
    assert result.dev_metrics["spearman_cosine"] > result.eval_log[0][DEV_SPEARMAN]
    for dims in (128, 64):
        assert _spearman_at(nested, dims, stsb_dev) > _spearman_at(plain, dims, stsb_dev)
    assert np.isfinite(_spearman_at(nested, 384, stsb_dev))


def test_matryoshka_dims_are_checked_before_training(stsb_dir, tmp_path, tiny_model_path):
    from sbertray.train.run import plan_training

    with pytest.raises(ConfigError, match="largest first"):
        _recipe(stsb_dir, tmp_path, tiny_model_path, "training.matryoshka_dims=[64, 128]")
    too_wide = _recipe(
        stsb_dir,
        tmp_path,
        tiny_model_path,
        "training.matryoshka_dims=[512, 128]",
        f"output.model={tmp_path / 'm'}",
    )
    with pytest.raises(ConfigError, match="the base model's vectors have 384 dimensions"):
        plan_training(too_wide)
