"""Run under ``torch.distributed.run`` by test_train_losses: each rank computes each
in-batch-negatives loss of a recipe (``build_loss``) on its half of one batch and writes them to
``OUT/rank-R.json``. With the embeddings gathered across ranks, the ranks' mean equals the loss
of the whole batch in one process; without, each rank ranks against its half only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from sbertray.config import TrainingConfig
from sbertray.train.loss import build_loss

ANCHORS = [f"question number {i} about topic {i % 3}" for i in range(8)]
POSITIVES = [f"the answer to question {i}, on topic {i % 3}" for i in range(8)]


def batch_loss(model, loss_name: str, anchors: list[str], positives: list[str]) -> float:
    loss = build_loss(model, TrainingConfig(loss=loss_name, mini_batch_size=2))
    features = [model.tokenize(anchors), model.tokenize(positives)]
    value = loss(features, torch.ones(len(anchors)))
    value.backward()  # cached_mnrl computes its gradients here; it must not hang across ranks
    return float(value)


LOSSES = ("mnrl", "cached_mnrl")


def main(model_path: str, out: str) -> None:
    torch.manual_seed(0)
    model = SentenceTransformer(model_path, device="cpu")
    model.eval()  # no dropout: the same embeddings in every process
    if "RANK" not in os.environ:
        whole = {name: batch_loss(model, name, ANCHORS, POSITIVES) for name in LOSSES}
        Path(out, "whole.json").write_text(json.dumps(whole))
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = slice(rank * len(ANCHORS) // world, (rank + 1) * len(ANCHORS) // world)
    values = {name: batch_loss(model, name, ANCHORS[share], POSITIVES[share]) for name in LOSSES}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(values))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
