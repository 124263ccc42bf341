"""Work units sized by rows: small files grouped, large ones split, and a grouping that stays
put when files change, arrive or go; then many small files on S3, end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from tiny_model import tiny_model_path

from sbertray.config import EmbedConfig, parse_config
from sbertray.embed.run import run_embed
from sbertray.embed.shards import InputFile, choose_unit_rows, plan_units


def _file(rel: str, rows: int, row_group: int = 50) -> InputFile:
    groups = tuple(min(row_group, rows - i) for i in range(0, rows, row_group))
    return InputFile(
        url=f"/in/{rel}", path=f"/in/{rel}", rel=rel, size=rows, mtime="t0",
        num_rows=rows, row_group_rows=groups,
    )  # fmt: skip


def _small(n: int, rows: int = 25, folder: str = "") -> list[InputFile]:
    return [_file(f"{folder}f{i:05d}.parquet", rows) for i in range(n)]


def _groups(units) -> list[tuple[str, ...]]:
    return [tuple(s.file.rel for s in u.slices) for u in units]


def test_small_files_are_grouped_into_units_of_about_unit_rows():
    files = _small(2000)  # 50,000 rows in files of 25
    units = plan_units(files, rows_per_file=100_000, unit_rows=2048)
    assert sorted(rel for g in _groups(units) for rel in g) == [f.rel for f in files]  # once
    sizes = [u.num_rows for u in units]
    assert 15 <= len(units) <= 40, sizes
    assert min(sizes) >= 1024 or sizes[-1] < 1024  # only the last group may end short
    assert max(sizes) <= 2 * 2048
    first = units[0]
    assert first.output_rel == f"f00000.{len(first.slices)}-files.part-0000.parquet"
    assert first.unit_id == f"f00000.parquet.{len(first.slices)}-files#part-0000"
    assert first.inputs[0] == ["f00000.parquet", 25, "t0"]


def test_large_files_are_split_and_never_grouped():
    files = [_file("a.parquet", 10), _file("big.parquet", 5000), _file("c.parquet", 10)]
    units = plan_units(files, rows_per_file=1000, unit_rows=2048)
    assert _groups(units) == [("a.parquet",), *[("big.parquet",)] * 5, ("c.parquet",)]
    assert [u.output_rel for u in units[1:3]] == ["big.part-0000.parquet", "big.part-0001.parquet"]
    assert [u.slices[0].first_row for u in units[1:6]] == [0, 1000, 2000, 3000, 4000]


def test_groups_stay_inside_their_folder():
    files = _small(30, folder="hour=01/") + _small(30, folder="hour=02/")
    units = plan_units(files, rows_per_file=100_000, unit_rows=100_000)
    assert _groups(units) == [tuple(f.rel for f in files[:30]), tuple(f.rel for f in files[30:])]
    assert units[1].output_rel == "hour=02/f00000.30-files.part-0000.parquet"


def test_a_changed_added_or_removed_file_moves_only_its_own_group():
    files = _small(2000)
    units = plan_units(files, 100_000, 2048)
    before = set(_groups(units))

    # What a rerun compares: each unit's files with their sizes and mtimes.
    changed = list(files)
    changed[700] = replace(files[700], size=999, mtime="t1", num_rows=30, row_group_rows=(30,))
    fingerprints = {str(u.inputs) for u in units}
    moved = [u for u in plan_units(changed, 100_000, 2048) if str(u.inputs) not in fingerprints]
    assert len(moved) == 1 and files[700].rel in _groups(moved)[0]

    added = sorted([*files, _file("f00700x.parquet", 25)], key=lambda f: f.rel)
    moved = [g for g in _groups(plan_units(added, 100_000, 2048)) if g not in before]
    assert len(moved) == 1 and "f00700x.parquet" in moved[0]

    removed = files[:1200] + files[1201:]
    moved = [g for g in _groups(plan_units(removed, 100_000, 2048)) if g not in before]
    assert len(moved) <= 2  # its group, and at most the next one when a cut point went with it


def test_default_unit_rows_follow_the_input_in_powers_of_two():
    config = parse_config(EmbedConfig, {"input": {"path": "in"}, "output": {"path": "out"}})
    assert choose_unit_rows(config, 50_000) == 2048  # 50,000 / 32 = 1,562
    assert choose_unit_rows(config, 60_000) == 2048  # grows a little: same grouping
    assert choose_unit_rows(config, 1_000) == 1024  # the floor
    assert choose_unit_rows(config, 10**9) == 100_000  # output.rows_per_file caps it
    small_files = config.model_copy(
        update={"output": config.output.model_copy(update={"rows_per_file": 20})}
    )
    assert choose_unit_rows(small_files, 1_000) == 20  # ... the floor too
    pinned = config.model_copy(
        update={"compute": config.compute.model_copy(update={"unit_rows": 500})}
    )
    assert choose_unit_rows(pinned, 10**9) == 500


@pytest.mark.slow
def test_small_files_on_s3_coalesce_and_a_changed_one_reembeds_only_its_unit(
    s3_server, s3_prefix, stsb_dev
):
    fs, prefix = s3_server.filesystem(), s3_prefix[len("s3://") :]
    texts = list(dict.fromkeys(stsb_dev[0]))[:1200]

    def write(i: int, rows: list[str]) -> None:
        table = pa.table({"id": list(range(i * 10, i * 10 + 10)), "text": rows})
        with fs.open_output_stream(f"{prefix}/in/hour={i // 60:02d}/f{i:03d}.parquet") as f:
            pq.write_table(table, f)

    for i in range(120):  # 1,200 rows in 120 files, two hive folders
        write(i, texts[i * 10 : i * 10 + 10])
    config = parse_config(
        EmbedConfig,
        {
            "model": tiny_model_path(),
            "input": {"path": f"{s3_prefix}/in", "id_column": "id"},
            "output": {"path": f"{s3_prefix}/out"},
            "compute": {"precision": "fp32", "executor": "local", "unit_rows": 200},
        },
    )
    first = run_embed(config)
    outputs = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/out", recursive=True))
        if i.path.endswith(".parquet") and "/_report/" not in i.path
    ]
    assert first.output_rows == 1200 and 4 <= len(outputs) <= 12, outputs
    assert all("-files.part-" in o for o in outputs)  # each holds several input files
    written = pa.concat_tables(pq.read_table(o, filesystem=fs) for o in outputs)
    assert sorted(written.column("id").to_pylist()) == list(range(1200))
    manifest = json.loads(fs.open_input_stream(f"{prefix}/out/_manifest.json").read())
    assert len(manifest["files"]) == 120
    assert all(f["rows_out"] == 10 and len(f["outputs"]) == 1 for f in manifest["files"])

    edited = texts[70:80]
    write(7, [t + " (edited)" for t in edited[:3]] + edited[3:])
    second = run_embed(config)
    assert second.skipped_units == len(outputs) - 1  # only the unit holding f007
    assert (second.texts_embedded, second.output_rows) == (3, 1200)
    assert second.reused_rows == second.embedded_rows - 3 and second.orphaned_parts == 0
