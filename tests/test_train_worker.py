"""Which logged dev evaluation the worker reuses as the run's final score (instead of scoring
the model once more), and when it must score again."""

from __future__ import annotations

from types import SimpleNamespace

from sbertray.train.worker import _logged_dev_results

DEV = "stsb-dev"


def _trainer(history: list[dict], step: int, best: str | None = None, select_best=False):
    state = SimpleNamespace(log_history=history, global_step=step, best_model_checkpoint=best)
    return SimpleNamespace(state=state, args=SimpleNamespace(load_best_model_at_end=select_best))


def _eval(step: int, score: float) -> dict:
    return {
        "step": step,
        "epoch": step / 10,
        f"eval_{DEV}_spearman_cosine": score,
        f"eval_{DEV}-128d_spearman_cosine": score - 0.01,
        "eval_runtime": 1.5,
    }


HISTORY = [_eval(0, 0.80), {"step": 5, "loss": 0.2}, _eval(10, 0.86), _eval(20, 0.84)]


def test_the_last_epochs_evaluation_is_the_final_score():
    assert _logged_dev_results(_trainer(HISTORY, 20), DEV) == {
        f"{DEV}_spearman_cosine": 0.84,
        f"{DEV}-128d_spearman_cosine": 0.83,
    }


def test_the_best_epoch_loaded_back_is_scored_by_its_own_evaluation():
    trainer = _trainer(HISTORY, 20, best="/scratch/hf/checkpoint-10/", select_best=True)
    assert _logged_dev_results(trainer, DEV)[f"{DEV}_spearman_cosine"] == 0.86


def test_weights_never_evaluated_are_scored_again():
    assert _logged_dev_results(_trainer(HISTORY, 25), DEV) is None  # cut off by max_steps
    assert _logged_dev_results(_trainer(HISTORY[:2], 5), DEV) is None  # eval_every: end
    assert _logged_dev_results(_trainer(HISTORY[:1], 0), DEV) is None  # no step trained
