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


def test_gpu_nodes_cpus_feed_several_actors_per_gpu():
    """Where the GPU nodes' CPUs per GPU are known, each GPU is shared by an actor per CPU (at
    most 16), so the CPU side keeps up with the GPU."""
    fed = plan_pool({"CPU": 72.0, "GPU": 4.0}, ComputeConfig(), 100, cpus_per_gpu=16.0)
    assert (fed.num_actors, fed.gpus_per_actor, fed.cpus_per_actor, fed.threads) == (
        64,
        0.0625,
        1.0,
        1,
    )
    assert fed.min_actors == 64  # all placeable now
    assert "64 cuda actor(s), 1 CPU + 0.0625 GPU each" in fed.describe()
    # 96 CPUs per GPU still make 16 actors, with 6 CPUs each (tokenizing in 6 processes).
    wide = plan_pool({"CPU": 96.0, "GPU": 1.0}, ComputeConfig(), 100, cpus_per_gpu=96.0)
    assert (wide.num_actors, wide.gpus_per_actor, wide.cpus_per_actor) == (16, 0.0625, 6.0)
    # Fewer units than actors: no idle actors.
    assert (
        plan_pool({"CPU": 72.0, "GPU": 4.0}, ComputeConfig(), 5, cpus_per_gpu=16.0).num_actors == 5
    )
    # The config decides where it says.
    pinned = ComputeConfig(cpus_per_actor=2)
    assert plan_pool({"CPU": 72.0, "GPU": 4.0}, pinned, 100, cpus_per_gpu=16.0).threads == 2
    one = plan_pool(
        {"CPU": 72.0, "GPU": 4.0}, ComputeConfig(actors_per_gpu=1), 100, cpus_per_gpu=16.0
    )
    assert (one.num_actors, one.gpus_per_actor, one.cpus_per_actor) == (4, 1.0, 16.0)
    with pytest.raises(PoolSizeError, match=r"2 GPUs x 4 actor\(s\) each"):
        plan_pool({"CPU": 32.0, "GPU": 2.0}, ComputeConfig(num_actors=9, actors_per_gpu=4), 100)


def test_pool_that_cannot_fit_is_refused_instead_of_hanging():
    with pytest.raises(PoolSizeError, match=r"3 actors x 1 CPUs = 3 CPUs, but the cluster has 2"):
        plan_pool({"CPU": 2.0}, ComputeConfig(num_actors=3), num_units=8)
    with pytest.raises(PoolSizeError, match="reports no GPUs, and no node type"):
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


def test_a_cold_cluster_starts_one_actor_and_grows_to_what_its_node_types_allow():
    cold = plan_pool({"CPU": 0.0}, ComputeConfig(), num_units=8, limits={"CPU": 2.0})
    assert (cold.min_actors, cold.num_actors, cold.cpus_per_actor, cold.autoscaling) == (
        1,
        2,
        1.0,
        True,
    )
    assert cold.describe().startswith("1-2 (autoscaling) cpu actor(s)")
    # Warm, and the autoscaler may add 6 more CPUs: start with what is there, grow to 8.
    warm = plan_pool({"CPU": 2.0}, ComputeConfig(), num_units=20, limits={"CPU": 8.0})
    assert (warm.min_actors, warm.num_actors) == (2, 8)
    bounded = ComputeConfig(min_actors=2, max_actors=3)
    assert plan_pool({"CPU": 0.0}, bounded, 20, {"CPU": 8.0}).min_actors == 2
    assert plan_pool({"CPU": 0.0}, bounded, 20, {"CPU": 8.0}).num_actors == 3
    # The autoscaler does not say what it can add: ask for one actor, grow with the units.
    unknown = plan_pool({"CPU": 0.0}, ComputeConfig(), num_units=5)
    assert (unknown.min_actors, unknown.num_actors, unknown.device) == (1, 5, "cpu")
    gpus = plan_pool({"CPU": 0.0}, ComputeConfig(), 8, limits={"CPU": 16.0, "GPU": 2.0})
    assert (gpus.device, gpus.min_actors, gpus.num_actors) == ("cuda", 1, 2)
    assert plan_pool({"CPU": 0.0}, ComputeConfig(device="cuda"), 8).device == "cuda"


def test_a_pool_no_node_type_can_hold_is_refused():
    with pytest.raises(PoolSizeError, match="no node type its autoscaler can add has any"):
        plan_pool({"CPU": 0.0}, ComputeConfig(), num_units=8, limits={"memory": 1e9})
    with pytest.raises(PoolSizeError, match="no node type its autoscaler can add has any"):
        plan_pool({"CPU": 4.0}, ComputeConfig(device="cuda"), 8, limits={"CPU": 8.0})
    with pytest.raises(ValueError, match="not both"):
        ComputeConfig(num_actors=2, max_actors=4)
