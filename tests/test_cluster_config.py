"""cluster.yaml is a config `ray up` accepts, and its node types fit the embed pool sizing."""

import copy
from pathlib import Path

import yaml

from sbertray.config import ComputeConfig
from sbertray.embed.pool import plan_pool

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_own_validator():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(fillout_defaults(copy.deepcopy(config)))  # raises on any schema error
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] >= 1
    assert any("pip install -e ~/sbertray" in c for c in config["setup_commands"])
    # Every node reaches S3 through an instance profile, never keys on disk.
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()} == {
        "sbertray-s3"
    }


def test_pool_sizing_on_the_cluster_node_types():
    # Head with CPU 0 + 4 x g5.2xlarge (8 CPU, 1 GPU): 8 bf16 GPU actors per GPU, 1 CPU each.
    gpu = plan_pool({"CPU": 32.0, "GPU": 4.0}, ComputeConfig(), num_units=500, cpus_per_gpu=8.0)
    assert (gpu.num_actors, gpu.device, gpu.gpus_per_actor, gpu.cpus_per_actor) == (
        32,
        "cuda",
        0.125,
        1.0,
    )
    # 2 x c7i.4xlarge (16 CPU each) and no GPU nodes up: CPU actors, one CPU each.
    cpu = plan_pool({"CPU": 32.0}, ComputeConfig(), num_units=500)
    assert (cpu.num_actors, cpu.cpus_per_actor, cpu.device) == (32, 1.0, "cpu")
