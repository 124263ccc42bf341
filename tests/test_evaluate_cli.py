"""`sbertray evaluate` as a new user meets it: STS-B's own columns and 0..5 scores."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_evaluate_names_the_flags_and_suggests_the_label_scale(
    tmp_path, stsb_dir, tiny_model_path, sbertray_main
):
    lines = (stsb_dir / "dev.tsv").read_text(encoding="utf-8").splitlines()
    dev = tmp_path / "dev.tsv"
    dev.write_text("\n".join(lines[:201]) + "\n", encoding="utf-8")  # header + 200 pairs
    base = ["evaluate", tiny_model_path, str(dev)]

    code, out, _ = sbertray_main("evaluate", "--help")
    assert code == 0 and "--sentence-0" in out and "--label-scale 0.2" in out

    code, _, err = sbertray_main(*base)
    assert code == 2 and "--sentence-0 COL --sentence-1 COL --label COL" in err

    named = [*base, "--sentence-0", "sentence1", "--sentence-1", "sentence2", "--label", "score"]
    code, _, err = sbertray_main(*named)
    assert code == 2 and "the labels run up to 5, so they look like a 0..5 scale" in err
    assert "`sbertray evaluate ... --label-scale 0.2`" in err

    code, _, err = sbertray_main(*named, "--label-scale", "0.2", "--truncate-dims", "128", "512")
    assert code == 2 and "truncate dims [512]: the model's vectors have 384 dimensions" in err

    code, out, err = sbertray_main(
        *named, "--label-scale", "0.2", "--retrieval-threshold", "0.8", "--truncate-dims", "128"
    )
    assert code == 0, err[-2000:]
    assert "[sbertray] embedding 200 pairs (400 sentences)" in out
    printed = json.loads(out[out.index("{") : out.rindex("}") + 1])
    full, cut = printed["spearman_cosine"], printed["spearman_cosine_by_dim"]["128"]
    assert 0 < cut < 1 and cut != full
    assert f"Spearman {full:.4f}" in out and "on 200 pairs" in out
    assert f"first dimensions only: 128d {cut:.4f} ({cut / full:.1%})" in out
    retrieval = printed["retrieval"]
    relevant = sum(float(line.split("\t")[2]) * 0.2 >= 0.8 for line in lines[1:201])
    assert 0 < retrieval["queries"] <= relevant and retrieval["corpus"] <= 200
    assert 0 < retrieval["recall_at_1"] <= retrieval["recall_at_10"] <= 1
    assert 0 < retrieval["mrr_at_10"] <= 1 and "MRR@10=" in out
