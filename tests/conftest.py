"""Shared fixtures: a 2-CPU local Ray, a real S3 server (SeaweedFS on loopback), the bundled
model, a one-layer MiniLM for tests of mechanics, and paths to the shared STS-B data."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STSB_DIR = REPO.parent / "shared" / "data" / "stsb"

# Tests never reach for the Hugging Face hub: the default model is bundled.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep every local Ray (this process's and the CLI subprocesses') on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first, by the seconds each took in a whole run (``durations.json``, written by
    ``scripts/test_durations.py``); a test not listed there counts a minute if marked `long`,
    else nothing. With `-n 2` each worker holds two tests ahead: medium tests handed out
    last (file order did that) left one worker running them alone for up to a minute."""
    seconds = json.loads((REPO / "tests" / "durations.json").read_text())

    def expected(item: pytest.Item) -> float:
        return seconds.get(item.nodeid, 60.0 if item.get_closest_marker("long") else 0.0)

    items.sort(key=expected, reverse=True)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Downloaded models and exports go to a cache of the session's, not the user's
    ~/.cache/sbertray; set before any Ray starts so its workers and the CLI subprocesses see it.
    The pytest workers of one run (`-n 2`) share it, as a node's processes share theirs: each
    export of a model is made once, not once per worker (exports and downloads are written
    to a temp name and renamed into place, so concurrent writers are safe)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <run>/popen-gw0 -> <run>
    cache = root / "sbertray-cache"
    cache.mkdir(exist_ok=True)
    os.environ["SBERTRAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def stsb_dir() -> Path:
    if not (STSB_DIR / "train.tsv").exists():
        pytest.fail(f"STS-B data not found at {STSB_DIR} (expected ../shared/data/stsb)")
    return STSB_DIR


@pytest.fixture(scope="session")
def stsb_dev(stsb_dir):
    """STS-B dev as (sentences 1, sentences 2, gold scores 0..5)."""
    import numpy as np

    rows = [
        line.split("\t")
        for line in (stsb_dir / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


@pytest.fixture(scope="session")
def ray_2cpu(s3_server):
    """One local Ray for the session with exactly 2 CPUs, like this machine and CI, started the
    way `sbertray` starts its own (``init_ray``). Started after the S3 server so its workers
    inherit the endpoint and credentials, as cluster nodes get them from their environment."""
    import ray

    from sbertray.ray_runtime import NUM_CPUS_ENV, init_ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ[NUM_CPUS_ENV] = "2"
    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def sbertray_main(ray_2cpu, capsys):
    """``sbertray ARGS`` in this process, on the session's Ray: its exit code, stdout and
    stderr. For runs whose checks are the point (refusals, plans): no process start and no
    imports again, ~8 s each here. Runs whose process matters (kills, exit, console) stay
    processes of their own (``processes.py``)."""
    from sbertray import cli

    def main(*args: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
        printed = capsys.readouterr()
        return code, printed.out, printed.err

    return main


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (SeaweedFS) on free loopback ports; credentials exported to the env
    so pyarrow, s3fs and Ray workers find them like they would on a cluster."""
    server = _started_s3("sbertray-test")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def _started_s3(bucket: str, attempts: int = 3):
    """A started server with ``bucket``. Once in a fresh CI run the S3 gateway answered and then
    refused every connection for a minute (weed gone; its log went with its folder), failing
    every S3 test: a server that cannot create the bucket is replaced, on new free ports."""
    from local_s3 import LocalS3

    for attempt in range(attempts):
        server = LocalS3()
        try:
            server.start()
            server.create_bucket(bucket)
            return server
        except (OSError, RuntimeError):  # RuntimeError: weed exited or never answered
            server.stop()
            if attempt == attempts - 1:
                raise


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3:// prefix per test in the session bucket."""
    return f"s3://sbertray-test/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    from sbertray.modeling import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_model_path(model_cache) -> str:
    """A one-layer MiniLM (``tiny_model.py``) for tests of mechanics."""
    from tiny_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """The tiny model loaded once per session (fp32, CPU), to check outputs against."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_model_path, device="cpu")


@pytest.fixture(scope="session")
def base_model(bundled_model_path):
    """The real all-MiniLM-L6-v2, loaded once per session (fp32, CPU)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_model_path, device="cpu")
