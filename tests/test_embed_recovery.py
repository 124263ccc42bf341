"""Recovery: a killed driver, a rerun with nothing new, and the output lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from faulty_proxy import FaultyProxy
from processes import cli_env, kill_when, run, sbertray_cmd, terminate_when
from tiny_model import tiny_model_path

from sbertray import storage
from sbertray.config import EmbedConfig, parse_config
from sbertray.embed.lock import LockError, OutputLock
from sbertray.embed.run import run_embed

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _shards(root: Path, sentences: list[str], n: int, rows: int) -> list[int]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ids = list(range(i * rows, (i + 1) * rows))
        pq.write_table(
            pa.table({"id": ids, "text": [sentences[j % len(sentences)] for j in ids]}),
            root / f"s{i:02d}.parquet",
            row_group_size=100,
        )
    return list(range(n * rows))


@pytest.fixture(scope="module")
def sentences(stsb_dir) -> list[str]:
    return [
        line.split("\t")[0]
        for line in (stsb_dir / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ]


def _config_file(tmp_path: Path, inp: Path, out: Path, **compute) -> Path:
    path = tmp_path / "embed.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": tiny_model_path(),
                "input": {"path": str(inp), "id_column": "id", "text_column": "text"},
                "output": {"path": str(out), "rows_per_file": 100},
                "compute": {"precision": "fp32", **compute},
            }
        )
    )
    return path


def _output_ids(out: Path) -> list[int]:
    return sorted(
        i for f in out.rglob("*.parquet") for i in pq.read_table(f).column("id").to_pylist()
    )


def test_killed_driver_rerun_finishes_only_unfinished_units(tmp_path, sentences):
    """Many small files, grouped into units: a killed run's committed groups are kept, the
    rest are embedded on the rerun, and no id is written twice."""
    ids = _shards(tmp_path / "in", sentences, 80, 30)  # 2,400 rows in 80 files
    out = tmp_path / "out"
    cmd = sbertray_cmd("embed", str(_config_file(tmp_path, tmp_path / "in", out, unit_rows=200)))
    kill_when(cmd, lambda: len(list(out.glob("*.parquet"))) >= 3, what="3 committed outputs")
    committed_before = len(list(out.glob("*.parquet")))
    assert not (out / "_SUCCESS").exists()
    # Only whole files are visible: every committed one reads back completely.
    for f in out.glob("*.parquet"):
        meta = pq.read_metadata(f)
        unit = json.loads(meta.metadata[b"sbertray"])["unit"]
        assert meta.num_rows == unit["rows_in"] == 30 * len(unit["inputs"])

    second = run(cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    total = len({o["path"] for f in manifest["files"] for o in f["outputs"]})
    assert 6 <= total <= 24 and committed_before < total, (committed_before, total)
    assert (
        f"embedding {total - committed_before} of {total} units; {committed_before} units "
        "already committed" in second.stdout
    )
    assert _output_ids(out) == ids  # same ids as an uninterrupted run, none twice
    assert not list(out.glob("_inprogress*")) and (out / "_SUCCESS").exists()
    assert manifest["totals"]["output_rows"] == 2400
    assert len(list(out.glob("*.parquet"))) == total  # 80 inputs, `total` outputs

    third = run(cmd)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"nothing to do: all {total} units of 80 files are already embedded" in third.stdout
    assert _output_ids(out) == ids


def test_a_terminated_run_keeps_rays_lines_off_the_console(tmp_path, sentences):
    """SIGTERM mid-run (`kill`, `ray job stop`): the run stops with its committed units kept,
    and Ray's lines about the tasks and actors it kills go to the run log, not the console."""
    _shards(tmp_path / "in", sentences, 40, 30)
    out = tmp_path / "out"
    config = _config_file(tmp_path, tmp_path / "in", out, unit_rows=100, executor="ray")
    stopped = terminate_when(
        sbertray_cmd("embed", str(config)),
        lambda: len(list(out.glob("*.parquet"))) >= 1,
        what="a committed output",
    )
    assert stopped.returncode != 0 and not (out / "_SUCCESS").exists()
    console = stopped.stdout + stopped.stderr
    assert "(raylet)" not in console and "ray.kill" not in console, console[-3000:]
    assert "[sbertray] log: " in stopped.stdout
    assert "sbertray embed: stopped (SystemExit); what was committed is kept" in stopped.stderr


def test_new_shard_is_the_only_work(ray_2cpu, tmp_path, sentences):
    _shards(tmp_path / "in", sentences, 2, 150)
    config = parse_config(
        EmbedConfig,
        {
            "model": tiny_model_path(),
            "input": {"path": str(tmp_path / "in"), "id_column": "id"},
            "output": {"path": str(tmp_path / "out")},
            "compute": {"precision": "fp32"},
        },
    )
    first = run_embed(config)
    assert (first.output_rows, first.skipped_units) == (300, 0)
    pq.write_table(
        pa.table({"id": [1000, 1001], "text": ["new one", "another"]}),
        tmp_path / "in" / "s99.parquet",
    )
    second = run_embed(config)
    # Small files share a unit: the new one joins the last, whose other rows are copied.
    assert (second.output_rows, second.texts_embedded, second.reused_rows) == (302, 2, 300)
    assert (
        json.loads((tmp_path / "out" / "_manifest.json").read_text())["totals"]["output_rows"]
        == 302
    )


def test_input_file_rewritten_with_fewer_rows_leaves_no_stale_parts(ray_2cpu, tmp_path, sentences):
    _shards(tmp_path / "in", sentences, 2, 300)  # 3 parts of 100 rows each
    config = parse_config(
        EmbedConfig,
        {
            "model": tiny_model_path(),
            "input": {"path": str(tmp_path / "in"), "id_column": "id"},
            "output": {"path": str(tmp_path / "out"), "rows_per_file": 100},
            "compute": {"precision": "fp32"},
        },
    )
    assert run_embed(config).output_rows == 600
    pq.write_table(  # s01 shrinks from 3 parts to 1; its old parts 1 and 2 are now stale
        pa.table({"id": [5000, 5001], "text": ["rewritten", "file"]}),
        tmp_path / "in" / "s01.parquet",
    )
    second = run_embed(config)
    assert (second.output_rows, second.skipped_units) == (302, 3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("s01.*")) == ["s01.part-0000.parquet"]
    assert (
        json.loads((out / "_manifest.json").read_text())["totals"]["superseded_parts_removed"] == 2
    )
    assert _output_ids(out) == [*range(300), 5000, 5001]

    (tmp_path / "in" / "s00.parquet").unlink()  # a deleted input takes its output with it
    third = run_embed(config)
    assert (third.output_rows, third.orphaned_parts, third.embedded_rows) == (2, 3, 0)
    assert not list(out.glob("s00.*")) and _output_ids(out) == [5000, 5001]


def test_runs_racing_for_an_absent_local_lock_get_one_winner(tmp_path):
    """On a local path the filesystem settles the race (an exclusive create): of eight runs
    starting together, exactly one holds the lock and the others are refused."""
    out = storage.resolve(str(tmp_path / "out"))
    locks = [OutputLock(out, f"run-{i}", stale_after_s=60) for i in range(8)]
    start = threading.Barrier(len(locks))

    def race(lock: OutputLock) -> bool:
        start.wait()
        try:
            lock.acquire()
        except LockError:
            return False
        return True

    with ThreadPoolExecutor(len(locks)) as pool:
        won = list(pool.map(race, locks))
    assert won.count(True) == 1
    winner = locks[won.index(True)]
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["run_id"] == winner.run_id
    winner.release()
    assert not (tmp_path / "out" / "_lock.json").exists()


def test_lock_blocks_a_concurrent_run_and_stale_locks_are_taken_over(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    with (
        OutputLock(out, "run-a", stale_after_s=60),
        pytest.raises(LockError, match=r"_lock\.json is held by run run-a"),
    ):
        OutputLock(out, "run-b", stale_after_s=60).acquire()
    assert not (tmp_path / "out" / "_lock.json").exists()  # released

    # A lock left by a process that no longer exists on this host is stale at once.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    storage.write_bytes(
        out.child("_lock.json"),
        json.dumps(
            {
                "run_id": "crashed",
                "host": os.uname().nodename,
                "pid": int(dead.stdout),
                "heartbeat": time.time(),
            }
        ).encode(),
    )
    with (
        pytest.warns(UserWarning, match="taking over the lock of run crashed: its process"),
        OutputLock(out, "run-c", stale_after_s=60),
    ):
        pass
    # A lock from another host is stale only after its heartbeat timeout.
    storage.write_bytes(
        out.child("_lock.json"),
        json.dumps(
            {
                "run_id": "remote",
                "host": "elsewhere",
                "pid": 1,
                "heartbeat": time.time() - 120,
            }
        ).encode(),
    )
    with pytest.warns(UserWarning, match="heartbeat is 1[0-9]{2}s old"):
        OutputLock(out, "run-d", stale_after_s=60).acquire()


def test_s3_connection_resets_are_retried_and_exhausted_retries_fail_cleanly(
    ray_2cpu, s3_server, s3_prefix, sentences
):
    """Real faults between sbertray and S3: the first connections are reset (TCP RST) by a
    proxy in front of the server. The run completes with every id once; with every
    connection reset it fails with one storage error and commits nothing."""
    fs, prefix = s3_server.filesystem(), s3_prefix[len("s3://") :]
    for i in range(2):
        ids = list(range(i * 150, (i + 1) * 150))
        with fs.open_output_stream(f"{prefix}/in/s{i}.parquet") as f:
            pq.write_table(pa.table({"id": ids, "text": [sentences[j] for j in ids]}), f)
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])

    def config(proxy: FaultyProxy, out: str, max_attempts: int = 5) -> EmbedConfig:
        return parse_config(
            EmbedConfig,
            {
                "model": tiny_model_path(),
                "input": {"path": f"{s3_prefix}/in"},
                "output": {"path": f"{s3_prefix}/{out}", "rows_per_file": 100},
                "compute": {"precision": "fp32"},
                "storage": {"endpoint_url": proxy.endpoint_url, "max_attempts": max_attempts},
            },
        )

    with FaultyProxy(port, reset_first=4) as proxy:
        summary = run_embed(config(proxy, "out"))
    assert proxy.resets == 4 and proxy.connections > 4
    assert summary.output_rows == 300
    written = pa.concat_tables(
        pq.read_table(i.path, filesystem=fs)
        for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/out"))
        if i.path.endswith(".parquet")
    )
    assert sorted(written.column("id").to_pylist()) == list(range(300))

    with FaultyProxy(port, reset_all=True) as proxy, pytest.raises(storage.StorageError):
        run_embed(config(proxy, "out2", max_attempts=2))  # exhausted sooner than the default
    assert not fs.get_file_info(f"{prefix}/out2/_SUCCESS").is_file


def test_two_runs_on_one_s3_prefix_one_refuses(s3_server, s3_prefix, tmp_path, sentences):
    fs, prefix = s3_server.filesystem(), s3_prefix[len("s3://") :]
    for i in range(3):
        ids = list(range(i * 200, (i + 1) * 200))
        with fs.open_output_stream(f"{prefix}/in/s{i}.parquet") as f:
            pq.write_table(pa.table({"id": ids, "text": [sentences[j] for j in ids]}), f)
    config = tmp_path / "embed.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": tiny_model_path(),
                "input": {"path": f"{s3_prefix}/in"},
                "output": {"path": f"{s3_prefix}/out", "rows_per_file": 100},
                "compute": {"precision": "fp32"},
            }
        )
    )
    first = subprocess.Popen(
        sbertray_cmd("embed", str(config)),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not fs.get_file_info(f"{prefix}/out/_lock.json").is_file:
        assert first.poll() is None and time.time() < deadline, "the first run never locked"
        time.sleep(0.2)
    second = run(sbertray_cmd("embed", str(config)))
    _, err = first.communicate(timeout=600)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert "_lock.json is held by run" in second.stderr
    assert first.returncode == 0, err[-3000:]
    assert fs.get_file_info(f"{prefix}/out/_SUCCESS").is_file
