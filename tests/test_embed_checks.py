"""Bad input is refused before any work, with one message naming the file, row and field; the
CLI prints it without a traceback and exits 2. The invariant guards the commit."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import run, sbertray_cmd
from tiny_model import tiny_model_path

from sbertray import cli
from sbertray.config import ConfigError, EmbedConfig, parse_config
from sbertray.embed import checks, ray_adapter
from sbertray.embed.commit import InvariantError
from sbertray.embed.run import run_embed
from sbertray.embed.shards import EmbedInputError
from sbertray.storage import StorageError


def _write(path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _config(tmp_path, **sections) -> EmbedConfig:
    data = {
        "model": tiny_model_path(),
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "compute": {"precision": "fp32"},
        **sections,
    }
    return parse_config(EmbedConfig, data)


def _refused(tmp_path, error, match, **sections) -> None:
    with pytest.raises(error, match=match):
        run_embed(_config(tmp_path, **sections))
    assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"


def test_null_and_duplicate_ids_are_named_before_any_work(tmp_path):
    _write(tmp_path / "in" / "a.parquet", id=[1, 2, None], text=["x", "y", "z"])
    _refused(
        tmp_path, EmbedInputError, r"a\.parquet: row 2: column `id` \(input.id_column\) is null"
    )
    _write(tmp_path / "in" / "a.parquet", id=[1, 2, 2], text=["x", "y", "z"])
    _refused(
        tmp_path, EmbedInputError, r"1 ids occur more than once, e\.g\. \[2\], in .*a\.parquet"
    )
    _write(tmp_path / "in" / "a.parquet", id=[1, 2, 3], text=["x", "y", "z"])
    _write(tmp_path / "in" / "b.parquet", id=[3, 4], text=["x", "y"])
    _refused(tmp_path, EmbedInputError, r"e\.g\. \[3\], in .*a\.parquet, .*b\.parquet")
    _write(tmp_path / "in" / "b.parquet", id=["3", "4"], text=["x", "y"])
    _refused(tmp_path, EmbedInputError, r"different types across files: int64 in .*string in")


def test_ids_are_checked_by_ray_tasks_in_buckets_when_ray_runs(ray_2cpu, tmp_path, monkeypatch):
    """With Ray up, the check's maps and reduces are Ray tasks; small limits force several
    maps (files) and buckets, so a repeat across files meets in one bucket."""
    monkeypatch.setattr(checks, "_IDS_PER_MAP", 3)
    monkeypatch.setattr(checks, "_IDS_PER_BUCKET", 2)
    for name, ids in (("a", ["k1", "k2", "k3"]), ("b", ["k4", "k5"]), ("c", ["k6", "k2"])):
        _write(tmp_path / "in" / f"{name}.parquet", id=ids, text=["x"] * len(ids))
    _refused(
        tmp_path,
        EmbedInputError,
        r"1 ids occur more than once, e\.g\. \['k2'\], in .*a\.parquet, .*c\.parquet",
    )
    _write(tmp_path / "in" / "c.parquet", id=["k6", None], text=["x", "y"])
    _refused(
        tmp_path, EmbedInputError, r"c\.parquet: row 1: column `id` \(input.id_column\) is null"
    )


def test_a_non_text_column_is_refused_whatever_the_null_policy(tmp_path):
    _write(tmp_path / "in" / "n.parquet", id=[1, 2], text=[3, 4])
    for policy in ("fail", "skip", "empty"):
        _refused(
            tmp_path,
            EmbedInputError,
            r"n\.parquet: column `text` \(input.text_column\) has type int64, not text",
            bad_input={"on_null_text": policy},
        )


def test_paths_that_cannot_work_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    _refused(tmp_path, EmbedInputError, r"input `.*in`: no Parquet files found")
    _write(tmp_path / "in" / "a.parquet", id=[1], text=["x"])
    with pytest.raises(ConfigError, match="`output.path` .* is inside `input.path`"):
        run_embed(_config(tmp_path, output={"path": str(tmp_path / "in" / "emb")}))
    assert not (tmp_path / "in" / "emb").exists()
    _write(tmp_path / "topics.parquet", id=[1], name=["sport"])
    _refused(
        tmp_path,
        EmbedInputError,
        r"reference .*/topics\.parquet: missing column `text` \(reference.text_column\)",
        reference={"path": str(tmp_path / "topics.parquet")},
    )
    # A relative output of a `ray job submit` job lands in the job's temporary package.
    package = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    with pytest.raises(StorageError, match="`output.path: .*deleted with the job"):
        run_embed(_config(tmp_path, output={"path": str(package / "runs" / "emb")}))
    assert not package.exists()
    with pytest.raises(ConfigError, match=r"`input.passthrough` has \['embedding'\]"):
        run_embed(
            _config(tmp_path, input={"path": str(tmp_path / "in"), "passthrough": ["embedding"]})
        )


def test_cli_prints_one_message_and_exits_2(tmp_path):
    _write(tmp_path / "in" / "a.parquet", id=[1, 1], body=["x", "y"])
    config = tmp_path / "embed.yaml"
    config.write_text(f"input: {{path: {tmp_path / 'in'}}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    missing = run(sbertray_cmd("embed", str(config)))
    assert missing.returncode == 2, missing.stderr
    assert "a.parquet: missing column `text` (input.text_column)" in missing.stderr
    assert "Traceback" not in missing.stderr
    duplicated = run(sbertray_cmd("embed", str(config), "input.text_column=body"))
    assert duplicated.returncode == 2 and "Traceback" not in duplicated.stderr
    assert "ids occur more than once, e.g. [1]" in duplicated.stderr


def test_a_broken_invariant_commits_nothing(ray_2cpu, tmp_path, monkeypatch, capsys):
    """Lose one committed file behind the run's back: the run must not write _SUCCESS."""
    _write(tmp_path / "in" / "a.parquet", id=[1, 2, 3], text=["x", "y", "z"])
    config = tmp_path / "embed.yaml"
    config.write_text(
        f"input: {{path: {tmp_path / 'in'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        "compute: {precision: fp32}\n"
    )
    run_units = ray_adapter.run_units

    def lose_a_file(*args, **kwargs):
        results = run_units(*args, **kwargs)
        (tmp_path / "out" / results[0].output).unlink()
        return results

    monkeypatch.setattr(ray_adapter, "run_units", lose_a_file)
    assert cli.main(["embed", str(config)]) == 2
    err = capsys.readouterr().err
    assert "a.part-0000.parquet of unit a.parquet#part-0000 was committed but cannot" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    with pytest.raises(InvariantError):  # the library says the same, by type
        run_embed(_config(tmp_path))
