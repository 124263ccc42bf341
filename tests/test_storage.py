import threading
import time

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
