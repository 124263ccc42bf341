"""Cluster scenarios on real multi-node Ray on this machine (``ray.cluster_utils.Cluster``: one
process tree per node, each node with its own resources and environment), run as a script so
that the test session's own Ray is untouched. Prints one JSON line of what it saw.

    python tests/multinode.py WORKDIR MODEL_URL

MODEL_URL: the model in object storage (the S3 endpoint and credentials in the environment).

1. A cold cluster (head without CPUs, no worker node, no autoscaler): the pool waits a bounded
   time for its first actor, then fails with a clear error.
2. Two 1-CPU worker nodes join. A local output path is refused before anything is written.
3. The same run into a folder declared shared (`storage.shared_paths`; on one machine every
   "node" sees it): one worker node is removed mid-run, and the run still completes. Each
   worker node has its own model cache (`SBERTRAY_CACHE`): each downloads the model itself.
4. A node joins again; the next night, rows shuffled and a few texts edited, copies the other
   vectors through the donor join's Ray tasks on both nodes.
5. Fine-tuning on pairs in object storage with `scaling.max_failures: 1` loses the node its
   worker runs on after the first checkpoint, and goes on from that checkpoint on the other
   node, streaming the shards the driver prepared in the shared folder.
6. A node with 2 CPUs and 1 (declared) GPU joins: the pool plans two GPU actors of 1 CPU
   sharing the GPU, and Ray places both at once on it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from sbertray import storage
from sbertray.config import ComputeConfig, EmbedConfig, parse_config
from sbertray.embed.pool import plan_pool
from sbertray.embed.run import run_embed
from sbertray.errors import UserError
from sbertray.ray_runtime import cpus_per_gpu

UNITS, ROWS = 12, 100
STSB_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "train.tsv"


def _config(work: Path, out: Path, model: str, **compute) -> EmbedConfig:
    # Torch: the CPU default (OpenVINO) exports the model on every node first, 20 s of a 1-CPU
    # node's time and most of these scenarios'; the backends have tests of their own.
    return parse_config(
        EmbedConfig,
        {
            "model": model,
            "input": {"path": str(work / "in"), "id_column": "id"},
            "output": {"path": str(out), "rows_per_file": ROWS},
            "compute": {"backend": "torch", "precision": "fp32", "executor": "ray", **compute},
            "storage": {"shared_paths": [str(work / "shared")]},
        },
    )


def _wait_until_dead(node_id: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(
        n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()
    ):
        time.sleep(0.5)


def _embedding_on(node_id: str) -> bool:
    """Whether an embedding actor on the node is running a unit (Ray Data's ``MapWorker``)."""
    running = list_tasks(
        filters=[("node_id", "=", node_id), ("state", "=", "RUNNING"), ("type", "=", "ACTOR_TASK")],
        raise_on_missing_output=False,
    )
    return any("MapWorker" in task.name for task in running)


def _error(call) -> str | None:
    try:
        call()
    except UserError as exc:
        return str(exc)
    return None


def _train_losing_a_node(cluster: Cluster, work: Path, model: str) -> dict:
    from ray.util.state import list_actors

    from sbertray.config import TrainConfig
    from sbertray.train import checkpoints
    from sbertray.train.run import train

    # The pairs in object storage, beside the model: read by the driver's prepare step, which
    # writes the shards the worker streams under the shared checkpoint root.
    pairs = [line.split("\t") for line in STSB_TRAIN.read_text().splitlines()[1:321]]
    pairs_url = f"{model.rsplit('/', 1)[0]}/pairs.parquet"
    table = pa.table({k: [p[i] for p in pairs] for k, i in (("a", 0), ("b", 1), ("score", 2))})
    loc = storage.resolve(pairs_url)
    with loc.fs.open_output_stream(loc.path) as f:
        pq.write_table(table, f)
    out = work / "shared" / "model"
    config = parse_config(
        TrainConfig,
        {
            "name": "node-loss",
            "base_model": model,
            "train": {
                "path": pairs_url,
                "columns": {"sentence_0": "a", "sentence_1": "b", "label": "score"},
                "label_scale": 0.2,
            },
            "training": {
                "batch_size": 16,
                "max_steps": 16,
                "checkpoint_steps": 4,
                "max_seq_length": 64,
                "eval_every": "end",
            },
            "scaling": {"num_workers": 1, "max_failures": 1},
            "output": {"model": str(out)},
            "storage": {"shared_paths": [str(work / "shared")]},
        },
    )
    result: dict = {}

    def run() -> None:
        try:
            result["train"] = train(config)
        except Exception as exc:  # reported, not raised: the main thread asserts
            result["error"] = repr(exc)

    runner = threading.Thread(target=run)
    runner.start()
    ckpts = Path(config.output.checkpoint_root)
    while not list(ckpts.glob(f"*/checkpoint-*/{checkpoints.MARKER}")) and runner.is_alive():
        time.sleep(0.2)
    seen = {
        "checkpoints_before_loss": len(list(ckpts.glob(f"*/checkpoint-*/{checkpoints.MARKER}")))
    }
    (worker,) = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == worker.node_id))
    runner.join(timeout=600)
    seen["error"] = result.get("error")
    if "train" in result:
        seen["global_step"] = result["train"].global_step
        seen["resumed_from_step"] = result["train"].resumed_from_step
    return seen


def main(work: Path, model: str) -> None:
    (work / "in").mkdir(parents=True)
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(UNITS * ROWS)]
    pq.write_table(
        pa.table({"id": range(len(texts)), "text": texts}),
        work / "in" / "data.parquet",
        row_group_size=ROWS,
    )
    seen: dict = {}
    # Ray notices a lost node after 5 missed health checks: every second here, not every 3 s
    # (the default), so the scenarios that lose one do not wait ~15 s for Ray to know.
    health_checks = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": health_checks},
    )
    try:
        # The State API, here and in the cluster's workers (Ray Train's placement-group
        # cleaner), asks this cluster, not another Ray on the machine (a pytest worker's
        # `ray start` head, which made itself the machine's default).
        os.environ["RAY_ADDRESS"] = cluster.address
        ray.init(
            address=cluster.address, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}}
        )
        started = time.time()
        seen["cold_error"] = _error(
            lambda: run_embed(_config(work, work / "shared" / "cold", model, placement_timeout_s=5))
        )
        seen["cold_seconds"] = round(time.time() - started, 1)

        nodes = [
            cluster.add_node(num_cpus=1, env_vars={"SBERTRAY_CACHE": str(work / f"cache-{i}")})
            for i in range(2)
        ]
        local = work / "local-out"
        seen["local_error"] = _error(lambda: run_embed(_config(work, local, model)))
        seen["local_created"] = local.exists()

        out = work / "shared" / "out"
        result: dict = {}

        def embed() -> None:
            try:
                result["summary"] = run_embed(_config(work, out, model))
            except Exception as exc:  # reported, not raised: the main thread asserts
                result["error"] = repr(exc)

        # All nodes share 127.0.0.1, so the driver may have attached to either worker node:
        # the other one is lost.
        driver_node = ray._private.worker.global_worker.node._raylet_socket_name
        lost = next(n for n in nodes if n._raylet_socket_name != driver_node)
        runner = threading.Thread(target=embed)
        started = time.time()
        runner.start()
        # Lost with a unit in flight: its actor may still be loading the model when two units
        # are committed, and a node lost then takes nothing with it.
        in_flight = False
        while runner.is_alive() and not in_flight:
            time.sleep(0.2)
            in_flight = len(list(out.glob("*.parquet"))) >= 2 and _embedding_on(lost.node_id)
        seen["unit_in_flight_on_lost_node"] = in_flight
        seen["committed_before_loss"] = len(list(out.glob("*.parquet")))
        cluster.remove_node(lost, allow_graceful=False)
        runner.join(timeout=600)
        seen["node_loss_seconds"] = round(time.time() - started, 1)
        seen["node_loss_error"] = result.get("error")
        if "summary" in result:
            ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
            seen["ids"] = [len(ids), len(set(ids)), min(ids), max(ids)]
            seen["temp_files"] = len(list(out.glob("_inprogress-*")))
            seen["success"] = (out / "_SUCCESS").exists()
            seen["output_rows"] = result["summary"].output_rows
            seen["retried_units"] = result["summary"].retried_units
            manifest = json.loads((out / "_manifest.json").read_text())
            seen["manifest_units_retried"] = manifest["totals"]["units_retried"]
            seen["model_hash"] = manifest["model"]["model_hash"]
        seen["node_models"] = [
            [
                (p.parent.name, p.read_text())
                for p in (work / f"cache-{i}").glob("models/*/.complete")
            ]
            for i in range(2)
        ]
        nodes = [n for n in nodes if n is not lost]
        # The next night starts once Ray knows the node is gone, as a real one would: a run
        # planned before that sized a fixed pool for the dead node's CPU too, then waited
        # `placement_timeout_s` for an actor nowhere to place.
        _wait_until_dead(lost.node_id)
        nodes.append(cluster.add_node(num_cpus=1, env_vars={"SBERTRAY_CACHE": str(work / "c2")}))
        seen["rerun"] = _rerun_by_join(work, out, model, texts)
        seen["train"] = _train_losing_a_node(cluster, work, model)
        # A GPU node joins (Ray takes its GPU as declared): an actor per CPU shares its GPU.
        cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        per_gpu = cpus_per_gpu()
        plan = plan_pool(ray.cluster_resources(), ComputeConfig(), 4, cpus_per_gpu=per_gpu)
        seen["gpu_node"] = [per_gpu, plan.device, plan.num_actors, plan.cpus_per_actor]
        seen["gpu_actors_placed"] = _place_gpu_actors(plan)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(seen))


def _rerun_by_join(work: Path, out: Path, model: str, texts: list[str]) -> list[int]:
    """The next night on two nodes: the input rewritten with rows shuffled and 60 texts edited,
    the donors joined to the units by Ray tasks on both nodes. Texts embedded, rows copied."""
    order = list(reversed(range(len(texts))))
    edited = [t + " (edited)" if i % 20 == 0 else t for i, t in enumerate(texts)]
    pq.write_table(
        pa.table({"id": order, "text": [edited[i] for i in order]}),
        work / "in" / "data.parquet",
        row_group_size=ROWS,
    )
    summary = run_embed(_config(work, out, model, reuse_index_max_mb=0))
    return [summary.texts_embedded, summary.reused_rows, summary.output_rows]


def _place_gpu_actors(plan) -> list[list[str]]:
    """The GPU devices that the actors of ``plan``, all at once, each see."""

    @ray.remote(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor)
    class Probe:
        def devices(self) -> list[str]:
            return [str(d) for d in ray.get_gpu_ids()]

    actors = [Probe.remote() for _ in range(plan.num_actors)]
    ready, _ = ray.wait([a.devices.remote() for a in actors], num_returns=len(actors), timeout=60)
    return [ray.get(r) for r in ready]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
