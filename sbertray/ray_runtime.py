"""Connecting to Ray the same way in every job: the cluster named by ``--address`` or
``$RAY_ADDRESS`` (set by ``ray job submit``), else a local Ray on this machine."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Caps a local Ray's CPUs (tests, laptops shared with other work); unset: all cores.
NUM_CPUS_ENV = "SBERTRAY_RAY_NUM_CPUS"


# Ray's "single machine" switch (named for macOS/Windows laptops): a local Ray then binds and
# talks over 127.0.0.1 instead of the machine's network address. Read when `ray` is imported.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# The GCS address of the local Ray `init_ray` started without a dashboard, if any.
_local_ray_without_dashboard: str | None = None


def ray_running() -> bool:
    """Whether this process has started or joined Ray. Ray is not imported to ask: a run
    without it would pay half a second for a "no"."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def prefer_loopback(address: str | None = None) -> None:
    """Keeps a local Ray on loopback; call before `ray` is imported. No effect when joining a
    cluster (``address``/``$RAY_ADDRESS``), which needs the node's real address."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(_LOCAL_ONLY_ENV, "0")


def init_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Joins ``address`` (or ``$RAY_ADDRESS``), else starts a local Ray of this process's own;
    ``dashboard``: with the dashboard (on loopback), whose State API Ray Train's placement-group
    cleaner needs to free the CPUs of a run whose controller was killed (a trial Tune stops)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    global _local_ray_without_dashboard
    num_cpus = os.environ.get(NUM_CPUS_ENV)
    ray.init(
        # A Ray of its own: without an address, Ray would join any cluster `ray start` left on
        # this machine (and refuse `num_cpus` there); a cluster is named with --address.
        address="local",
        num_cpus=int(num_cpus) if num_cpus else None,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        # Ray's start-up banners and notices only with `--verbose`: sbertray says what it does.
        logging_level=logging.DEBUG
        if logging.getLogger().isEnabledFor(logging.DEBUG)
        else logging.ERROR,
        # Workers must never reach for the Hugging Face hub mid-job; models are resolved
        # (and downloaded from object storage if needed) by sbertray itself.
        runtime_env={
            "env_vars": {
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "TOKENIZERS_PARALLELISM": "false",
                **({} if dashboard else {_API_SERVER_ENV: _NO_API_SERVER}),
            },
            "worker_process_setup_hook": f"{__name__}.{set_up_local_worker.__name__}",
        },
    )
    _local_ray_without_dashboard = None if dashboard else ray.get_runtime_context().gcs_address


def in_local_ray_without_dashboard() -> bool:
    """Whether this process is on the local Ray that `init_ray` started without a dashboard,
    where Ray Train's placement-group cleaner has nothing to do (see `set_up_local_worker`)."""
    import ray

    return (
        ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _local_ray_without_dashboard
    )


# Without a dashboard, Ray still names http://127.0.0.1:8265 as this Ray's API server, and the
# State API in its workers asks whatever else listens there: another Ray's dashboard on the
# machine. Ray Train's placement-group cleaner did, found no controller of its run there, and
# removed a live run's placement group. Its workers get a closed port instead: the cleaner's
# query fails and it goes on waiting (its job is moot here: this Ray ends with the driver).
_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_NO_API_SERVER = "http://127.0.0.1:1"


# Ray Train's placement-group cleaner asks the State API, served by the dashboard, whether the
# run's controller is alive, and warns once a second when it cannot.
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def set_up_local_worker() -> None:
    """Runs in each worker of the local Ray that `init_ray` starts.

    - Ray's State API, called in workers (Ray Train's placement-group cleaner), finds its Ray by
      ``$RAY_ADDRESS`` or else refuses to choose when another Ray runs on the machine (a test
      session's, another job's): it is pointed at this one. That is all it needs with a
      dashboard; without one, Ray would still send it to 127.0.0.1:8265, so `init_ray` names
      a closed API server for the workers (``_NO_API_SERVER``).
    - Without the dashboard (the default: seconds of start-up and a process for nothing on a
      laptop) that cleaner can never reach the State API; its warning every second would bury
      sbertray's progress lines. Its job (freeing a dead controller's placement group) is moot
      there: the whole Ray ends with the driver. `sbertray tune`, whose trials are stopped
      mid-run, starts the dashboard.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


@contextmanager
def ray_train_settings(many_nodes: bool) -> Iterator[None]:
    """Ray Train's knobs for one run, set around ``fit()`` (Ray Train copies them from the
    driver's environment to its controller and workers); a value the user set is kept.

    - The controller polls its workers every 0.5 s, not 2 s: it notices the start and the end of
      training sooner, seconds on every run, for an RPC per worker per poll.
    - On one node with no autoscaler, no preemption watcher (an actor, so a process to start):
      the only node that could be drained is the one the whole run lives on.
    """
    settings = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    if not many_nodes:
        settings["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _node_groups() -> list:
    """The autoscaler's node types (resources, max count), where Ray reports them."""
    try:
        from ray._private.state import state

        cluster = state.get_cluster_config()
    except Exception:  # a private API (Ray Train reads it too): without it, nodes now decide
        return []
    return list(cluster.node_group_configs) if cluster is not None else []


def spans_many_nodes() -> bool:
    """Whether the Ray cluster this process joined has more than one node, or an autoscaler
    whose node types may add more."""
    import ray

    if sum(1 for node in ray.nodes() if node["Alive"]) > 1:
        return True
    counts = [group.max_count for group in _node_groups()]
    return -1 in counts or sum(counts) > 1


def autoscaling_limits() -> dict[str, float] | None:
    """The most of each resource the autoscaler may grow the cluster to (node types x their
    max count), where Ray reports it; Ray Train and Ray Data size themselves from it too."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: without it, pools size themselves from what is there
        return None


def cpus_per_gpu() -> float | None:
    """The fewest CPUs per GPU among the GPU nodes that are up, or else among the GPU node types
    the autoscaler may add; None where no GPU node is known."""
    import ray

    ratios = [
        node["Resources"].get("CPU", 0) / node["Resources"]["GPU"]
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("GPU")
    ] or [
        g.resources.get("CPU", 0) / g.resources["GPU"]
        for g in _node_groups()
        if g.resources.get("GPU") and g.max_count != 0
    ]
    return min(ratios) if ratios else None


def node_type_cpus() -> list[float]:
    """CPUs of each node type the autoscaler may add (empty where Ray does not say)."""
    return [float(g.resources.get("CPU", 0)) for g in _node_groups() if g.max_count != 0]
