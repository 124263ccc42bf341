"""Row-level reuse: an input rewritten with a few changed rows (reordered, moved between files,
compacted into fewer files) embeds only the new and changed texts, and its output equals a full
run's."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from tiny_model import tiny_model_path

from sbertray import storage
from sbertray.config import ComputeConfig, EmbedConfig, parse_config
from sbertray.embed import donor_join, reuse
from sbertray.embed.planning import plan_input
from sbertray.embed.pool import runs_in_process
from sbertray.embed.run import run_embed

pytestmark = pytest.mark.slow


def _config(inp, out, executor: str, compute: dict | None = None, **output) -> EmbedConfig:
    return parse_config(
        EmbedConfig,
        {
            "model": tiny_model_path(),
            "input": {"path": str(inp), "id_column": "id", "passthrough": ["n"]},
            "output": {"path": str(out), "rows_per_file": 20, **output},
            "compute": {"precision": "fp32", "executor": executor, **(compute or {})},
        },
    )


def _write(root, name: str, ids: list[int], texts: dict[int, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": ids, "text": [texts[i] for i in ids], "n": [i * 10 for i in ids]})
    pq.write_table(table, root / name, row_group_size=10)


def _read(out) -> dict[int, tuple[bytes, np.ndarray, int]]:
    table = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("*.parquet")))
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id written twice"
    keys, ns = table.column("content_key").to_pylist(), table.column("n").to_pylist()
    return {i: (k, v, n) for i, k, v, n in zip(ids, keys, vectors, ns, strict=True)}


def test_a_rewritten_input_embeds_only_new_and_changed_texts(
    ray_2cpu, tmp_path, stsb_dev, s3_prefix
):
    texts = dict(enumerate(list(dict.fromkeys(stsb_dev[0] + stsb_dev[1]))[:120]))
    inp, out = tmp_path / "in", tmp_path / "out"
    for f in range(3):
        _write(inp, f"day-{f}.parquet", list(range(f * 40, f * 40 + 40)), texts)
    first = run_embed(_config(inp, out, "local"))
    assert (first.texts_embedded, first.reused_rows) == (120, 0)
    before = _read(out)
    joined_out = f"{s3_prefix}/out-joined"
    storage.upload_dir(out, storage.resolve(joined_out))

    # The next snapshot: 5 texts edited, 3 rows deleted, 4 rows new, every row shuffled and
    # the 3 files compacted into 2 with new names.
    edited, deleted, new = [3, 41, 42, 80, 119], [7, 50, 99], [500, 501, 502, 503]
    for i in edited:
        texts[i] += " (edited)"
    texts |= {i: f"a brand new sentence number {i}" for i in new}
    rows = [i for i in texts if i not in deleted]
    np.random.default_rng(0).shuffle(rows)
    for path in inp.glob("*.parquet"):
        path.unlink()
    _write(inp, "compacted-a.parquet", rows[:60], texts)
    _write(inp, "compacted-b.parquet", rows[60:], texts)

    # Through the actor pool: the donor index reaches the actors by the object store.
    second = run_embed(_config(inp, out, "ray"))
    assert (second.output_rows, second.embedded_rows) == (121, 121)
    assert (second.texts_embedded, second.reused_rows) == (9, 112)
    assert second.orphaned_parts == 6  # the old files' parts: gone, their rows live on
    after = _read(out)
    assert sorted(after) == sorted(rows)
    for i in rows:
        if i in before and i not in edited:  # copied, bit for bit
            assert after[i][0] == before[i][0] and np.array_equal(after[i][1], before[i][1])
        assert after[i][2] == i * 10  # passthrough columns come from the new input
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["timings"]["reused_rows"] == 112
    assert manifest["timings"]["texts_embedded"] == 9
    # Throughput once the actors run: from the first unit's start to the last commit.
    assert 0 < manifest["timings"]["units_span_s"] <= manifest["timings"]["seconds"]

    # The donors (on S3) joined to each unit on Ray, as for donors too large for one index:
    # the same rows copied, the same output. The join's scratch files (and those a killed
    # run left) are gone afterwards.
    scratch_dir = storage.resolve(joined_out).child(donor_join.JOIN_DIR)
    storage.write_bytes(scratch_dir.child("keys", "0.arrow"), b"left by a killed run")
    joined = run_embed(_config(inp, joined_out, "ray", compute={"reuse_index_max_mb": 0}))
    assert (joined.texts_embedded, joined.reused_rows) == (9, 112)
    selector = pafs.FileSelector(scratch_dir.path, recursive=True, allow_not_found=True)
    assert not scratch_dir.fs.get_file_info(selector)
    by_join = _read(storage.download_dir(storage.resolve(joined_out), tmp_path / "joined"))
    assert sorted(by_join) == sorted(after)
    for i in rows:
        assert by_join[i][0] == after[i][0] and np.array_equal(by_join[i][1], after[i][1])

    # The same rows embedded from scratch, in this process: the same keys and vectors.
    full = run_embed(_config(inp, tmp_path / "full", "local"))
    assert (full.texts_embedded, full.reused_rows) == (121, 0)
    scratch = _read(tmp_path / "full")
    assert {i: v[0] for i, v in scratch.items()} == {i: v[0] for i, v in after.items()}
    a = np.stack([after[i][1] for i in rows])
    b = np.stack([scratch[i][1] for i in rows])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999

    # Anything that changes the vectors changes every key: nothing is copied.
    third = run_embed(_config(inp, out, "local", embedding_dtype="float16", mode="replace"))
    assert (third.texts_embedded, third.reused_rows) == (121, 0)


def test_small_work_without_a_cluster_runs_in_this_process(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh CLI process
    monkeypatch.setattr("sbertray.embed.pool._gpu_visible", lambda: False)
    auto = ComputeConfig()
    assert runs_in_process(auto, None, rows_to_embed=auto.local_max_rows)
    assert not runs_in_process(auto, None, rows_to_embed=auto.local_max_rows + 1)
    assert not runs_in_process(auto, "ray://head:10001", rows_to_embed=10)
    assert not runs_in_process(ComputeConfig(device="cuda"), None, rows_to_embed=10)
    assert not runs_in_process(ComputeConfig(executor="ray"), None, rows_to_embed=10)
    assert runs_in_process(ComputeConfig(executor="local"), "ray://head:10001", 10**9)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert not runs_in_process(auto, None, rows_to_embed=10)


def test_the_donor_join_gives_each_unit_exactly_the_donor_rows_it_needs(tmp_path, monkeypatch):
    """The join's steps as the Ray tasks run them, here in one process: 3 buckets, 2 groups of
    units, a text repeated inside and across donor files, units with and without donors."""
    texts = [f"sentence number {i}" for i in range(90)]
    inp = tmp_path / "in"
    # Units of 10 rows: texts 0..59 again (shuffled, one repeated), 60..89 never seen, a null.
    order = np.random.default_rng(1).permutation(60).tolist() + list(range(60, 90))
    new = [texts[i] for i in order] + [texts[5], None]
    _write(inp, "a.parquet", list(range(len(new))), dict(enumerate(new)))
    config = _config(inp, tmp_path / "out", "ray", rows_per_file=10)
    config.bad_input.on_null_text = "skip"
    units = plan_input(config).units
    assert len(units) == 10
    # At scale: 128 MB buckets (4 GiB: 32), then the square root of the donors' size (1 TiB:
    # 2,048, not 8,192).
    huge = [reuse.DonorFile(f"d{i}", 1_000_000, 1 << 30) for i in range(4)]
    at_scale = donor_join.plan_join(units, huge, min_buckets=3)
    assert at_scale.buckets == 32 and [len(m) for m in at_scale.donor_maps] == [1, 1, 1, 1]
    tera = [reuse.DonorFile("d", 10**9, 1 << 40)]
    assert donor_join.plan_join(units, tera, min_buckets=3).buckets == 2048
    # Small pieces here, to have several maps, buckets and groups.
    monkeypatch.setattr(donor_join, "GROUP_ROWS", 40)
    monkeypatch.setattr(donor_join, "PIECE_BYTES", 10)
    plan = donor_join.plan_join(units, [], min_buckets=3)
    assert plan.buckets == 3 and [len(g) for g in plan.groups] == [4, 4, 2]
    assert [len(m) for m in plan.key_maps] == [4, 4, 2]

    # Donors: texts 0..59 over two files, 20..29 in both, 7 twice in one file; vector = [i, i].
    content_hash = "h" * 64
    out = storage.resolve(tmp_path / "donors")
    os.makedirs(out.path)
    for name, ids in [("d0.parquet", [*range(30), 7]), ("d1.parquet", range(20, 60))]:
        table = pa.table(
            {
                reuse.KEY_COLUMN: reuse.key_array(
                    reuse.row_keys(content_hash, [texts[i] for i in ids])
                ),
                "embedding": pa.array(
                    [[float(i), float(i)] for i in ids], pa.list_(pa.float32(), 2)
                ),
            }
        )
        pq.write_table(table, f"{out.path}/{name}")
    # Each step's pieces go through a file, as on Ray (piece n = record batch n).
    scratch = storage.resolve(tmp_path / "scratch")
    os.makedirs(scratch.path)

    def through_file(name: str, pieces: list[pa.Table]) -> storage.Location:
        donor_join.write_pieces(scratch.child(name), pieces)
        return scratch.child(name)

    mapped = [
        through_file(
            f"k{n}",
            donor_join.unit_key_pieces(config, content_hash, [units[i] for i in g], g, 3),
        )
        for n, g in enumerate(plan.key_maps)
    ]
    mapped += [
        through_file(name, donor_join.donor_pieces(out, [f"{out.path}/{name}"], ["embedding"], 3))
        for name in ("d0.parquet", "d1.parquet")
    ]
    joined, matched = [], 0
    for b in range(plan.buckets):
        pieces, rows = donor_join.join_bucket(
            [donor_join.read_piece(m, b) for m in mapped[:3]],
            [donor_join.read_piece(m, b) for m in mapped[3:]],
            plan.group_of_unit(),
        )
        joined.append(through_file(f"j{b}", pieces))
        matched += rows
    assert matched == 61  # texts 0..59 and the repeated text 5
    places = [(g, n) for g, group in enumerate(plan.groups) for n in range(len(group))]
    result = donor_join.JoinedDonors(scratch, places)  # every unit read, empty pieces too
    os.makedirs(f"{scratch.path}/gathered")
    for g, group in enumerate(plan.groups):
        pieces = [donor_join.read_piece(j, g) for j in joined]
        gathered = donor_join.gather_group(pieces, group)
        donor_join.write_pieces(donor_join.group_file(scratch, g), gathered)
    per_unit = [result.read(u) for u in range(len(units))]
    assert [len(i) if i is not None else 0 for i in per_unit] == [10] * 6 + [0, 0, 0, 1]
    for unit, index in zip(units[:6], per_unit, strict=False):
        wanted = order[unit.slices[0].first_row : unit.slices[0].first_row + 10]
        keys = reuse.row_keys(content_hash, [texts[i] for i in wanted])
        found = index.lookup(keys)
        vectors = index.columns.column("embedding").to_pylist()
        assert [vectors[f][0] for f in found] == wanted
