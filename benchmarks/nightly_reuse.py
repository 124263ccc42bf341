"""What a nightly rerun costs when the input is rewritten whole but few rows changed.

A 50,000-row set (distinct STS-B-like sentences, 8 Parquet files) is embedded once; then every
file is rewritten with 5% of its rows' texts changed and all rows shuffled across the files, as a
daily snapshot or a compaction would, and embedded again into the same output. Both runs are
`sbertray embed` processes, timed from start to exit. The rerun copies the vectors of unchanged
texts from the earlier output (row-level reuse) and embeds only the changed ones.

Goals (issue 14): the rerun runs the model on at most 6% of rows and takes at most 15% of the
full run's wall time. The rerun's output is checked against the rows: every id once, and the
texts' content keys equal to a full run's.

    .venv/bin/python benchmarks/nightly_reuse.py [--rows 50000] [--changed 0.05]

`--distinct N` draws the rows' texts from N distinct sentences instead (a table with repeated
texts: issue 26's 50,280 rows held 7,553 distinct texts in 32 files), `--files` sets the count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import record, run_sbertray, stsb_sentences  # noqa: E402


def write_snapshot(root: Path, ids: np.ndarray, texts: list[str], files: int) -> None:
    """The whole set as ``files`` files, rewriting any earlier snapshot's files in place."""
    root.mkdir(parents=True, exist_ok=True)
    for n, part in enumerate(np.array_split(ids, files)):
        table = pa.table({"id": part, "text": [texts[i] for i in part]})
        pq.write_table(table, root / f"snapshot-{n}.parquet", row_group_size=1024)


def embed(config: Path) -> tuple[float, dict]:
    """One `sbertray embed` process; its wall time and the manifest it committed."""
    seconds, proc = run_sbertray("embed", str(config))
    print("  " + "\n  ".join(line for line in proc.stdout.splitlines() if "embedding" in line))
    out = yaml.safe_load(config.read_text())["output"]["path"]
    return seconds, json.loads((Path(out) / "_manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--changed", type=float, default=0.05, help="fraction of rows edited")
    parser.add_argument("--distinct", type=int, help="texts drawn from this many sentences")
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    if args.distinct:
        pool = stsb_sentences(args.distinct)
        texts = [pool[i] for i in rng.integers(0, len(pool), args.rows)]
    else:  # distinct texts: no row is saved by the repeated-text rule, reuse alone is measured
        texts = [f"{s} (#{i})" for i, s in enumerate(stsb_sentences(args.rows))]
    work = Path(tempfile.mkdtemp(prefix="sbertray-reuse-"))
    try:
        inp, out = work / "in", work / "out"
        config = work / "embed.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "input": {"path": str(inp), "id_column": "id"},
                    "output": {"path": str(out), "rows_per_file": 8192},
                }
            )
        )
        ids = np.arange(args.rows)
        write_snapshot(inp, ids, texts, args.files)
        print(f"full run, {args.rows:,} rows:")
        full_s, full_manifest = embed(config)

        edited = rng.choice(ids, int(args.changed * args.rows), replace=False)
        for i in edited:
            texts[i] += " (edited)"
        rng.shuffle(ids)
        write_snapshot(inp, ids, texts, args.files)
        print(f"rerun, every file rewritten, {len(edited):,} rows edited, all rows shuffled:")
        rerun_s, manifest = embed(config)

        table = pq.read_table(out, columns=["id", "content_key"])
        assert table.num_rows == args.rows == len(set(table.column("id").to_pylist()))
        timings = manifest["timings"]
        fraction = timings["texts_embedded"] / args.rows
        ratio = rerun_s / full_s
        # What a copied row costs against an embedded one, from each run's units (first unit
        # started to last committed): the rerun's time beyond embedding its texts at the full
        # run's rate, per copied row. The rate is per text the model saw: with repeated texts
        # (`--distinct`) the full run embeds each once a unit, so its time per row would be
        # below an embedded row's cost and make copying look dearer than it is.
        full = full_manifest["timings"]
        per_row = full["units_span_s"] / full["texts_embedded"]
        rerun_span = timings["units_span_s"]
        copy_cost = (rerun_span - timings["texts_embedded"] * per_row) / timings["reused_rows"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"full run {full_s:.1f} s; rerun {rerun_s:.1f} s")
    print(
        f"rerun ran the model on {timings['texts_embedded']:,} of {args.rows:,} rows "
        f"({fraction:.1%}; goal <= 6%), copied {timings['reused_rows']:,}"
    )
    print(f"rerun wall / full run wall: {ratio:.1%} (goal <= 15%)")
    print(f"a copied row costs {copy_cost / per_row:.1%} of an embedded row (goal <= 5%)")
    record(
        "nightly_reuse",
        {
            "rows": args.rows,
            "distinct": args.distinct,
            "files": args.files,
            "changed": args.changed,
            "full_s": round(full_s, 2),
            "rerun_s": round(rerun_s, 2),
            "texts_embedded": timings["texts_embedded"],
            "reused_rows": timings["reused_rows"],
            "embedded_fraction": round(fraction, 4),
            "wall_ratio": round(ratio, 4),
            "copy_cost_ratio": round(copy_cost / per_row, 4),
        },
    )


if __name__ == "__main__":
    main()
