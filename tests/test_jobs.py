"""How users run sbertray for real: `ray job submit` against a real Ray head, and the nightly
pipeline run twice."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_heads import RAY, RayHead

from sbertray import storage
from sbertray.config import NightlyConfig, load_config
from sbertray.nightly import run_nightly
from sbertray.report import summarize

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_head():
    """A 2-CPU head on loopback; token auth off (it serves this test alone)."""
    head = RayHead(2, env={"RAY_AUTH_MODE": "disabled"})
    try:
        yield head.start()
    finally:
        head.stop()


def test_ray_job_submit_runs_the_embed_job(ray_head, tmp_path, monkeypatch, tiny_model_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(ray_head)
    out = tmp_path / "out"
    job_id = client.submit_job(
        entrypoint="python jobs/embed.py --config jobs/configs/embed_demo.yaml "
        f"output.path={out} model={tiny_model_path}",
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


def _on_the_tiny_model(config: NightlyConfig, tiny_model_path: str) -> NightlyConfig:
    """The tiny model, trained in the test's process (Ray Train's local mode): the nightly
    decisions are under test here, Ray Train's workers in test_train.py."""
    config.train.overrides += [f"base_model={tiny_model_path}", "scaling.num_workers=0"]
    config.embed.overrides.append(f"model={tiny_model_path}")
    return config


@pytest.mark.long
def test_nightly_embeds_only_what_changed_and_promotes_only_a_better_model(
    ray_2cpu, tmp_path, tiny_model_path
):
    """Five nights on one table: the first trains and embeds everything; a night with nothing
    new does nothing; a new shard is the only work; new training data with a bar no candidate
    clears keeps the current model; a bar every candidate clears replaces it."""
    inp = tmp_path / "courses"
    shutil.copytree(REPO / "jobs/samples/courses", inp)
    overrides = [
        f"models={tmp_path / 'models'}",
        f"output={tmp_path / 'emb'}",
        f"embed.overrides=[input.path={inp}]",
    ]
    config = load_config(NightlyConfig, REPO / "jobs/configs/nightly_demo.yaml", overrides)
    config = _on_the_tiny_model(config, tiny_model_path)

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
    # Two units: the small files of each source= folder are grouped.
    assert second["embed"]["skipped_units"] == 2 and second["model_hash"] == first["model_hash"]
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
    assert third["embed"]["output_rows"] == 38 and third["embed"]["skipped_units"] == 1
    assert third["embed"]["texts_embedded"] == 2  # udemy's unit again: its old rows copied

    # New training data + a bar no candidate can clear: the current model must stay.
    train_copy = tmp_path / "train.csv"
    shutil.copy(REPO / "jobs/samples/courses_categories.csv", train_copy)
    config.train.overrides.append(f"train.path={train_copy}")
    config.promotion.min_improvement = 1.0
    refused = run_nightly(config)
    assert refused["train"]["trained"] and not refused["train"]["promoted"]
    assert refused["model"] == first["model"] and refused["model_hash"] == first["model_hash"]
    assert any(line.startswith("NOT promoting") for line in refused["log"])
    # A bar every candidate clears: the new candidate replaces the current model.
    shutil.copy(REPO / "jobs/samples/courses_categories.csv", train_copy)  # a new mtime
    config.promotion.min_improvement = -1.0
    promoted = run_nightly(config)
    assert promoted["train"]["promoted"] and promoted["model"] == promoted["train"]["candidate"]
    assert promoted["model"] not in (first["model"], refused["model"])
    assert promoted["embed"]["output_rows"] == 38  # every row again, under the new model
    # Each night is a run of its own that nothing resumes: its checkpoints are gone.
    candidates = {Path(r["train"]["candidate"]).name for r in (first, refused, promoted)}
    assert {p.name for p in (tmp_path / "models").iterdir()} == candidates


@pytest.mark.long
def test_jobs_on_a_cold_autoscaling_cluster_with_token_auth(
    tmp_path, s3_server, s3_prefix, tiny_model_path
):
    """`ray job submit` as users meet it: Ray's default token authentication on, a head that
    takes no work, and worker nodes the autoscaler adds (fake multi-node provider: 1-CPU nodes,
    0 to 2) only once the jobs ask for them."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head = RayHead(
        0,
        env={**auth, **s3_server.env(), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        worker_types={"cpu_worker": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 2}},
    )
    url = head.start()

    def submit(*entrypoint: str) -> subprocess.CompletedProcess:
        # sbertray is installed on every node, as in an image; the driver starts in the repo.
        # (No `--working-dir` here: fake nodes share one machine and would unpack the package
        # into the same folder at once. test_ray_job_submit_runs_the_embed_job covers it.)
        command = f"cd {REPO} && python " + " ".join(entrypoint)
        return subprocess.run(
            [RAY, "job", "submit", f"--address={url}", "--", "bash", "-c", command],
            env={**os.environ, **auth},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )

    try:
        embed = submit(
            "jobs/embed.py",
            "--config",
            "jobs/configs/embed_demo.yaml",
            f"output.path={s3_prefix}/emb",
            f"model={tiny_model_path}",
        )
        assert embed.returncode == 0, embed.stdout[-4000:] + embed.stderr[-2000:]
        assert "(autoscaling) cpu actor(s)" in embed.stdout
        assert "[sbertray] 36/36 rows (100%)" in embed.stdout and " ETA " in embed.stdout
        manifest = json.loads(
            storage.read_bytes(storage.resolve(f"{s3_prefix}/emb/_manifest.json"))
        )
        assert manifest["totals"]["output_rows"] == 36

        # The demo's nightly, its candidate fine-tuned from the tiny model too.
        demo = yaml.safe_load((REPO / "jobs/configs/nightly_demo.yaml").read_text())
        demo["train"]["overrides"].append(f"base_model={tiny_model_path}")
        (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(demo))
        nightly = submit(
            "jobs/nightly.py",
            "--config",
            str(tmp_path / "nightly.yaml"),
            f"models={s3_prefix}/models",
            f"output={s3_prefix}/nightly",
        )
        assert nightly.returncode == 0, nightly.stdout[-4000:] + nightly.stderr[-2000:]
        assert "[sbertray] step " in nightly.stdout  # training progress, from the workers
        assert "[sbertray] 36/36 rows (100%)" in nightly.stdout

        # Without the token the cluster turns a client away.
        anonymous = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        denied = subprocess.run(
            [RAY, "job", "list", f"--address={url}"],
            env={**anonymous, "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert denied.returncode != 0
    finally:
        head.stop()
