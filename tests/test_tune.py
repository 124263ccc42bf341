"""`sbertray tune`: a search on Ray Tune over a recipe's training settings, run as users run it
(the CLI, its own local Ray), killed mid-search and resumed; bad `tune:` blocks fail as config
errors naming the key. The tiny model on the concept pairs sample: mechanics, not quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from processes import REPO, kill_when, run, sbertray_cmd

from sbertray.config import ConfigError, TrainConfig, load_config, parse_config

pytestmark = pytest.mark.slow
PAIRS = REPO / "jobs/samples/concept_pairs.csv"


def _recipe(tmp_path: Path, tiny_model_path: str, **tune) -> Path:
    recipe = {
        "name": "concepts-search",
        "base_model": tiny_model_path,
        "train": {"path": str(PAIRS)},
        "dev": {"path": str(PAIRS), "name": "concepts"},
        "training": {"batch_size": 10, "epochs": 2, "logging_steps": 4},
        "output": {"model": str(tmp_path / "model")},
        "tune": {
            # In this order: the first trial learns, the second barely moves from the base model
            # and is stopped after its first epoch (ASHA).
            "search": {"learning_rate": [2e-4, 1e-7], "epochs": [3]},
            "trials": 2,
            **tune,
        },
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _trial_models(out: Path) -> list[Path]:
    return sorted(out.glob("trials/*/model/train_result.json"))  # written last


@pytest.mark.long
def test_a_search_resumes_after_a_kill_and_writes_the_best_recipe(
    tmp_path, tiny_model_path, sbertray_main
):
    recipe, out = _recipe(tmp_path, tiny_model_path), tmp_path / "model-tune"
    code, printed, err = sbertray_main("tune", str(recipe), "--dry-run")
    assert code == 0, err[-3000:]
    assert (
        "2 trials (every combination once), 1 at a time, maximizing dev spearman_cosine" in printed
    )
    assert "40 training pairs, 12 to 12 steps" in printed and not out.exists()

    # Killed (driver and its Ray) once the first trial's model is written.
    kill_when(sbertray_cmd("tune", str(recipe)), lambda: _trial_models(out), what="a trial")
    first = _trial_models(out)
    assert len(first) == 1
    first_written = first[0].stat().st_mtime

    rerun = run(sbertray_cmd("tune", str(recipe)))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming the search" in rerun.stdout
    assert "trials done 2/2" in rerun.stdout
    assert _trial_models(out) == first and first[0].stat().st_mtime == first_written  # kept

    report = json.loads((out / "report.json").read_text())
    trials = sorted(report["trials"], key=lambda t: t["params"]["learning_rate"], reverse=True)
    assert [(t["status"], t["epochs"]) for t in trials] == [("done", 3), ("stopped early", 1)]
    assert [t["model_url"] is not None for t in trials] == [True, False]
    best = trials[0]
    assert report["best"] == best["trial_id"] and best["score"] > trials[1]["score"] + 0.1
    assert (out / "trials.png").stat().st_size > 0
    assert "| trial | epochs | learning_rate | spearman_cosine |" in (out / "report.md").read_text()

    # The best recipe is a plain recipe: the best settings, the recipe's output, no search.
    best_recipe = load_config(TrainConfig, out / "best_recipe.yaml")
    assert best_recipe.tune is None and best_recipe.output.model == str(tmp_path / "model")
    assert best_recipe.training.learning_rate == pytest.approx(best["params"]["learning_rate"])
    card = (out / "best_model" / "README.md").read_text()
    scored = json.loads((out / "best_model" / "train_result.json").read_text())
    assert scored["dev_metrics"]["spearman_cosine"] == pytest.approx(best["score"])
    assert "concepts-search" in card


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"search": {}}, r"`tune.search` varies nothing"),
        ({"search": {"learning_rate": {"low": 1e-3, "high": 1e-5}}}, r"`low` \(0.001\) must be"),
        ({"search": {"epoch": [1]}}, r"unknown key `tune.search.epoch` \(did you mean `epochs`"),
        ({"search": {"batch_size": [10, 12]}}, r"\[12\]: each must be a positive multiple"),
        ({"search": {"loss": ["mnrl"]}}, r"`training.loss: mnrl` takes every training pair"),
        ({"search": {"epochs": [1]}, "metric": "mrr@10"}, r"set `training.retrieval_threshold`"),
        ({"search": {"matryoshka": [True]}}, r"set them, e.g. \[384, 256, 128, 64\]"),
        ({"search": {"epochs": [1]}, "concurrency": 0}, r"`tune.concurrency`"),
    ],
)
def test_bad_tune_blocks_name_the_key(tune, message):
    recipe = {
        "name": "x",
        "train": {"path": "a.csv"},
        "dev": {"path": "b.csv"},
        "training": {"batch_size": 10},
        "scaling": {"num_workers": 5},
        "output": {"model": "out"},
        "tune": tune,
    }
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, recipe)
