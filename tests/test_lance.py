"""Lance output (`output.format: lance`) and `sbertray search`: real pylance, LanceDB and DuckDB,
on local disk and on the test S3 server, with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import kill_when, run, sbertray_cmd
from tiny_model import tiny_model_path

from sbertray.config import ConfigError, EmbedConfig, StorageConfig, parse_config
from sbertray.embed import lance_sink
from sbertray.embed.replacing import SettingsChangedError
from sbertray.embed.run import run_embed
from sbertray.report import summarize
from sbertray.search import OutputSearcher, SearchError

QUERIES = ["a man is playing a guitar", "the stock market fell", "a dog runs in the park"]


@pytest.fixture(scope="module")
def sentences(stsb_dir) -> list[str]:
    lines = (stsb_dir / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return list(dict.fromkeys(line.split("\t")[0] for line in lines))


def _write(root: Path, name: str, ids: range, sentences: list[str], shift: int = 0) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    texts = [sentences[(i + shift) % len(sentences)] for i in ids]
    pq.write_table(pa.table({"id": list(ids), "text": texts}), root / name, row_group_size=50)


def _config(inp: Path | str, out: Path | str, passthrough=("lang",), **output) -> EmbedConfig:
    return parse_config(
        EmbedConfig,
        {
            "model": tiny_model_path(),
            "input": {"path": str(inp), "passthrough": list(passthrough)},
            "output": {"path": str(out), "rows_per_file": 200, **output},
            "compute": {"precision": "fp32", "executor": "local", "unit_rows": 200},
        },
    )


LANCE = {"format": "lance", "index": {"min_rows": 256, "num_partitions": 2}}


def _vectors(table: pa.Table) -> dict:
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return dict(zip(table.column("id").to_pylist(), vectors, strict=True))


def _parquet_rows(out: Path) -> pa.Table:
    return pa.concat_tables(
        pq.read_table(f).select(["id", "embedding"]) for f in sorted(out.rglob("*.parquet"))
    )


def _exact(vectors: dict, query: np.ndarray, k: int, ids=None) -> list:
    ids = [i for i in vectors if ids is None or i in ids]
    scores = np.stack([vectors[i] for i in ids]) @ query
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def test_lance_rows_equal_parquet_and_reruns_upsert(tmp_path, sentences):
    """The demo shape (hive partitions, passthrough) as Lance: the same rows and vectors as
    Parquet, readable by pylance, LanceDB and DuckDB; a nightly rerun is one upsert version; a
    rerun with nothing new writes no version; retain_versions drops the old ones."""
    inp = tmp_path / "in"
    _write(inp, "lang=en/a.parquet", range(0, 300), sentences)
    _write(inp, "lang=en/b.parquet", range(300, 500), sentences)
    _write(inp, "lang=fr/c.parquet", range(500, 700), sentences)
    out, parquet_out = tmp_path / "vectors.lance", tmp_path / "parquet"
    run_embed(_config(inp, out, **LANCE))
    run_embed(_config(inp, parquet_out))

    table = lance.dataset(str(out)).to_table()
    assert table.num_rows == 700 and sorted(table.column("id").to_pylist()) == list(range(700))
    assert set(table.column_names) >= {"id", "embedding", "lang", "content_key", "_part"}
    expected = _vectors(_parquet_rows(parquet_out))
    got = _vectors(table)
    assert all(np.array_equal(got[i], expected[i]) for i in range(700))
    langs = dict(zip(table.column("id").to_pylist(), table.column("lang").to_pylist(), strict=True))
    assert langs[0] == "en" and langs[699] == "fr"

    import duckdb
    import lancedb

    db_table = lancedb.connect(str(tmp_path)).open_table("vectors")
    assert db_table.count_rows() == 700
    connection = duckdb.connect()
    connection.register("vectors", lance.dataset(str(out)))  # DuckDB scans Lance directly
    assert connection.sql("SELECT count(*) FROM vectors WHERE lang = 'fr'").fetchall() == [(200,)]

    manifest = json.loads((out / "_sbertray" / "_manifest.json").read_text())
    record = manifest["lance"]
    first = lance.dataset(str(out)).version  # the rows' version, then the index's
    assert record["version"] == first and record["rows"] == 700 and record["inserted"] == 700
    assert record["index"]["built"] and record["index"]["num_partitions"] == 2
    assert (out / "_sbertray" / "_SUCCESS").exists()
    assert "700" in summarize(str(out))  # `sbertray report` finds the report in _sbertray/

    # The night after: b rewritten with other texts, c deleted, d added.
    _write(inp, "lang=en/b.parquet", range(300, 500), sentences, shift=1000)
    (inp / "lang=fr/c.parquet").unlink()
    _write(inp, "lang=fr/d.parquet", range(700, 900), sentences, shift=2000)
    run_embed(_config(inp, out, **LANCE))
    run_embed(_config(inp, parquet_out))
    dataset = lance.dataset(str(out))
    second = dataset.version
    assert second > first
    table = dataset.to_table()
    assert sorted(table.column("id").to_pylist()) == [*range(500), *range(700, 900)]
    expected = _vectors(_parquet_rows(parquet_out))
    assert all(np.array_equal(v, expected[i]) for i, v in _vectors(table).items())
    record = json.loads((out / "_sbertray" / "_manifest.json").read_text())["lance"]
    assert (record["inserted"], record["updated"], record["deleted"]) == (200, 200, 200)
    assert record["index"]["action"] == "extended"
    assert dataset.checkout_version(first).count_rows() == 700  # old versions stay readable

    run_embed(_config(inp, out, **LANCE))  # nothing new: no new version
    assert lance.dataset(str(out)).version == second
    run_embed(_config(inp, out, **LANCE, retain_versions=1))
    versions = [v["version"] for v in lance.dataset(str(out)).versions()]
    assert versions == [second]
    # Lance's clean-up leaves sbertray's parts alone: the next run still has nothing to embed.
    assert run_embed(_config(inp, out, **LANCE, retain_versions=1)).units_written == 0


def test_search_equals_an_exact_search_and_filters(tmp_path, sentences):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write(inp, "lang=en/a.parquet", range(0, 400), sentences)
    _write(inp, "lang=fr/b.parquet", range(400, 600), sentences)
    run_embed(_config(inp, out, **LANCE))
    vectors = _vectors(lance.dataset(str(out)).to_table())
    fr = set(range(400, 600))

    exact = OutputSearcher(str(out), exact=True)
    indexed = OutputSearcher(str(out))
    queries = exact.embed(QUERIES)
    recall = []
    for query, by_scan, by_index, in_fr in zip(
        queries,
        exact.search(QUERIES, k=10),
        indexed.search(QUERIES, k=10),
        exact.search(QUERIES, k=5, where="lang = 'fr'"),
        strict=True,
    ):
        assert by_scan.method == "exact scan" and by_index.method == "ivf_pq index"
        assert [h["id"] for h in by_scan.hits] == _exact(vectors, query, 10)
        assert [h["score"] for h in by_scan.hits] == pytest.approx(
            [float(vectors[h["id"]] @ query) for h in by_scan.hits], abs=1e-5
        )
        assert [h["id"] for h in in_fr.hits] == _exact(vectors, query, 5, fr)
        assert all(h["lang"] == "fr" for h in in_fr.hits)
        recall.append(len({h["id"] for h in by_index.hits} & set(_exact(vectors, query, 10))))
    assert sum(recall) / (10 * len(QUERIES)) >= 0.9, recall

    with pytest.raises(SearchError, match="langue"):
        exact.search(QUERIES[:1], where="langue = 'fr'")
    lance.dataset(str(out)).drop_index("embedding_idx")
    with pytest.raises(SearchError, match="--exact"):
        OutputSearcher(str(out))


def test_an_interrupted_sync_leaves_no_version_and_the_rerun_completes(
    tmp_path, sentences, monkeypatch
):
    """A sync stopped mid-write (as a kill would stop it) commits nothing: the dataset shows
    no version (or the last one), and the rerun, with nothing left to embed, syncs every row
    once."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _write(inp, "a.parquet", range(0, 300), sentences)
    _write(inp, "b.parquet", range(300, 600), sentences)
    rows = lance_sink._part_rows

    def stops_midway(parts, keys):
        reader = rows(parts, keys)

        def batches():
            yield reader.read_next_batch()
            raise RuntimeError("killed mid-write")

        return pa.RecordBatchReader.from_batches(reader.schema, batches())

    monkeypatch.setattr(lance_sink, "_part_rows", stops_midway)
    config = _config(inp, out, (), format="lance", index={"type": "none"})
    with pytest.raises(Exception, match="killed mid-write"):
        run_embed(config)
    assert lance_sink.open_dataset(str(out), {}) is None
    assert not (out / "_sbertray" / "_SUCCESS").exists()
    _write(inp, "b.parquet", range(300, 600), sentences, shift=7)
    with pytest.raises(Exception, match="killed mid-write"):
        run_embed(config)

    monkeypatch.setattr(lance_sink, "_part_rows", rows)
    summary = run_embed(config)
    assert summary.units_written == 0  # every part was committed before the sync stopped
    ids = lance.dataset(str(out)).to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(600))

    _write(inp, "b.parquet", range(300, 600), sentences, shift=11)
    monkeypatch.setattr(lance_sink, "_part_rows", stops_midway)
    with pytest.raises(Exception, match="killed mid-write"):
        run_embed(config)
    assert lance.dataset(str(out)).version == 1  # the merge committed nothing
    monkeypatch.setattr(lance_sink, "_part_rows", rows)
    run_embed(config)
    dataset = lance.dataset(str(out))
    assert dataset.version == 2 and sorted(dataset.to_table().column("id").to_pylist()) == ids


def test_lance_on_s3_and_the_search_command(tmp_path, s3_prefix, sentences):
    inp = tmp_path / "in"
    _write(inp, "lang=en/a.parquet", range(0, 300), sentences)
    out = f"{s3_prefix}/vectors.lance"
    run_embed(_config(inp, out, **LANCE))
    options = lance_sink.lance_options(StorageConfig())
    assert lance.dataset(out, storage_options=options).count_rows() == 300

    searched = run(sbertray_cmd("search", out, QUERIES[0], "-k", "3", "--json"))
    assert searched.returncode == 0, searched.stderr[-2000:]
    hits = json.loads(searched.stdout)["hits"]
    expected = OutputSearcher(out).search(QUERIES[:1], k=3)[0].hits
    assert [h["id"] for h in hits] == [h["id"] for h in expected] and len(hits) == 3

    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    searched = run(sbertray_cmd("search", out, "--file", str(queries), "-k", "2"))
    assert searched.returncode == 0, searched.stderr[-2000:]
    assert searched.stdout.count("query: ") == 3 and "ivf_pq index" in searched.stdout

    bad = run(sbertray_cmd("search", out, "x", "--where", "no_such = 1"))
    assert bad.returncode == 2 and "--where 'no_such = 1'" in bad.stderr
    assert "Traceback" not in bad.stderr

    parquet_out = tmp_path / "parquet"
    run_embed(_config(inp, parquet_out))
    searched = run(sbertray_cmd("search", str(parquet_out), QUERIES[0], "-k", "3", "--json"))
    assert searched.returncode == 0, searched.stderr[-2000:]
    assert [h["id"] for h in json.loads(searched.stdout)["hits"]] == [h["id"] for h in expected]
    missing = run(sbertray_cmd("search", str(tmp_path / "nothing"), "x"))
    assert missing.returncode == 2 and "holds no embed output" in missing.stderr


def test_lance_settings_are_checked(tmp_path, sentences):
    with pytest.raises(ConfigError, match="output.format: lance"):
        _config(tmp_path, tmp_path / "o", index={"type": "hnsw"})
    with pytest.raises(ConfigError, match="index.type: none"):
        _config(tmp_path, tmp_path / "o", format="lance", embedding_dtype="int8")
    inp = tmp_path / "in"
    _write(inp, "a.parquet", range(0, 50), sentences)
    run_embed(_config(inp, tmp_path / "out", ()))
    with pytest.raises(SettingsChangedError, match="holds a Parquet output"):
        run_embed(_config(inp, tmp_path / "out", (), format="lance"))


def test_the_demo_recipe_as_lance_on_s3_and_searched(s3_prefix):
    """The README's Lance demo on the S3 server: the bundled model and sample shards, then
    `sbertray search` with a filter (the real model: the Python course comes first)."""
    out = f"{s3_prefix}/demo.lance"
    demo = "jobs/configs/embed_demo.yaml"
    embedded = run(sbertray_cmd("embed", demo, "output.format=lance", f"output.path={out}"))
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    assert "Lance dataset" in embedded.stdout and "36 rows (36 inserted" in embedded.stdout
    query = ["learn python programming", "-k", "3", "--where", "language = 'en'", "--json"]
    searched = run(sbertray_cmd("search", out, *query))
    assert searched.returncode == 0, searched.stderr[-3000:]
    hits = json.loads(searched.stdout)["hits"]
    assert [h["id"] for h in hits][:1] == [12] and all(h["language"] == "en" for h in hits)
    assert hits[0]["score"] == pytest.approx(0.5045, abs=2e-3)


def test_a_killed_lance_run_is_finished_by_the_rerun(tmp_path, sentences):
    """SIGKILL mid-run (parts committed, no Lance version yet): the rerun embeds the rest and
    the dataset holds every row once."""
    inp, out = tmp_path / "in", tmp_path / "out.lance"
    for n in range(40):
        _write(inp, f"s{n:02d}.parquet", range(n * 200, (n + 1) * 200), sentences)
    config = tmp_path / "embed.yaml"
    config.write_text(
        json.dumps(
            {
                "model": tiny_model_path(),
                "input": {"path": str(inp)},
                "output": {"path": str(out), "format": "lance", "rows_per_file": 200},
                "compute": {"precision": "fp32", "executor": "local", "unit_rows": 200},
            }
        )
    )
    cmd = sbertray_cmd("embed", str(config))
    parts = out / "_sbertray"
    kill_when(cmd, lambda: len(list(parts.glob("*.part-*.parquet"))) >= 2, what="2 parts")
    assert lance_sink.open_dataset(str(out), {}) is None
    rerun = run(cmd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "units already committed" in rerun.stdout
    ids = lance.dataset(str(out)).to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(8000))
