"""Similarity scores written beside the embeddings: pair cosine and exact top-k."""

from __future__ import annotations

import numpy as np

# Blocks keep the score matrix small: 2,048 queries x 65,536 references x 4 bytes = 512 MiB at
# most, whatever the sizes of the input and the reference set.
QUERY_BLOCK = 2048
REFERENCE_BLOCK = 65_536


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pair_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine between two (n, dim) arrays, float32."""
    if a.shape != b.shape:
        raise ValueError(f"pair_cosine needs equal shapes, got {a.shape} and {b.shape}")
    return np.einsum("ij,ij->i", normalize_rows(a), normalize_rows(b)).astype(np.float32)


def top_k(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query row against ``reference`` rows.

    Returns (indices, scores), each (n, min(k, len(reference))), best first. Ties keep the
    lower reference index first (stable, so reruns give identical output). numpy only: an
    embedding actor on an exported backend never imports torch.
    """
    k = min(k, len(reference))
    n = len(queries)
    if n == 0 or k == 0:
        return np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32)
    q_all = normalize_rows(queries.astype(np.float32))
    r_all = normalize_rows(reference.astype(np.float32))
    out_idx = np.empty((n, k), dtype=np.int64)
    out_score = np.empty((n, k), dtype=np.float32)
    for qs in range(0, n, QUERY_BLOCK):
        q = q_all[qs : qs + QUERY_BLOCK]
        best_i = best_s = None
        for rs in range(0, len(r_all), REFERENCE_BLOCK):
            i, s = _block_top_k(q @ r_all[rs : rs + REFERENCE_BLOCK].T, k)
            i = i + rs
            if best_i is not None:  # merge with the best of the earlier reference blocks
                i, s = np.concatenate([best_i, i], 1), np.concatenate([best_s, s], 1)
                order = np.lexsort((i, -s), axis=1)[:, :k]
                i, s = np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1)
            best_i, best_s = i, s
        out_idx[qs : qs + len(q)] = best_i
        out_score[qs : qs + len(q)] = best_s
    return out_idx, out_score


def _block_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``min(k, columns)`` columns of each row: score descending, index ascending.
    A linear-time partition, then an exact sort of the few rows whose k-th score is tied
    with a column the partition left out."""
    columns = scores.shape[1]
    k = min(k, columns)
    if k < columns:
        cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, cand, 1).min(1)
        for row in np.flatnonzero((scores >= kth[:, None]).sum(1) > k):
            cand[row] = np.argsort(-scores[row], kind="stable")[:k]
    else:
        cand = np.tile(np.arange(columns), (len(scores), 1))
    values = np.take_along_axis(scores, cand, 1)
    order = np.lexsort((cand, -values), axis=1)
    return np.take_along_axis(cand, order, 1), np.take_along_axis(values, order, 1)
