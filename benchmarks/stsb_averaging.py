"""Does averaging weights lift STS-B past the cosine recipe? (issue 27's 0.900 goal)

Trains all-MiniLM-L6-v2 with the seed recipe's settings (CosineSimilarityLoss, batch 16, lr 5e-5,
linear schedule, no warmup) through sentence-transformers' trainer, as ``sbertray train`` does
on one worker, and scores on STS-B dev:

- one ``--epochs`` run: each epoch's weights, the uniform average of the last k epochs
  ("epoch soups") and exponential moving averages of the weights over its steps;
- ``--seeds`` one-epoch runs that differ only in their seed, and their uniform average (a
  "model soup" of runs from the same base).

    python benchmarks/stsb_averaging.py                     # ~45 min on 2 cores
    python benchmarks/stsb_averaging.py --pairs 400 --epochs 2 --seeds 2   # a quick check
"""

from __future__ import annotations

import argparse

import torch
from _common import record, stsb_rows
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
from sentence_transformers.losses import CosineSimilarityLoss
from transformers import TrainerCallback

from sbertray.modeling import bundled_model_path

EMA_DECAYS = (0.99, 0.995, 0.998)


def _pairs(split: str, limit: int | None = None) -> dict[str, list]:
    rows = stsb_rows(split)[:limit]
    return {
        "sentence_0": [a for a, _, _ in rows],
        "sentence_1": [b for _, b, _ in rows],
        "label": [score / 5 for _, _, score in rows],
    }


def _average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        key: sum(s[key].float() for s in states) / len(states)
        if states[0][key].dtype.is_floating_point
        else states[0][key]
        for key in states[0]
    }


class _Snapshots(TrainerCallback):
    """Each epoch's weights and the moving averages of the weights over the steps."""

    def __init__(self, model):
        self.model, self.epochs, self.ema = model, [], {}

    def on_step_end(self, args, state, control, **kwargs):
        weights = self.model.state_dict()
        for decay in EMA_DECAYS:
            if decay not in self.ema:
                self.ema[decay] = {k: v.detach().float().clone() for k, v in weights.items()}
                continue
            for key, value in weights.items():
                if value.dtype.is_floating_point:
                    self.ema[decay][key].mul_(decay).add_(value.detach(), alpha=1 - decay)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


def _train(train: Dataset, epochs: int, seed: int) -> tuple[SentenceTransformer, _Snapshots]:
    model = SentenceTransformer(bundled_model_path(), device="cpu")
    model.max_seq_length = 256
    snapshots = _Snapshots(model)
    args = SentenceTransformerTrainingArguments(
        output_dir="/tmp/sbertray-stsb-averaging",
        per_device_train_batch_size=16,
        num_train_epochs=epochs,
        learning_rate=5e-5,
        warmup_steps=0,
        seed=seed,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    loss = CosineSimilarityLoss(model)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=loss, callbacks=[snapshots]
    )
    trainer.train()
    return model, snapshots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=None, help="first N train pairs (all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=4, help="one-epoch runs to average")
    opts = parser.parse_args()

    train = Dataset.from_dict(_pairs("train", opts.pairs))
    dev = _pairs("dev")
    evaluator = EmbeddingSimilarityEvaluator(dev["sentence_0"], dev["sentence_1"], dev["label"])

    def score(model, weights) -> float:
        model.load_state_dict(weights)
        return round(evaluator(model)["spearman_cosine"], 4)

    model, run = _train(train, opts.epochs, seed=42)
    result = {
        "train_pairs": len(train),
        "epochs": {i + 1: score(model, w) for i, w in enumerate(run.epochs)},
        "epoch_soups": {
            f"last {len(run.epochs) - i}": score(model, _average(run.epochs[i:]))
            for i in range(len(run.epochs) - 1)
        },
        "ema": {str(decay): score(model, w) for decay, w in run.ema.items()},
    }
    seeds = [42, *range(1, opts.seeds)]  # the recipe's seed, then 1, 2, ... (README's table)
    seeded = [_train(train, 1, seed=seed)[1].epochs[-1] for seed in seeds]
    result["one_epoch_seeds"] = {
        seed: score(model, w) for seed, w in zip(seeds, seeded, strict=True)
    }
    result["seed_soup"] = score(model, _average(seeded))
    print(result)
    record("stsb_averaging", result)


if __name__ == "__main__":
    main()
