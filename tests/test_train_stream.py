"""The training set's way to the workers: validation into shards (in the driver or as Ray
tasks, with the same result) and each worker's seeded, resumable stream of its batch slices."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sbertray.config import PairDataConfig
from sbertray.train import prepare
from sbertray.train.data import DataError, FileCheck, _all_good, _check_rows
from sbertray.train.stream import PairStream, epoch_windows


def _write_files(folder, files: int, rows: int, bad_row: tuple[int, int] | None = None):
    folder.mkdir()
    for f in range(files):
        ids = [f"f{f}-r{r}" for r in range(rows)]
        labels = [(r % 10) / 10 for r in range(rows)]
        if bad_row and bad_row[0] == f:
            labels[bad_row[1]] = 7.0
        table = pa.table(
            {"sentence_0": ids, "sentence_1": [f"other {i}" for i in ids], "label": labels}
        )
        pq.write_table(table, folder / f"part-{f}.parquet")
    return folder


@pytest.fixture
def shards(tmp_path):
    """999 pairs in 3 files of 333, prepared as shards of 128 rows: 128, 128 and 77 a file."""
    folder = _write_files(tmp_path / "in", files=3, rows=333)
    out = str(tmp_path / "prepared")
    prepared = prepare.prepare_pairs(
        PairDataConfig(path=str(folder)), None, out, sample_rows=50, use_ray=False, shard_rows=128
    )
    return prepared


def _epoch(stream: PairStream, epoch: int, first: int = 0) -> list[list[str]]:
    return [[row["sentence_0"] for row in batch] for batch in stream.batches(epoch, first)]


def _streams(shards, world: int, **kw) -> list[PairStream]:
    return [
        PairStream(
            shards, None, global_batch=32, world=world, rank=r, seed=7, window_rows=300, **kw
        )
        for r in range(world)
    ]


def test_prepared_shards_hold_every_good_row_once(shards):
    assert shards.rows == 999 and len(shards.shards) == 9
    assert [s.rows for s in shards.shards] == [128, 128, 77] * 3
    assert len(shards.sample) == 50 and shards.sample.column("sentence_0")[0].as_py() == "f0-r0"
    ids = pa.concat_tables(pq.read_table(s.url) for s in shards.shards).column("sentence_0")
    assert sorted(ids.to_pylist()) == sorted(f"f{f}-r{r}" for f in range(3) for r in range(333))


def test_workers_split_each_global_batch_and_see_each_row_at_most_once(shards):
    first, second = _streams(shards.shards, world=2)
    assert len(first) == 999 // 32 == 31
    left, right = _epoch(first, 0), _epoch(second, 0)
    assert len(left) == len(right) == 31 and {len(b) for b in left + right} == {16}
    seen = [row for batch in left + right for row in batch]
    assert len(seen) == len(set(seen)) == 31 * 32  # the incomplete last batch is dropped
    # More than one window (300 rows), so the windows' shuffles and the carry between them ran.
    assert len(epoch_windows([s.rows for s in shards.shards], 7, 0, 300)) > 1


def test_the_order_is_the_seeds_and_changes_each_epoch(shards):
    (stream,) = _streams(shards.shards, world=1)
    (again,) = _streams(shards.shards, world=1)
    assert _epoch(stream, 0) == _epoch(again, 0)
    assert _epoch(stream, 0) != _epoch(stream, 1)
    other = PairStream(
        shards.shards, None, global_batch=32, world=1, rank=0, seed=8, window_rows=300
    )
    assert _epoch(other, 0) != _epoch(stream, 0)
    # Rows of different files share batches: the shards are shuffled, not read file by file.
    files_in_first_batches = {row.split("-")[0] for batch in _epoch(stream, 0)[:3] for row in batch}
    assert len(files_in_first_batches) > 1


def test_resuming_at_a_step_continues_the_same_order(shards):
    (stream,) = _streams(shards.shards, world=1)
    whole = _epoch(stream, 2)
    for step in (1, 9, 10, 30):  # 9 and 10 straddle the first window's end (300 rows)
        assert _epoch(stream, 2, first=step) == whole[step:]
    # Through the trainer's calls: set_epoch, then iteration from the resumed step.
    (resumed,) = _streams(shards.shards, world=1, start_step=31 * 2 + 5)
    resumed.set_epoch(2)
    assert [[r["sentence_0"] for r in b] for b in resumed] == whole[5:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == 31


def test_the_fast_check_agrees_with_the_row_by_row_one(stsb_dir):
    from sbertray.config import PairColumns
    from sbertray.train.sources import Source, read_batches

    spec = PairDataConfig(
        path=str(stsb_dir / "train.tsv"),
        columns=PairColumns(sentence_0="sentence1", sentence_1="sentence2", label="score"),
        label_scale=0.2,
    )
    columns = next(read_batches(Source(spec.path, "tsv", 0), None))
    texts, labels = [columns["sentence1"], columns["sentence2"]], columns["score"]
    fast = _all_good(texts, labels, spec, FileCheck("train.tsv"))
    slow = _check_rows(texts, labels, spec, FileCheck("train.tsv"), "tsv")
    assert fast is not None and fast.num_rows == 5749
    assert fast.equals(slow)


def test_ray_tasks_prepare_what_the_driver_prepares(ray_2cpu, tmp_path, s3_prefix):
    folder = _write_files(tmp_path / "in", files=4, rows=250)
    spec = PairDataConfig(path=str(folder))
    here = prepare.prepare_pairs(
        spec, None, str(tmp_path / "a"), sample_rows=10, use_ray=False, shard_rows=100
    )
    on_ray = prepare.prepare_pairs(
        spec, None, f"{s3_prefix}/b", sample_rows=10, use_ray=True, shard_rows=100
    )
    assert on_ray.digest == here.digest and on_ray.rows == here.rows == 1000
    assert [s.rows for s in on_ray.shards] == [s.rows for s in here.shards]
    assert on_ray.sample.equals(here.sample)

    broken = _write_files(tmp_path / "broken", files=4, rows=250, bad_row=(2, 17))
    with pytest.raises(DataError, match=r"part-2\.parquet: row 17: field `label`: label outside"):
        prepare.prepare_pairs(
            PairDataConfig(path=str(broken)), None, None, sample_rows=10, use_ray=True
        )
    skipped = prepare.prepare_pairs(
        PairDataConfig(path=str(broken), on_bad_row="skip"),
        None,
        None,
        sample_rows=10,
        use_ray=True,
    )
    assert skipped.rows == 999 and skipped.num_skipped == 1
