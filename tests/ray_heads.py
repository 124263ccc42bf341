"""Real Ray heads for `ray job submit` tests: `ray start --head` on loopback with explicit free
ports and a temp dir of its own, stopped by killing exactly the processes it started (those
carrying its temp dir or its GCS address), never by a machine-wide `ray stop`.

With ``autoscaling`` (Ray's fake multi-node provider, ``RAY_FAKE_CLUSTER=1``), the head's
autoscaler launches worker "nodes" as local Ray nodes, as a cloud provider would launch
machines: a real autoscaling cluster on one machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker_port_range(size: int = 100) -> tuple[int, int]:
    """``size`` free ports in a row below the kernel's ephemeral range, where the free ports
    above (the kernel's picks) can never land: a picked port inside the worker range makes
    `ray start` refuse to run."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = 10000 + (os.getpid() % 100) * size
    while start + size <= ephemeral_low:
        with contextlib.ExitStack() as held:
            try:
                for port in range(start, start + size):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                start += size
                continue
        return start, start + size - 1
    raise RuntimeError(f"no {size} free ports in a row below {ephemeral_low}")


def fake_autoscaling_config(gcs_port: int, worker_types: dict) -> dict:
    """A fake multi-node autoscaler config (the pip wheel lacks Ray's example.yaml): a head
    without CPUs, and ``worker_types`` (name -> resources, min/max workers)."""
    return {
        "cluster_name": f"sbertray-test-{gcs_port}",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, **spec} for name, spec in worker_types.items()},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class RayHead:
    """A head node for the duration of a test; ``start()`` returns the dashboard (job) URL."""

    def __init__(
        self, num_cpus: int, *, env: dict[str, str], worker_types: dict | None = None
    ) -> None:
        self.num_cpus, self.env, self.worker_types = num_cpus, env, worker_types
        self.temp_dir = f"/tmp/sbr-{uuid.uuid4().hex[:8]}"
        self.ports = free_ports(9)

    def start(self) -> str:
        gcs, dashboard, client, node_mgr, obj_mgr, agent_http, agent_grpc, metrics, rt_env = (
            self.ports
        )
        low, high = worker_port_range()
        cmd = [
            RAY,
            "start",
            "--head",
            f"--num-cpus={self.num_cpus}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
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
            f"--max-worker-port={high}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        # Job entrypoints run `python` from the head's PATH: make that this environment's
        # python, as a cluster's setup commands would.
        # Every process of the head (and of fake nodes) on 127.0.0.1, none on the machine's
        # other addresses.
        env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            **self.env,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        if self.worker_types is not None:
            Path(self.temp_dir).mkdir(parents=True)
            config = Path(self.temp_dir) / "autoscaling.json"
            config.write_text(json.dumps(fake_autoscaling_config(gcs, self.worker_types)))
            cmd.append(f"--autoscaling-config={config}")
            # Fake nodes are local Ray nodes, checked every second.
            env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if started.returncode:
            self.stop()
            raise RuntimeError(started.stdout + started.stderr)
        return f"http://127.0.0.1:{dashboard}"

    def stop(self) -> None:
        import psutil

        markers = (self.temp_dir, f"127.0.0.1:{self.ports[0]}")
        procs = set()
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if any(marker in cmdline for marker in markers):
                # Ray's workers rename themselves (`ray::...`): found as their raylet's children.
                procs |= {p, *_children(p)}
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(list(procs), timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
