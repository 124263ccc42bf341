"""Similarity scores written beside the embeddings: pair cosine and exact top-k."""

from __future__ import annotations

import numpy as np

# Blocks keep the score matrix small: 4,096 queries x 65,536 references x 4 bytes = 1 GiB at
# most, whatever the sizes of the input and the reference set.
QUERY_BLOCK = 4096
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
    lower reference index first (stable, so reruns give identical output).
    """
    import torch

    k = min(k, len(reference))
    n = len(queries)
    if n == 0 or k == 0:
        return np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32)
    q_all = torch.from_numpy(normalize_rows(queries.astype(np.float32)))
    r_all = torch.from_numpy(normalize_rows(reference.astype(np.float32)))
    out_idx = np.empty((n, k), dtype=np.int64)
    out_score = np.empty((n, k), dtype=np.float32)
    for qs in range(0, n, QUERY_BLOCK):
        q = q_all[qs : qs + QUERY_BLOCK]
        best_s = best_i = None
        for rs in range(0, len(r_all), REFERENCE_BLOCK):
            scores = q @ r_all[rs : rs + REFERENCE_BLOCK].T
            s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1, sorted=True)
            i = i + rs
            if best_s is None:
                best_s, best_i = s, i
            else:
                cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                # Merge: order by score desc, then index asc, so ties stay deterministic.
                order = np.lexsort((cand_i.numpy(), -cand_s.numpy()), axis=1)[:, :k]
                order_t = torch.from_numpy(order)
                best_s = torch.gather(cand_s, 1, order_t)
                best_i = torch.gather(cand_i, 1, order_t)
        out_idx[qs : qs + len(q)] = best_i.numpy()
        out_score[qs : qs + len(q)] = best_s.numpy()
    return out_idx, out_score
