"""The embedding actor's batch path against plain SentenceTransformer.encode."""

import numpy as np
import pytest
from quality import BF16_WORST_ROW, assert_keeps_quality

from sbertray.embed.backends import encoder_for_model
from sbertray.embed.similarity import top_k
from sbertray.hardware import cpu_has_native_bf16


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_batches_respect_the_token_budget_longest_first(base_model):
    enc = encoder_for_model(base_model, token_budget=100, max_batch_rows=4)
    lengths = np.array([5, 50, 10, 30, 7, 7, 7, 7, 7])
    batches = enc.plan_batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(9))
    assert [lengths[b].max() * len(b) <= 100 or len(b) == 1 for b in batches] == [True] * len(
        batches
    )
    assert batches[0].tolist() == [1, 3]  # 50 + 30 tokens: longest first, 2 x 50 <= 100
    assert all(len(b) <= 4 for b in batches)


def test_truncation_matches_the_tokenizer_and_is_counted(base_model):
    enc = encoder_for_model(base_model)
    long_text = "token " * 1000
    tokens = enc.token_ids([long_text, "short"])
    ids = tokens.rows()
    expected = base_model.tokenizer(long_text, truncation=True, max_length=256)["input_ids"]
    assert ids[0] == expected and tokens.truncated == 1 and len(ids[1]) == 3


def test_fp32_equals_encode(base_model, stsb_dev):
    texts = stsb_dev[0][:300] + ["", "x" * 3000]
    got = encoder_for_model(base_model, precision="fp32", token_budget=2048).encode(texts)
    ref = base_model.encode(texts, batch_size=32)
    assert _cos(got.embeddings, ref).min() >= 0.9999
    assert got.truncated == 0  # 3000 x's are few wordpieces
    assert got.embeddings.dtype == np.float32


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU without native bf16")
def test_bf16_quality_guard_on_stsb_dev(base_model, stsb_dev):
    """bf16 is the default here only because it passes this: per-row cosine to fp32 and the
    STS-B dev Spearman it gives."""
    s1, s2, gold = stsb_dev
    fp32 = encoder_for_model(base_model, precision="fp32")
    bf16 = encoder_for_model(base_model, precision="bf16")
    a32, b32 = fp32.encode(s1).embeddings, fp32.encode(s2).embeddings
    got = bf16.encode(s1).embeddings, bf16.encode(s2).embeddings
    assert_keeps_quality(got, (a32, b32), gold, worst_row=BF16_WORST_ROW)


def test_top_k_blocks_match_brute_force(monkeypatch):
    import sbertray.embed.similarity as sim

    rng = np.random.default_rng(0)
    q, r = (
        rng.normal(size=(37, 16)).astype(np.float32),
        rng.normal(size=(101, 16)).astype(np.float32),
    )
    monkeypatch.setattr(sim, "QUERY_BLOCK", 10)
    monkeypatch.setattr(sim, "REFERENCE_BLOCK", 7)  # many merges across reference blocks
    idx, scores = top_k(q, r, 5)
    full = sim.normalize_rows(q) @ sim.normalize_rows(r).T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert (idx == expected).all()
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), atol=1e-5)
    idx_small, _ = top_k(q, r[:3], 5)
    assert idx_small.shape == (37, 3)
