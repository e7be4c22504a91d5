"""Two Ray nodes on one machine (cluster_utils.Cluster): workers spread one per node."""
from __future__ import annotations

import pytest
import torch

import distopt
from conftest import RAY_ENV, init_local_ray
from distopt.optim import adam
from trainer_task import loss, make_data, make_model


def _fit(**kw):
    trainer = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                              global_batch_size=16, num_workers=2, zero_stage=2, seed=0, log_every=0,
                              collective_timeout_s=20, **kw)
    return trainer.fit(steps=10)


@pytest.fixture(scope="module")
def single_node_result(ray_cluster):
    return _fit()


@pytest.fixture(scope="module")
def two_nodes(single_node_result):
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=RAY_ENV, configure_logging=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    init_local_ray()  # later tests expect the session's cluster


def test_spread_over_two_nodes_gives_the_single_node_weights(two_nodes, single_node_result):
    spread = _fit(placement_strategy="STRICT_SPREAD")
    assert spread.summary["nodes"] == 2
    assert single_node_result.summary["nodes"] == 1
    for name, value in single_node_result.state_dict.items():
        torch.testing.assert_close(spread.state_dict[name], value, rtol=0, atol=0)
