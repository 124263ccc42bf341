"""An orthogonal rotation of a trained model's vectors that puts what they mean into their first
dimensions (``training.matryoshka_rotation``).

``MatryoshkaLoss`` over a short fine-tuning run barely moves where a pretrained model keeps its
meaning (README, "Matryoshka"); a rotation of the finished vectors moves much more of it. It is
fitted after training, on the frozen model's vectors of a sample of the training pairs, with a
ranking loss (``loss.rotation_loss``) summed over the Matryoshka dims, and appended as a
bias-free ``Dense`` layer before ``Normalize``. Orthogonal, it keeps every full-width cosine, so
the full vectors score exactly as the model did without it.

The fit starts from the principal axes of the vectors and turns them by ``exp(S)`` for a
skew-symmetric ``S`` that Adam trains: every step stays a rotation. (Adam on the matrix itself,
mapped back to the nearest rotation after each step, made the loss worse, not better.) A tenth
of the pairs is held out: the fit keeps the epoch whose held-out loss is lowest, since the
train pairs alone are fitted past what carries over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sbertray.modeling import is_linear_layer

LossFromEmbeddings = Callable[[list[Tensor], Tensor], Tensor]


@dataclass(frozen=True)
class RotationFit:
    rotation: Tensor  # (dim, dim), orthogonal; a vector v becomes rotation @ v
    epochs: int  # the epoch kept (0: the principal axes alone)
    rows: int  # the examples it was fitted to, held-out ones included
    held_out_loss: list[float]  # per epoch, from the principal axes (epoch 0) on


def principal_axes(vectors: Tensor) -> Tensor:
    """The rotation whose rows are the directions of most energy first (uncentered, so the
    rotation keeps cosines)."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    return torch.linalg.svd(unit, full_matrices=False)[2].float()


def matryoshka_loss(
    loss: LossFromEmbeddings,
    columns: Sequence[Tensor],
    labels: Tensor,
    dims: Sequence[int],
    weights: Sequence[float],
) -> Tensor:
    """``loss`` on the columns' first ``d`` dimensions, weighted and summed over ``dims``."""
    return sum(
        w * loss([c[:, :d] for c in columns], labels) for d, w in zip(dims, weights, strict=True)
    )


def fit_rotation(
    columns: Sequence[Tensor],
    labels: Tensor,
    loss: LossFromEmbeddings,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    max_epochs: int = 60,
    patience: int = 5,
    batch_size: int = 256,
    learning_rate: float = 5e-4,
    seed: int = 42,
) -> RotationFit:
    """Fits the rotation to ``columns`` (one (rows, dim) tensor per sentence column, row i of
    each from the same example) and ``labels`` (one per row; ignored by unlabelled losses)."""
    weights = list(weights or [1.0] * len(dims))
    generator = torch.Generator().manual_seed(seed)
    rows = columns[0].shape[0]
    order = torch.randperm(rows, generator=generator)
    held = order[: max(1, rows // 10)]
    train = order[len(held) :]

    def held_out(rotation: Tensor) -> float:
        with torch.no_grad():
            rotated = [c[held] @ rotation.T for c in columns]
            return float(matryoshka_loss(loss, rotated, labels[held], dims, weights))

    start = principal_axes(torch.cat(list(columns)))
    turn = torch.nn.Parameter(torch.zeros_like(start))

    def rotation() -> Tensor:
        return torch.linalg.matrix_exp(turn - turn.T) @ start

    optimizer = torch.optim.Adam([turn], lr=learning_rate)
    best, history = (start.clone(), 0), [held_out(start)]
    for epoch in range(1, max_epochs + 1):
        for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            current = rotation()
            rotated = [c[batch] @ current.T for c in columns]
            optimizer.zero_grad()
            matryoshka_loss(loss, rotated, labels[batch], dims, weights).backward()
            optimizer.step()
        with torch.no_grad():  # in float64: a rotation to float32's precision
            skew = (turn - turn.T).double()
            current = (torch.linalg.matrix_exp(skew) @ start.double()).float()
        history.append(held_out(current))
        if history[-1] < history[best[1]]:
            best = (current, epoch)
        elif epoch - best[1] >= patience:
            break
    return RotationFit(rotation=best[0], epochs=best[1], rows=rows, held_out_loss=history)


# Pairs embedded for the fit: all of STS-B's 5,749; a random sample of a larger set (the fit
# has 384 x 383 / 2 free parameters, and embedding more rows costs more than the fit gains).
FIT_ROWS = 20_000
_TEXT_COLUMNS = ("sentence_0", "sentence_1", "sentence_2")


def fit_to_model(model, shards, storage_config, training) -> RotationFit:
    """Fits the rotation to ``model``'s vectors of a random sample of the training pairs
    (``shards``: the prepared pairs) over ``training.matryoshka_dims``."""
    from sbertray.train.loss import rotation_loss
    from sbertray.train.stream import PairStream

    total = sum(s.rows for s in shards)
    sample = next(
        PairStream(
            shards,
            storage_config,
            global_batch=min(FIT_ROWS, total),
            world=1,
            rank=0,
            seed=training.seed,
        ).batches(0)
    )
    columns = [
        model.encode([row[name] for row in sample], batch_size=64, convert_to_tensor=True).cpu()
        for name in _TEXT_COLUMNS
        if name in sample[0]
    ]
    labels = torch.tensor([row["label"] for row in sample], dtype=torch.float32)
    return fit_rotation(
        columns,
        labels,
        rotation_loss(model, training),
        training.matryoshka_dims,
        training.matryoshka_weights,
        seed=training.seed,
    )


def rotate(model, shards, storage_config, training) -> dict:
    """Fits the rotation to the trained ``model`` and appends it; returns what the fit found
    (for ``train_result.json``)."""
    fit = fit_to_model(model, shards, storage_config, training)
    append_rotation(model, fit.rotation)
    print(
        f"[sbertray] Matryoshka rotation: held-out loss {fit.held_out_loss[0]:.4f} -> "
        f"{fit.held_out_loss[fit.epochs]:.4f} after {fit.epochs} epoch(s) of the fit "
        f"to {fit.rows:,} examples",
        flush=True,
    )
    return {"rows": fit.rows, "epochs": fit.epochs, "held_out_loss": fit.held_out_loss}


def append_rotation(model, rotation: Tensor) -> None:
    """Makes ``rotation`` the model's last step before ``Normalize``: a bias-free ``Dense``
    layer, or, where the model has one from an earlier fit, that layer turned further."""
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    rotation = rotation.to(next(model.parameters()).device)
    last = [m for m in model if not isinstance(m, Normalize)][-1]
    if _is_rotation(last):
        with torch.no_grad():
            last.linear.weight.copy_(rotation @ last.linear.weight)
        return
    normalizes = [i for i, m in enumerate(model) if isinstance(m, Normalize)]
    for index in reversed(normalizes):
        del model[index]
    dim = rotation.shape[0]
    model.append(
        Dense(dim, dim, bias=False, activation_function=None, init_weight=rotation.clone())
    )
    if normalizes:
        model.append(Normalize())


def _is_rotation(layer) -> bool:
    return is_linear_layer(layer) and not layer.bias and layer.in_features == layer.out_features
