"""Pool sizing and device selection: pure logic, no cluster needed."""

import pytest

from sbertray.config import ComputeConfig
from sbertray.embed.pool import PoolSizeError, plan_pool


def test_two_cpu_laptop_gets_two_single_thread_actors():
    plan = plan_pool({"CPU": 2.0}, ComputeConfig(), num_units=8)
    assert (plan.num_actors, plan.cpus_per_actor, plan.threads, plan.device) == (
        2,
        1.0,
        1,
        "cpu",
    )


def test_fewer_units_than_cpus_gives_each_actor_more_threads():
    plan = plan_pool({"CPU": 8.0}, ComputeConfig(), num_units=2)
    assert (plan.num_actors, plan.cpus_per_actor, plan.threads) == (2, 4.0, 4)
    single = plan_pool({"CPU": 2.0}, ComputeConfig(), num_units=1)
    assert (single.num_actors, single.threads) == (1, 2)


def test_gpu_cluster_gets_one_actor_per_gpu():
    plan = plan_pool({"CPU": 16.0, "GPU": 4.0}, ComputeConfig(), num_units=100)
    assert (plan.num_actors, plan.gpus_per_actor, plan.cpus_per_actor, plan.device) == (
        4,
        1.0,
        1.0,
        "cuda",
    )
    assert plan_pool({"CPU": 16.0, "GPU": 4.0}, ComputeConfig(device="cpu"), 100).device == "cpu"


def test_pool_that_cannot_fit_is_refused_instead_of_hanging():
    with pytest.raises(PoolSizeError, match=r"3 actors x 1 CPUs = 3 CPUs, but the cluster has 2"):
        plan_pool({"CPU": 2.0}, ComputeConfig(num_actors=3), num_units=8)
    with pytest.raises(PoolSizeError, match="reports no GPUs"):
        plan_pool({"CPU": 2.0}, ComputeConfig(device="cuda"), num_units=8)
    with pytest.raises(
        PoolSizeError, match="`compute.num_actors: 8` GPU actors but the cluster has 2 GPUs"
    ):
        plan_pool({"CPU": 32.0, "GPU": 2.0}, ComputeConfig(num_actors=8), num_units=8)


def test_gpu_actors_overlap_units_and_cpu_only_backends_stay_on_cpu():
    gpu = plan_pool({"CPU": 16.0, "GPU": 2.0}, ComputeConfig(), num_units=10)
    assert (gpu.device, gpu.calls_per_actor) == ("cuda", 2)
    for compute in (ComputeConfig(backend="openvino"), ComputeConfig(precision="int8")):
        plan = plan_pool({"CPU": 16.0, "GPU": 2.0}, compute, num_units=10)
        assert (plan.device, plan.num_actors, plan.calls_per_actor) == ("cpu", 10, 1)
