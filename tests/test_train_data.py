import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sbertray.config import PairColumns, PairDataConfig
from sbertray.train.data import DataError, load_pairs


def _spec(path, **kw) -> PairDataConfig:
    return PairDataConfig(path=str(path), **kw)


def _write_csv(path, rows, header=("sentence_0", "sentence_1", "label")):
    path.write_text("\n".join([",".join(header), *rows]) + "\n")
    return path


def test_stsb_tsv_keeps_every_row_despite_quotes(stsb_dir):
    spec = PairDataConfig(
        path=str(stsb_dir / "train.tsv"),
        columns=PairColumns(sentence_0="sentence1", sentence_1="sentence2", label="score"),
        label_scale=0.2,
    )
    pairs = load_pairs(spec)
    assert pairs.table.num_rows == 5749  # a quoting parser loses rows on the bare `"`s
    labels = pairs.table.column("label").to_pylist()
    assert min(labels) == 0.0 and max(labels) == 1.0
    assert pairs.table.column("sentence_0")[0].as_py() == "A plane is taking off."
    assert any('"' in s for s in pairs.table.column("sentence_0").to_pylist())


def test_an_empty_sentence_is_a_bad_row_not_silent_noise(tmp_path):
    path = _write_csv(
        tmp_path / "p.csv", ['Intro to SQL,"  ",0.0', "Intro to SQL,Data Science,1.0"]
    )
    with pytest.raises(
        DataError, match=r"p\.csv: row 0 \(line 2\): field `sentence_1`: empty text"
    ):
        load_pairs(_spec(path))
    pairs = load_pairs(_spec(path, on_bad_row="skip"))
    assert pairs.table.column("sentence_1").to_pylist() == ["Data Science"]
    assert pairs.skipped == {"empty text": 1}
    meant = load_pairs(_spec(path, empty_text="keep"))  # seed 000's data has empty categories
    assert meant.table.column("sentence_1").to_pylist() == ["  ", "Data Science"]
    assert meant.kept == {"empty text": 1} and meant.num_skipped == 0


def test_missing_column_names_file_and_column(tmp_path):
    path = _write_csv(tmp_path / "p.csv", ["a,b,1.0"], header=("left", "right", "label"))
    with pytest.raises(
        DataError, match=r"p\.csv: missing column `sentence_0` \(for sentence_0\), `sentence_1`"
    ):
        load_pairs(_spec(path))


@pytest.mark.parametrize(
    "record,field,reason",
    [
        ({"sentence_0": None, "sentence_1": "b", "label": 0.5}, "sentence_0", "null text"),
        ({"sentence_0": "a", "sentence_1": 17, "label": 0.5}, "sentence_1", "text is not a string"),
        ({"sentence_0": "a", "sentence_1": "b", "label": None}, "label", "null label"),
        ({"sentence_0": "a", "sentence_1": "b", "label": "high"}, "label", "label is not a number"),
        ({"sentence_0": "a", "sentence_1": "b", "label": 1.5}, "label", "label outside 0..1"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, record, field, reason):
    good = {"sentence_0": "x", "sentence_1": "y", "label": 0.1}
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, record, good]) + "\n")
    with pytest.raises(DataError, match=rf"p\.jsonl: row 2: field `{field}`: {reason}"):
        load_pairs(_spec(path))
    skipped = load_pairs(_spec(path, on_bad_row="skip"))
    assert skipped.table.num_rows == 3
    assert skipped.num_skipped == 1


def test_nan_label_in_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"sentence_0": ["a", "b"], "sentence_1": ["c", "d"], "label": [0.2, math.nan]}),
        path,
    )
    with pytest.raises(DataError, match=r"p\.parquet: row 1: field `label`: label is NaN"):
        load_pairs(_spec(path))


def test_csv_errors_give_the_line_number(tmp_path):
    path = _write_csv(tmp_path / "p.csv", ["a,b,0.5", "c,d,oops"])
    with pytest.raises(DataError, match=r"row 1 \(line 3\): field `label`: label is not a number"):
        load_pairs(_spec(path))


def test_skip_mode_counts_every_reason(tmp_path):
    path = _write_csv(tmp_path / "p.csv", ["a,b,0.5", "c,d,7", "e,f,", "g,h,0.25"])
    pairs = load_pairs(_spec(path, on_bad_row="skip"))
    assert pairs.table.column("label").to_pylist() == [0.5, 0.25]
    assert pairs.num_skipped == 2
    assert set(pairs.skipped) == {
        "label outside 0..1 after label_scale=1.0",
        "label is not a number",
    }


def test_empty_data_set(tmp_path):
    path = _write_csv(tmp_path / "p.csv", [])
    with pytest.raises(DataError, match=r"p\.csv: no usable rows"):
        load_pairs(_spec(path))


def test_all_rows_bad_in_skip_mode_is_empty(tmp_path):
    path = _write_csv(tmp_path / "p.csv", ["a,b,9"])
    with pytest.raises(DataError, match=r"no usable rows \(skipped 1 rows \(1 label outside 0..1"):
        load_pairs(_spec(path, on_bad_row="skip"))


def test_unreadable_file(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"p\.parquet: cannot read as parquet"):
        load_pairs(_spec(path))


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file or directory"):
        load_pairs(_spec(tmp_path / "nope.csv"))


def test_records_become_text_like_the_seed_card(tmp_path):
    rec = {"page_name": "Finance", "section_title": "Advance Assessments", "text": "t", "url": "u"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"sentence_0": rec, "sentence_1": "plain", "label": 1.0}) + "\n")
    as_repr = load_pairs(_spec(path)).table.column("sentence_0")[0].as_py()
    assert as_repr == str(rec)
    templated = load_pairs(
        _spec(path, record_text="template", record_template="{page_name}: {text}")
    )
    assert templated.table.column("sentence_0")[0].as_py() == "Finance: t"


def test_directory_of_parquet_and_datasets_dir(tmp_path):
    import datasets

    table = pa.table({"s0": ["a", "b", "c"], "s1": ["d", "e", "f"], "y": [0, 3, 5]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(table.slice(2), tmp_path / "pq" / "part-1.parquet")
    (tmp_path / "pq" / "_SUCCESS").write_text("")
    cols = PairColumns(sentence_0="s0", sentence_1="s1", label="y")
    pairs = load_pairs(_spec(tmp_path / "pq", columns=cols, label_scale=0.2))
    assert pairs.table.column("label").to_pylist() == pytest.approx([0.0, 0.6, 1.0])
    assert len(pairs.files) == 2
    datasets.Dataset(table).save_to_disk(str(tmp_path / "ds"))
    from_ds = load_pairs(_spec(tmp_path / "ds", columns=cols, label_scale=0.2))
    assert from_ds.table.column("sentence_1").to_pylist() == ["d", "e", "f"]


def test_reads_pairs_from_s3(s3_prefix, s3_server):
    import pyarrow.fs as pafs

    fs = s3_server.filesystem()
    with fs.open_output_stream(f"{s3_prefix[5:]}/pairs.jsonl") as f:
        f.write(b'{"sentence_0": "a", "sentence_1": "b", "label": 0.5}\n')
    pairs = load_pairs(_spec(f"{s3_prefix}/pairs.jsonl"))
    assert pairs.table.to_pylist() == [{"sentence_0": "a", "sentence_1": "b", "label": 0.5}]
    assert isinstance(fs, pafs.S3FileSystem)


def test_outputs_inside_a_ray_jobs_temporary_package_are_refused(tmp_path):
    from sbertray.config import TrainConfig, load_config
    from sbertray.storage import StorageError
    from sbertray.train.run import plan_training

    # What a relative `output.model` of a `ray job submit` job resolves to.
    package = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    config = load_config(
        TrainConfig, "jobs/configs/courses.yaml", [f"output.model={package}/runs/model"]
    )
    with pytest.raises(StorageError, match="`output.model: .*deleted with the job"):
        plan_training(config)
    assert not package.exists()


def test_triplets_and_unlabelled_pairs_for_in_batch_negatives(tmp_path):
    path = _write_csv(
        tmp_path / "t.csv",
        ["how to sort a list,use sorted(),open a file", "boil an egg,ten minutes in water,"],
        header=("query", "answer", "wrong"),
    )
    columns = PairColumns(sentence_0="query", sentence_1="answer", label=None, negative="wrong")
    with pytest.raises(DataError, match=r"t\.csv: row 1 \(line 3\): field `wrong`: empty text"):
        load_pairs(_spec(path, columns=columns))
    pairs = load_pairs(_spec(path, columns=columns, on_bad_row="skip"))
    assert pairs.table.column_names == ["sentence_0", "sentence_1", "sentence_2", "label"]
    assert pairs.table.to_pylist() == [
        {
            "sentence_0": "how to sort a list",
            "sentence_1": "use sorted()",
            "sentence_2": "open a file",
            "label": 1.0,  # no label column: every pair is a positive
        }
    ]
    plain = load_pairs(
        _spec(path, columns=PairColumns(sentence_0="query", sentence_1="answer", label=None))
    )
    assert plain.table.column_names == ["sentence_0", "sentence_1", "label"]
    assert plain.table.num_rows == 2


def test_min_label_keeps_the_positives_and_counts_the_rest(stsb_dir, tmp_path):
    spec = PairDataConfig(
        path=str(stsb_dir / "train.tsv"),
        columns=PairColumns(sentence_0="sentence1", sentence_1="sentence2", label="score"),
        label_scale=0.2,
        min_label=0.8,
    )
    pairs = load_pairs(spec)
    labels = pairs.table.column("label").to_pylist()
    assert min(labels) >= 0.8 and 1000 < len(labels) < 5749
    assert pairs.skipped == {"label below min_label": 5749 - len(labels)}
    # A filtered row is not a bad one: it never fails a run, and the error counts bad rows only.
    path = _write_csv(tmp_path / "p.csv", ["a,b,0.1", "c,d,0.9", "e,f,7"])
    with pytest.raises(DataError, match=r"^1 bad row\(s\)"):
        load_pairs(_spec(path, min_label=0.5))
    with pytest.raises(DataError, match=r"no usable rows \(skipped 1 rows \(1 label below"):
        load_pairs(_spec(_write_csv(tmp_path / "q.csv", ["a,b,0.1"]), min_label=0.5))
