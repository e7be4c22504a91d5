"""Two Ray nodes on one machine (cluster_utils.Cluster): workers spread one per node."""
from __future__ import annotations

import pytest
import torch

import distopt
from distopt import FailureConfig, RunConfig, ScalingConfig
from distopt.optim import adam
from trainer_task import loss, make_data, make_model
from cluster_nodes import two_node_cluster, unplug_after


def _fit(placement="PACK"):
    trainer = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                              global_batch_size=16, zero_stage=2, seed=0,
                              scaling=ScalingConfig(num_workers=2, placement_strategy=placement),
                              failure=FailureConfig(collective_timeout_s=20), run=RunConfig(log_every=0))
    return trainer.fit(steps=10)


@pytest.fixture(scope="module")
def single_node_result(ray_cluster):
    return _fit()


@pytest.fixture(scope="module")
def two_nodes(single_node_result):
    yield from two_node_cluster(1)


def test_spread_over_two_nodes_gives_the_single_node_weights(two_nodes, single_node_result):
    spread = _fit(placement="STRICT_SPREAD")
    assert spread.summary["nodes"] == 2
    assert single_node_result.summary["nodes"] == 1
    for name, value in single_node_result.state_dict.items():
        torch.testing.assert_close(spread.state_dict[name], value, rtol=0, atol=0)


def _slow_loss(model, batch):
    import time
    time.sleep(0.15)  # gives the test time to pull a node out mid-run
    return loss(model, batch)


def _slow_while(marker: str, model, batch):
    """``_slow_loss`` while the file ``marker`` exists: the test deletes it once it has seen
    what it waits for, and the run's last steps go at full speed."""
    import os
    return _slow_loss(model, batch) if os.path.exists(marker) else loss(model, batch)


def test_node_removed_mid_run_shrinks_and_finishes(two_nodes, single_node_result, tmp_path):
    """Runs last in this module: it leaves the cluster with one node."""
    import json

    out = tmp_path / "run"
    unplug_after(two_nodes, two_nodes.list_all_nodes()[1], out / "metrics.jsonl")
    trainer = distopt.Trainer(model=make_model, loss=_slow_loss, data=make_data(), optimizer=adam(1e-2),
                              global_batch_size=16, zero_stage=2, seed=0,
                              scaling=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD"),
                              failure=FailureConfig(collective_timeout_s=5, replace_timeout_s=5),
                              run=RunConfig(out_dir=str(out), log_every=0))
    result = trainer.fit(steps=10)
    (failure,) = result.failures
    assert failure["action"] == "shrink" and failure["world_size"] == 1
    assert [h["step"] for h in result.history] == list(range(1, 11))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))
    for name, value in single_node_result.state_dict.items():  # same math; summation order may differ
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-6)


def test_after_a_shrink_the_group_grows_back_when_a_node_returns(two_nodes, tmp_path):
    """Runs after the removal test: it adds the nodes it needs and leaves two. The fit runs
    in a thread, since cluster_utils changes nodes from the main thread only."""
    import functools
    import json
    import threading
    import time

    steps = 160  # while slow, room for a node start, the bundle's rescheduling and an actor start
    reference = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                                global_batch_size=16, zero_stage=2, seed=0,
                                scaling=ScalingConfig(num_workers=2, ray_address="local"),
                                run=RunConfig(log_every=0)).fit(steps=steps)
    while len(two_nodes.list_all_nodes()) < 2:
        two_nodes.add_node(num_cpus=1)
    two_nodes.wait_for_nodes()
    out, slow = tmp_path / "run", tmp_path / "slow"
    slow.touch()
    trainer = distopt.Trainer(model=make_model, loss=functools.partial(_slow_while, str(slow)), data=make_data(),
                              optimizer=adam(1e-2), global_batch_size=16, zero_stage=2, seed=0,
                              scaling=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD"),
                              failure=FailureConfig(collective_timeout_s=5, replace_timeout_s=5),
                              run=RunConfig(out_dir=str(out), log_every=0))
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit(steps=steps)
        except BaseException as e:  # re-raised below, in the test's thread
            outcome["error"] = e

    def lines() -> list[dict]:
        path = out / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def wait_for(cond, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not cond() and time.monotonic() < deadline and runner.is_alive():
            time.sleep(0.05)

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    wait_for(lambda: len(lines()) >= 3, 120)
    two_nodes.remove_node(two_nodes.list_all_nodes()[1], allow_graceful=False)
    wait_for(lambda: any(e["world_size"] == 1 for e in lines()), 60)
    two_nodes.add_node(num_cpus=1)

    def grown() -> bool:
        sizes = [e["world_size"] for e in lines()]
        return 1 in sizes and sizes[-1] == 2
    wait_for(grown, 240)
    slow.unlink()  # the steps left need not wait for anything
    runner.join(timeout=240)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    (failure,) = result.failures
    assert failure["action"] == "shrink" and failure["world_size"] == 1
    (growth,) = result.growths
    assert growth["world_size"] == 2
    print(f"shrunk before step {failure['step']}, grew back before step {growth['step']} in {growth['restore_s']:.2f}s")
    sizes = [h["world_size"] for h in result.history]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    for name, value in reference.state_dict.items():  # same math; summation order may differ
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-4, atol=1e-5)
