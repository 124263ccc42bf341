import threading
import time

import pyarrow.fs as pafs
import pytest

from sbertray import storage
from sbertray.config import StorageConfig


def test_redact_and_join():
    assert storage.redact("s3://key:secret@bucket/x") == "s3://bucket/x"
    assert storage.join("s3://b/p/", "a", "/c.parquet") == "s3://b/p/a/c.parquet"
    assert storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x")
    assert not storage.is_local("s3://b/x")


def test_local_write_is_atomic_and_move_commits(tmp_path):
    loc = storage.resolve(str(tmp_path / "a" / "b.json"))
    storage.write_bytes(loc, b"one")
    storage.write_bytes(loc, b"two")
    assert storage.read_bytes(loc) == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp files left
    dst = storage.resolve(str(tmp_path / "c" / "d.json"))
    storage.move(loc, dst)
    assert storage.read_bytes(dst) == b"two" and not storage.exists(loc)


def test_s3_round_trip_with_endpoint_from_config(s3_server, s3_prefix, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = StorageConfig(endpoint_url=s3_server.endpoint_url)
    loc = storage.resolve(f"{s3_prefix}/x/y.bin", cfg)
    storage.write_bytes(loc, b"payload")
    assert storage.read_bytes(loc) == b"payload"
    assert [
        i.path.rsplit("/", 1)[-1] for i in storage.list_files(storage.resolve(s3_prefix, cfg))
    ] == ["y.bin"]


def test_s3_briefly_unavailable_is_ridden_out(s3_server, s3_prefix):
    """A frozen endpoint (SIGSTOP) for a few seconds: the request waits/retries and succeeds."""
    loc = storage.resolve(f"{s3_prefix}/slow.bin")
    s3_server.pause()
    resumer = threading.Timer(3.0, s3_server.resume)
    resumer.start()
    started = time.time()
    try:
        storage.write_bytes(loc, b"late but whole")
    finally:
        resumer.join()
        s3_server.resume()
    assert time.time() - started >= 2.5
    assert storage.read_bytes(loc) == b"late but whole"


def test_s3_endpoint_down_is_a_clear_error():
    loc = storage.resolve("s3://bucket/key", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(storage.StorageError, match="could not write s3://bucket/key"):
        storage.write_bytes(loc, b"x")


def test_secret_overrides_and_urls_are_redacted():
    assert storage.redact_arg("storage.api_token=t0ps3cret") == "storage.api_token=***"
    assert storage.redact_arg("compute.token_budget=512") == "compute.token_budget=512"
    assert storage.redact_arg("model=s3://me:pw@bucket/m") == "model=s3://bucket/m"
    dump = {
        "storage": {"endpoint_url": "http://k:s@h:1"},
        "db_password": "x",
        "ids": ["s3://a:b@c"],
    }
    assert storage.redact_value(dump) == {
        "storage": {"endpoint_url": "http://h:1"},
        "db_password": "***",
        "ids": ["s3://c"],
    }


@pytest.mark.slow
def test_credentials_in_the_endpoint_never_reach_outputs_or_logs(s3_server, s3_prefix, tmp_path):
    """The only copy of the S3 secret is in an override URL: the embed run works with it and
    no file it writes, no line it prints and no Ray log of its session holds it."""
    import glob
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from local_s3 import ACCESS_KEY, SECRET_KEY

    fs, prefix = s3_server.filesystem(), s3_prefix[len("s3://") :]
    with fs.open_output_stream(f"{prefix}/in/a.parquet") as f:
        pq.write_table(pa.table({"id": [1, 2], "text": ["one", "two"]}), f)
    config = tmp_path / "embed.yaml"
    config.write_text(  # on Ray (not in-process, as 2 rows would be): its logs are checked too
        f"input: {{path: {s3_prefix}/in}}\noutput: {{path: {s3_prefix}/out}}\n"
        "compute: {executor: ray}\n"
    )
    endpoint = s3_server.endpoint_url.replace("://", f"://{ACCESS_KEY}:{SECRET_KEY}@")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env["SBERTRAY_RAY_NUM_CPUS"] = "2"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sbertray",
            "embed",
            str(config),
            f"storage.endpoint_url={endpoint}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert SECRET_KEY not in out + err
    written = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/out", recursive=True))
        if i.type == pafs.FileType.File
    ]
    assert any(p.endswith(".parquet") for p in written) and any("_manifest" in p for p in written)
    for path in written:
        with fs.open_input_stream(path) as f:
            assert SECRET_KEY.encode() not in f.read(), path
    logs = [p for p in glob.glob(f"/tmp/ray/session_*_{proc.pid}/logs/**", recursive=True)]
    assert logs, "the run's Ray session logs were not found"
    for path in logs:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert SECRET_KEY.encode() not in f.read(), path
