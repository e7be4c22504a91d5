"""Two Ray nodes on one machine with two workers each: a lost node takes two ranks at once."""
from __future__ import annotations

import pytest
import torch

import distopt
from distopt.optim import adam
from trainer_task import loss, make_data, make_model
from cluster_nodes import two_node_cluster, unplug_after


@pytest.fixture(scope="module")
def packed_nodes(ray_cluster):
    yield from two_node_cluster(2)


def _slow_loss(model, batch):
    import time
    time.sleep(0.15)  # gives the test time to pull a node out mid-run
    return loss(model, batch)


def test_node_with_two_ranks_lost_recovers_from_memory(packed_nodes, tmp_path):
    """Each replica sits on the other node, so losing a node (two ranks, whichever they
    are) loses no shard together with its replica: no checkpoint is needed to go on."""
    import json

    reference = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                                global_batch_size=16, zero_stage=1, seed=0,
                                scaling=distopt.ScalingConfig(num_workers=4, ray_address="local"),
                                run=distopt.RunConfig(log_every=0)).fit(steps=10)
    out = tmp_path / "run"
    unplug_after(packed_nodes, packed_nodes.list_all_nodes()[1], out / "metrics.jsonl", within_s=180)
    trainer = distopt.Trainer(model=make_model, loss=_slow_loss, data=make_data(), optimizer=adam(1e-2),
                              global_batch_size=16, zero_stage=1, seed=0,
                              scaling=distopt.ScalingConfig(num_workers=4, placement_strategy="PACK"),
                              failure=distopt.FailureConfig(collective_timeout_s=10, replace_timeout_s=5),
                              run=distopt.RunConfig(out_dir=str(out), log_every=0))  # no checkpoints: memory only
    result = trainer.fit(steps=10)
    assert len(result.failures) == 2, result.failures
    assert len({f["node"] for f in result.failures}) == 1  # both on the node that went
    for f in result.failures:
        assert f["action"] == "shrink" and f["world_size"] == 2, f
    assert [h["step"] for h in result.history] == list(range(1, 11))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))
    for name, value in reference.state_dict.items():  # same math; summation order may differ
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-6)
