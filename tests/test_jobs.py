"""How users run sbertray for real: `ray job submit` against a real Ray head, and the nightly
pipeline run twice."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sbertray.config import NightlyConfig, load_config
from sbertray.nightly import run_nightly
from sbertray.report import summarize

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with explicit ports and its own temp dir; stopped by
    killing exactly the processes that carry that temp dir (no machine-wide `ray stop`)."""
    import psutil

    temp_dir = f"/tmp/sbr-{uuid.uuid4().hex[:8]}"
    gcs, dashboard, client, node_mgr, obj_mgr, agent_http, agent_grpc, metrics, rt_env = (
        _free_ports(9)
    )
    low = 20000 + (os.getpid() % 200) * 100
    cmd = [
        RAY,
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 99}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    # Job entrypoints run `python` from the head's PATH: make that this environment's python,
    # as a cluster's setup commands would.
    # Token auth off: this head listens on loopback only, for this test alone.
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        procs = [
            p
            for p in psutil.process_iter(["cmdline"])
            if temp_dir in " ".join(p.info["cmdline"] or [])
        ]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_embed_job(ray_head, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(ray_head)
    out = tmp_path / "out"
    job_id = client.submit_job(
        entrypoint=f"python jobs/embed.py --config jobs/configs/embed_demo.yaml output.path={out}",
        runtime_env={
            "working_dir": str(REPO),
            "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        },
    )
    deadline = time.time() + 420
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "[sbertray] embedded 36 rows in " in logs and " rows/s from 3 files" in logs
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"]["output_rows"] == 36 and (out / "_SUCCESS").exists()
    assert {p.name for p in out.glob("source=*")} == {"source=udemy", "source=coursera"}


def test_nightly_runs_twice_then_picks_up_only_new_shards(ray_2cpu, tmp_path, capsys):
    inp = tmp_path / "courses"
    shutil.copytree(REPO / "jobs/samples/courses", inp)
    overrides = [
        f"models={tmp_path / 'models'}",
        f"output={tmp_path / 'emb'}",
        f"embed.overrides=[input.path={inp}]",
    ]
    config = load_config(NightlyConfig, REPO / "jobs/configs/nightly_demo.yaml", overrides)

    first = run_nightly(config)
    assert first["train"]["trained"] and first["train"]["promoted"]
    assert first["embed"]["output_rows"] == 36 and first["embed"]["skipped_units"] == 0
    model_dir = Path(first["model"])
    assert (model_dir / "model.safetensors").exists() and (model_dir / "report.md").exists()
    prefix = tmp_path / "emb" / f"model={first['model_hash'][:12]}"
    report_dir = prefix / "_report"
    assert (prefix / "_SUCCESS").exists() and (report_dir / "report.json").exists()
    assert (report_dir / "throughput.png").exists() and (report_dir / "scores.png").exists()
    summary = summarize(str(prefix))
    assert summary.startswith(
        f"embed run {json.loads((report_dir / 'report.json').read_text())['run_id']}: 36/36"
    )
    assert "top-1 reference score mean" in summary
    assert summarize(str(tmp_path / "emb")).startswith(f"nightly run {first['run_id']}")

    second = run_nightly(config)
    assert not second["train"]["trained"]
    assert second["embed"]["skipped_units"] == 3 and second["model_hash"] == first["model_hash"]
    assert "training data unchanged" in " ".join(second["log"])
    assert "no new or changed input shards: nothing embedded" in second["log"]

    pq.write_table(
        pa.table(
            {
                "course_id": [900, 901],
                "title": ["Intro to Rust", "Watercolor Basics"],
                "language": ["en", "en"],
            }
        ),
        inp / "source=udemy" / "part-9.parquet",
    )
    third = run_nightly(config)
    assert third["embed"]["output_rows"] == 38 and third["embed"]["skipped_units"] == 3


def test_nightly_refuses_a_worse_model(ray_2cpu, tmp_path):
    config = load_config(
        NightlyConfig,
        REPO / "jobs/configs/nightly_demo.yaml",
        [
            f"models={tmp_path / 'models'}",
            f"output={tmp_path / 'emb'}",
        ],
    )
    first = run_nightly(config)
    assert first["train"]["promoted"]
    # New training data + a bar no candidate can clear: the current model must stay.
    train_copy = tmp_path / "train.csv"
    shutil.copy(REPO / "jobs/samples/courses_categories.csv", train_copy)
    config.train.overrides.append(f"train.path={train_copy}")
    config.promotion.min_improvement = 1.0
    second = run_nightly(config)
    assert second["train"]["trained"] and not second["train"]["promoted"]
    assert second["model"] == first["model"] and second["model_hash"] == first["model_hash"]
    # A bar every candidate clears: the new candidate replaces the current model.
    shutil.copy(REPO / "jobs/samples/courses_categories.csv", train_copy)  # a new mtime
    config.promotion.min_improvement = -1.0
    third = run_nightly(config)
    assert third["train"]["promoted"] and third["model"] == third["train"]["candidate"]
    assert third["model"] not in (first["model"], second["model"])
    assert any(line.startswith("NOT promoting") for line in second["log"])
