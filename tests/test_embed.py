"""The embed job end to end on a 2-CPU local Ray: real model, real Parquet, real S3 server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from tiny_model import tiny_model_path

from sbertray import storage
from sbertray.config import EmbedConfig, parse_config
from sbertray.embed.run import run_embed
from sbertray.embed.shards import EmbedInputError
from sbertray.hardware import cpu_has_native_bf16
from sbertray.modeling import ModelError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentences(stsb_dir) -> list[str]:
    lines = (stsb_dir / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    out = []
    for line in lines:
        a, b, _ = line.split("\t")
        out += [a, b]
    return out


def _config(inp, out, **overrides) -> EmbedConfig:
    """A job on the tiny model (``tiny_model.py``) unless ``model`` is given."""
    data = {
        "model": tiny_model_path(),
        "input": {"path": inp, "id_column": "id", "text_column": "text", "passthrough": ["group"]},
        "output": {"path": out},
        "compute": {"precision": "fp32"},
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(EmbedConfig, data)


def _write_shards(
    fs: pafs.FileSystem,
    root: str,
    texts: list[str],
    sizes: list[int],
    row_group_size: int = 64,
    pairs: list[str] | None = None,
) -> list[int]:
    """Shards of the given (uneven, possibly zero) sizes; ids are globally unique ints."""
    start, ids = 0, []
    fs.create_dir(root, recursive=True)
    for n, size in enumerate(sizes):
        cols = {
            "id": pa.array(range(start, start + size), pa.int64()),
            "text": texts[start : start + size],
            "group": [f"g{i % 3}" for i in range(start, start + size)],
        }
        if pairs is not None:
            cols["text_b"] = pairs[start : start + size]
        with fs.open_output_stream(f"{root}/shard-{n:02d}.parquet") as f:
            pq.write_table(pa.table(cols), f, row_group_size=row_group_size)
        ids += list(range(start, start + size))
        start += size
    return ids


def _read_output(out_dir: str, fs=None) -> pa.Table:
    fs = fs or pafs.LocalFileSystem()
    files = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(out_dir, recursive=True))
        if i.path.endswith(".parquet")
    )
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in files])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_local_to_local_matches_encode_and_keeps_every_row(
    ray_2cpu, tiny_model, sentences, tmp_path
):
    texts = sentences[:700] + ["", "word " * 400]  # empty text is valid; a long one is truncated
    sizes = [300, 0, 17, 385]  # uneven, one empty shard
    ids = _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), texts, sizes)
    config = _config(str(tmp_path / "in"), str(tmp_path / "out"), output__rows_per_file=128)
    summary = run_embed(config)

    assert summary.input_rows == summary.output_rows == len(ids) == 702
    assert summary.bad_rows == 0 and summary.truncated == 1
    table = _read_output(str(tmp_path / "out")).sort_by("id")
    assert table.column("id").to_pylist() == ids
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    ref = tiny_model.encode(texts, batch_size=64)
    assert _cos(emb, ref).min() >= 0.9999
    assert table.column("group").to_pylist() == [f"g{i % 3}" for i in ids]

    files = sorted(
        p.name
        for p in (tmp_path / "out").iterdir()
        if p.is_file() and p.suffix in ("", ".json", ".parquet")
    )
    # Deterministic names: row groups of 64 grouped into files of >= 128 rows, per shard.
    assert files == [
        "_SUCCESS",
        "_manifest.json",
        "shard-00.part-0000.parquet",
        "shard-00.part-0001.parquet",
        "shard-00.part-0002.parquet",  # 128 + 128 + 44
        "shard-02.part-0000.parquet",  # 17
        "shard-03.part-0000.parquet",
        "shard-03.part-0001.parquet",
        "shard-03.part-0002.parquet",
        "shard-03.part-0003.parquet",
    ]  # 3 x 128 + 1
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["totals"]["input_rows"] == manifest["totals"]["output_rows"] == 702
    assert [f["rows"] for f in manifest["files"]] == sizes
    assert manifest["model"]["dim"] == 384 and manifest["model"]["normalized"] is True
    assert manifest["compute"]["backend"] == "openvino"  # auto on CPU for this architecture
    meta = json.loads(
        pq.read_schema(tmp_path / "out" / "shard-02.part-0000.parquet").metadata[b"sbertray"]
    )
    assert meta["model_hash"] == manifest["model"]["model_hash"] and meta["dim"] == 384

    import duckdb  # readable as written, with no schema hints

    [(count, dims)] = duckdb.sql(
        f"select count(*), min(len(embedding)) from read_parquet('{tmp_path}/out/*.parquet')"
    ).fetchall()
    assert (count, dims) == (702, 384)


@pytest.mark.parametrize(
    ("precision", "backend", "worst_row", "mean_row"),
    [("auto", "openvino", 0.9999, 0.9999), ("int8", "onnx", 0.9, 0.99)],
)
def test_default_and_int8_precisions_end_to_end(
    ray_2cpu,
    base_model,
    bundled_model_path,
    sentences,
    tmp_path,
    precision,
    backend,
    worst_row,
    mean_row,
):
    """What users run by default (auto: bf16 where native) and int8, through the whole job,
    held to the README's quality thresholds against plain encode."""
    ids = _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), sentences[:300], [160, 140])
    config = _config(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        model=bundled_model_path,
        compute={"precision": precision},
    )
    assert run_embed(config).output_rows == 300
    table = _read_output(str(tmp_path / "out")).sort_by("id")
    assert table.column("id").to_pylist() == ids
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    cos = _cos(emb, base_model.encode(sentences[:300]))
    assert cos.min() >= worst_row and cos.mean() >= mean_row, (cos.min(), cos.mean())
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    expected = native if precision == "auto" else precision
    assert (manifest["compute"]["backend"], manifest["compute"]["precision"]) == (backend, expected)


def test_model_the_export_does_not_cover_runs_on_torch(ray_2cpu, tiny_model, sentences, tmp_path):
    """auto falls back to the sentence-transformers modules (here CLS pooling), same vectors."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    cls_model = SentenceTransformer(modules=[tiny_model[0], Pooling(384, pooling_mode="cls")])
    cls_model.save(str(tmp_path / "cls-model"))
    texts = sentences[:150]
    _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), texts, [150])
    config = _config(str(tmp_path / "in"), str(tmp_path / "out"), model=str(tmp_path / "cls-model"))
    assert run_embed(config).output_rows == 150
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert (manifest["compute"]["backend"], manifest["compute"]["precision"]) == ("torch", "fp32")
    assert manifest["model"]["normalized"] is False
    emb = np.stack(
        _read_output(str(tmp_path / "out"))
        .sort_by("id")
        .column("embedding")
        .to_numpy(zero_copy_only=False)
    )
    assert _cos(emb, cls_model.encode(texts)).min() >= 0.9999
    assert not (tmp_path / "cls-model" / "onnx").exists()


def test_s3_to_s3_pair_mode(ray_2cpu, s3_server, s3_prefix, sentences, capfd):
    from local_s3 import SECRET_KEY

    fs = s3_server.filesystem()
    a, b = sentences[0:400:2], sentences[1:400:2]
    _write_shards(fs, f"{s3_prefix[5:]}/in", a, [120, 80], pairs=b)
    config = _config(f"{s3_prefix}/in", f"{s3_prefix}/out", input__pair_column="text_b")
    summary = run_embed(config)
    assert summary.output_rows == 200
    out = _read_output(f"{s3_prefix[5:]}/out", fs).sort_by("id")
    ea = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    eb = np.stack(out.column("embedding_pair").to_numpy(zero_copy_only=False))
    expected = _cos(ea, eb)
    np.testing.assert_allclose(out.column("cosine").to_numpy(), expected, atol=1e-5)
    names = {
        i.path.rsplit("/", 1)[-1]
        for i in fs.get_file_info(pafs.FileSelector(f"{s3_prefix[5:]}/out"))
    }
    assert {"_SUCCESS", "_manifest.json"} <= names
    assert not any(n.startswith("_inprogress") for n in names)
    # Credentials reach the S3 client from the environment only: never written or printed.
    written = [
        f"{s3_prefix[5:]}/out/{n}"
        for n in ("_manifest.json", "_report/report.json", "_report/report.md")
    ]
    # Small files share an output: its name says how many.
    for path in written + [f"{s3_prefix[5:]}/out/shard-00.2-files.part-0000.parquet"]:
        with fs.open_input_stream(path) as f:
            assert SECRET_KEY.encode() not in f.read(), path
    logs = capfd.readouterr()
    assert SECRET_KEY not in logs.out + logs.err
    import pandas as pd

    df = pd.read_parquet(
        f"{s3_prefix}/out/shard-00.2-files.part-0000.parquet",
        storage_options={"client_kwargs": {"endpoint_url": s3_server.endpoint_url}},
    )
    assert len(df) == 200


def test_reference_topk_equals_brute_force(ray_2cpu, tiny_model, sentences, tmp_path):
    queries, refs = sentences[:150], sentences[1000:1300]
    _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), queries, [150])
    pq.write_table(
        pa.table({"rid": [f"r{i}" for i in range(len(refs))], "name": refs}),
        tmp_path / "ref.parquet",
    )
    config = _config(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        reference={
            "path": str(tmp_path / "ref.parquet"),
            "id_column": "rid",
            "text_column": "name",
            "top_k": 5,
        },
    )
    run_embed(config)
    out = _read_output(str(tmp_path / "out")).sort_by("id")
    q = tiny_model.encode(queries)
    r = tiny_model.encode(refs)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        r / np.linalg.norm(r, axis=1, keepdims=True)
    ).T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    got = np.array([[int(x[1:]) for x in row] for row in out.column("topk_ids").to_pylist()])
    # Exact top-k: the same references, except where two scores tie within fp32 noise.
    agree = (got == expected).mean()
    assert agree >= 0.99, agree
    got_scores = np.stack(out.column("topk_scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, expected, 1), atol=2e-4)


# --- bad input ------------------------------------------------------------------------------


def test_missing_column_fails_before_any_work(tmp_path, sentences):
    _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), sentences, [5, 5])
    config = _config(str(tmp_path / "in"), str(tmp_path / "out"), input__text_column="body")
    with pytest.raises(
        EmbedInputError, match=r"shard-00\.parquet: missing column `body` \(input\.text_column\)"
    ):
        run_embed(config)
    assert not (tmp_path / "out").exists()


def test_missing_model_fails_before_reading_data(tmp_path):
    config = _config(
        str(tmp_path / "nope"), str(tmp_path / "out"), model=str(tmp_path / "no-model")
    )
    with pytest.raises(ModelError, match="no-model`: no such directory"):
        run_embed(config)
    (tmp_path / "not-a-model").mkdir()
    config = _config(
        str(tmp_path / "nope"), str(tmp_path / "out"), model=str(tmp_path / "not-a-model")
    )
    with pytest.raises(ModelError, match="not a sentence-transformers model directory"):
        run_embed(config)


def test_input_files_without_rows_write_an_empty_manifest(tmp_path, capsys):
    empty = pa.table(
        {
            "id": pa.array([], pa.int64()),
            "text": pa.array([], pa.string()),
            "group": pa.array([], pa.string()),
        }
    )
    _write_table(tmp_path / "in" / "empty.parquet", empty)
    summary = run_embed(_config(str(tmp_path / "in"), str(tmp_path / "out")))
    assert summary.output_rows == 0
    assert "nothing to embed" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert [f["rows"] for f in manifest["files"]] == [0] and manifest["totals"]["input_rows"] == 0
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_output_not_writable(tmp_path, sentences):
    _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), sentences, [5])
    (tmp_path / "occupied").write_text("a file where the output directory should go")
    config = _config(str(tmp_path / "in"), str(tmp_path / "occupied" / "out"))
    with pytest.raises(storage.StorageError, match="output location is not writable"):
        run_embed(config)


def test_s3_endpoint_down_is_a_clear_error(tmp_path, sentences):
    _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), sentences, [5])
    # Two tries per request: one retry, then the error (the default 5 take ~8 s a request).
    down = {"endpoint_url": "http://127.0.0.1:9", "max_attempts": 2}
    config = _config(str(tmp_path / "in"), "s3://bucket/out", storage=down)
    with pytest.raises(
        storage.StorageError,
        match="output location is not writable: could not write s3://bucket/out",
    ):
        run_embed(config)


def test_corrupt_file_fails_or_is_skipped(ray_2cpu, tmp_path, sentences):
    _write_shards(pafs.LocalFileSystem(), str(tmp_path / "in"), sentences, [40, 30])
    good = (tmp_path / "in" / "shard-01.parquet").read_bytes()
    (tmp_path / "in" / "shard-01.parquet").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(EmbedInputError, match=r"shard-01\.parquet: not a readable Parquet file"):
        run_embed(_config(str(tmp_path / "in"), str(tmp_path / "out")))
    summary = run_embed(
        _config(str(tmp_path / "in"), str(tmp_path / "out"), bad_input={"on_bad_file": "skip"})
    )
    assert summary.output_rows == 40
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert any(p.endswith("shard-01.parquet") for p in manifest["bad_files"])


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_null_text_policies(ray_2cpu, tiny_model, tmp_path):
    table = pa.table({"id": [1, 2, 3, 4], "text": ["alpha", None, "", "delta"], "group": ["a"] * 4})
    _write_table(tmp_path / "in" / "x.parquet", table)
    with pytest.raises(EmbedInputError, match=r"x\.parquet: row 1: column `text`: null text"):
        run_embed(_config(str(tmp_path / "in"), str(tmp_path / "o1")))
    assert not list((tmp_path / "o1").glob("*.parquet"))  # nothing half-written visible

    skipped = run_embed(
        _config(str(tmp_path / "in"), str(tmp_path / "o2"), bad_input={"on_null_text": "skip"})
    )
    assert (skipped.output_rows, skipped.bad_rows) == (3, 1)
    assert sorted(_read_output(str(tmp_path / "o2")).column("id").to_pylist()) == [1, 3, 4]
    manifest = json.loads((tmp_path / "o2" / "_manifest.json").read_text())
    assert manifest["files"][0]["bad_reasons"] == {"null text": 1}
    assert [
        e.endswith("x.parquet: row 1: column `text`: null text")
        for e in manifest["bad_row_examples"]
    ] == [True]
    report = (tmp_path / "o2" / "_report" / "report.md").read_text()
    assert "skipped rows" in report and "row 1: column `text`: null text" in report

    blank = run_embed(
        _config(str(tmp_path / "in"), str(tmp_path / "o3"), bad_input={"on_null_text": "empty"})
    )
    assert blank.output_rows == 4
    out = _read_output(str(tmp_path / "o3")).sort_by("id")
    emb = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    assert _cos(emb[1:2], tiny_model.encode([""]))[0] >= 0.9999


def test_invalid_utf8_fails_or_is_replaced(ray_2cpu, tmp_path):
    table = pa.table(
        {
            "id": [1, 2],
            "text": pa.array([b"fine", b"bad \xff\xfe bytes"], pa.binary()),
            "group": ["a", "b"],
        }
    )
    _write_table(tmp_path / "in" / "b.parquet", table)
    with pytest.raises(EmbedInputError, match=r"b\.parquet: row 1: column `text`: invalid UTF-8"):
        run_embed(_config(str(tmp_path / "in"), str(tmp_path / "o1")))
    summary = run_embed(
        _config(
            str(tmp_path / "in"), str(tmp_path / "o2"), bad_input={"on_invalid_utf8": "replace"}
        )
    )
    assert summary.output_rows == 2


def test_non_string_column_is_named(tmp_path):
    _write_table(
        tmp_path / "in" / "n.parquet", pa.table({"id": [1], "text": [3.5], "group": ["a"]})
    )
    with pytest.raises(
        EmbedInputError, match=r"n\.parquet: column `text` \(input.text_column\) has type double"
    ):
        run_embed(_config(str(tmp_path / "in"), str(tmp_path / "o")))


def test_generated_ids_and_hive_partitions(ray_2cpu, tmp_path, sentences):
    for part, n in (("day=2026-11-01", 7), ("day=2026-11-02", 5)):
        _write_table(
            tmp_path / "in" / part / "data.parquet",
            pa.table({"text": sentences[:n], "group": ["x"] * n}),
        )
    config = _config(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        input__id_column=None,
        input__passthrough=["group", "day"],
    )
    run_embed(config)
    out = _read_output(str(tmp_path / "out"))
    ids = sorted(out.column("id").to_pylist())
    assert ids[0] == "day=2026-11-01/data.parquet#0" and len(set(ids)) == 12
    assert "day" not in out.column_names  # a partition key lives in the mirrored folders
    assert (tmp_path / "out" / "day=2026-11-02" / "data.part-0000.parquet").exists()
    import pyarrow.dataset as ds

    days = ds.dataset(tmp_path / "out", partitioning="hive").to_table().column("day")
    assert sorted(set(days.to_pylist())) == ["2026-11-01", "2026-11-02"]
    _every_reader_sees(tmp_path / "out", ids)


def _every_reader_sees(out: Path, ids: list) -> None:
    """The output directory, report and manifest included, reads as one dataset in pandas,
    pyarrow, polars and DuckDB: the rows and ids, nothing else."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    assert (out / "_report" / "report.md").exists() and (out / "_manifest.json").exists()
    frames = {
        "pandas": pd.read_parquet(out)["id"].tolist(),
        "pyarrow": ds.dataset(out, partitioning="hive").to_table().column("id").to_pylist(),
        "polars": pl.scan_parquet(f"{out}/**/*.parquet", hive_partitioning=True)
        .collect()["id"]
        .to_list(),
        "duckdb": [
            r[0]
            for r in duckdb.sql(
                f"select id from read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
            ).fetchall()
        ],
    }
    for reader, got in frames.items():
        assert sorted(got) == sorted(ids), reader


# --- recovery -------------------------------------------------------------------------------


def _kill_one_actor_after_first_commit(out_dir: Path, done: threading.Event, killed: list):
    import psutil

    deadline = time.time() + 240
    while not done.is_set() and time.time() < deadline:
        if list(out_dir.glob("*.parquet")):
            # This session's Ray only (its raylet is our child): another pytest worker's runs
            # have MapWorkers too.
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if "MapWorker" in " ".join(proc.cmdline()):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
        time.sleep(0.05)


def test_killed_actor_still_gives_complete_duplicate_free_output(ray_2cpu, tmp_path, sentences):
    ids = _write_shards(
        pafs.LocalFileSystem(), str(tmp_path / "in"), sentences * 2, [400] * 8, row_group_size=100
    )
    done, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_one_actor_after_first_commit, args=(tmp_path / "out", done, killed)
    )
    killer.start()
    try:
        summary = run_embed(
            _config(str(tmp_path / "in"), str(tmp_path / "out"), output__rows_per_file=200)
        )
    finally:
        done.set()
        killer.join()
    assert killed, "no actor was killed: the test did not exercise recovery"
    assert summary.output_rows == len(ids) == 3200
    out_ids = _read_output(str(tmp_path / "out")).column("id").to_pylist()
    assert sorted(out_ids) == ids  # every row exactly once
    assert not list((tmp_path / "out").glob("_inprogress*"))
