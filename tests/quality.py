"""The README's quality promises for reduced precisions, in one place: per-row cosine to fp32
and STS-B dev Spearman within 0.005 of fp32."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from sbertray.embed.similarity import pair_cosine

BF16_WORST_ROW = 0.9999  # every row, bf16 (OpenVINO and torch)
INT8_MEAN_ROW = 0.99  # mean over rows, int8 (ONNX Runtime)
SPEARMAN_TOLERANCE = 0.005


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_keeps_quality(got, fp32, gold, *, worst_row=None, mean_row=None) -> None:
    """``got`` and ``fp32``: (sentences 1, sentences 2) embeddings of STS-B dev pairs."""
    rows = np.concatenate([row_cosine(got[0], fp32[0]), row_cosine(got[1], fp32[1])])
    if worst_row is not None:
        assert rows.min() >= worst_row, rows.min()
    if mean_row is not None:
        assert rows.mean() >= mean_row, rows.mean()
    reference = spearmanr(pair_cosine(*fp32), gold).statistic
    reduced = spearmanr(pair_cosine(*got), gold).statistic
    assert abs(reduced - reference) <= SPEARMAN_TOLERANCE, (reduced, reference)
