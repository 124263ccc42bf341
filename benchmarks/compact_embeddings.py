"""What each compact embedding option costs, measured in one run on STS-B dev (1,500 pairs):
bytes per row of the stored vector, STS-B dev Spearman computed from the stored vectors, and
the overlap of each sentence's 10 nearest neighbours (among the 1,500 second sentences) with
those of the float32 vectors.

The vectors are written by the embedding stage itself (the code every actor runs, here without
Ray) in pair mode and read back from its Parquet output.

    .venv/bin/python benchmarks/compact_embeddings.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from _common import record, stsb_rows  # noqa: E402

OPTIONS = [
    ("float32", None),
    ("float16", None),
    ("int8", None),
    ("binary", None),
    ("float32", 128),
    ("int8", 128),
    ("binary", 128),
]


def _similarity(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """All-pairs similarity as a user would search each format."""
    if dtype == "binary":  # Hamming: matching bits
        bits_a, bits_b = np.unpackbits(a, axis=1), np.unpackbits(b, axis=1)
        return (bits_a[:, None, :] == bits_b[None, :, :]).sum(-1).astype(np.float32)
    a, b = a.astype(np.float32), b.astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    from sbertray.config import EmbedConfig, parse_config
    from sbertray.embed import compact
    from sbertray.embed.encoder import EncoderSpec
    from sbertray.embed.planning import plan_input
    from sbertray.embed.stage import EmbedStage
    from sbertray.modeling import bundled_model_path

    rows = stsb_rows("dev")
    gold = np.array([s for _, _, s in rows])
    work = Path(tempfile.mkdtemp(prefix="sbertray-compact-"))
    (work / "in").mkdir()
    pq.write_table(
        pa.table(
            {
                "id": list(range(len(rows))),
                "text": [a for a, _, _ in rows],
                "pair": [b for _, b, _ in rows],
            }
        ),
        work / "in" / "dev.parquet",
    )
    spec = EncoderSpec(model=bundled_model_path(), backend="openvino", precision="fp32")
    results, reference_top = {}, None
    ranges = None
    for dtype, truncate in OPTIONS:
        name = f"{dtype}" + (f", first {truncate} dims" if truncate else "")
        out = work / f"{dtype}-{truncate}"
        config = parse_config(
            EmbedConfig,
            {
                "input": {"path": str(work / "in"), "pair_column": "pair"},
                "output": {"path": str(out), "embedding_dtype": dtype, "truncate_dim": truncate},
            },
        )
        (unit,) = plan_input(config).units
        metadata = {}
        if dtype == "int8":  # calibrated on the data itself, as a first run does on its sample
            full = pq.read_table(work / "float32-None" / "dev.part-0000.parquet")
            sample = np.stack(full.column("embedding").to_numpy(zero_copy_only=False))
            ranges = compact.calibrate(sample, config.output)
            metadata["int8_ranges"] = ranges
        table = pq.read_table(out / EmbedStage(config, spec, metadata).process(unit).output)
        a = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        b = np.stack(table.column("embedding_pair").to_numpy(zero_copy_only=False))
        sims = _similarity(a, b, dtype)
        spearman = spearmanr(np.diag(sims), gold).statistic
        top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
        if reference_top is None:
            reference_top = top
        overlap = np.mean(
            [len(set(x) & set(y)) / 10 for x, y in zip(top, reference_top, strict=True)]
        )
        results[name] = {
            "bytes_per_row": int(a.nbytes // len(a)),
            "stsb_dev_spearman": round(float(spearman), 4),
            "top10_overlap_with_float32": round(float(overlap), 3),
        }
        print(f"{name:<28} {results[name]}", flush=True)
    record("compact_embeddings", results)


if __name__ == "__main__":
    main()
