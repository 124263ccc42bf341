"""Strided subsets of the shared STS-B splits, for tests that train or score on real data."""

from __future__ import annotations

from pathlib import Path


def every_nth_pair(stsb_dir: Path, split: str, step: int, folder: Path) -> Path:
    """The header and every ``step``-th pair of ``split`` (``train``/``dev``), written once into
    ``folder``. STS-B is ordered by genre, captions first: a stride keeps every genre."""
    path = folder / f"{split}_every_{step}.tsv"
    if not path.exists():
        lines = (stsb_dir / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        path.write_text("\n".join([lines[0], *lines[1::step]]) + "\n", encoding="utf-8")
    return path
