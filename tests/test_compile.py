"""torch.compile: a compiled model trains to the eager weights (fp32 tolerance), and the
bucket reductions still start from the gradient hooks during backward."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import distopt
from distopt.optim import ShardedOptimizer, adam
from launch import gpt

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels: ~10 s warm, minutes with a cold cache on a busy machine
TINY = gpt.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)


def _batch(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, gpt.VOCAB, (n, TINY.block_size + 1), generator=g)
    return [idx[:, :-1], idx[:, 1:]]


def _train(comm, compiled: bool, steps: int = 3) -> tuple[dict, list[int]]:
    torch.manual_seed(0)
    model = gpt.GPT(TINY)
    if compiled:
        model.compile()
    # Small buckets: several reductions, each started by the hook of its last gradient.
    opt = ShardedOptimizer(model.named_parameters(), adam(1e-2), comm, zero_stage=1, bucket_bytes=4096,
                           last_bucket_bytes=1024)
    launched = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            gpt.loss(model, _batch()).backward()
            launched.append(opt.reducer.next)  # buckets whose reduction backward started
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, launched + [len(opt.reducer.order)]
    finally:
        opt.close()


def test_compiled_matches_eager_and_reduces_during_backward(groups):
    comm = groups(1)[0]
    eager, _ = _train(comm, compiled=False)
    before = counters["stats"]["unique_graphs"]
    compiled, launched = _train(comm, compiled=True)
    assert counters["stats"]["unique_graphs"] > before  # dynamo did compile the model
    *per_step, buckets = launched
    assert buckets > 2 and per_step == [buckets] * len(per_step)  # every bucket started inside backward
    assert compiled.keys() == eager.keys()  # the model's own names, no _orig_mod prefix
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_compile_trains_to_the_eager_weights():
    data = gpt.ByteWindows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2),
                                         dtype=torch.uint8), TINY.block_size)

    def fit(compile: bool) -> dict:
        trainer = distopt.Trainer(model=gpt.ModelFactory(TINY), loss=gpt.loss, data=data, optimizer=adam(1e-2),
                                  global_batch_size=8, compile=compile,
                                  scaling=distopt.ScalingConfig(num_workers=1, ray_address="local"),
                                  failure=distopt.FailureConfig(max_failures=0), run=distopt.RunConfig(log_every=0))
        return trainer.fit(steps=3).state_dict

    eager = fit(False)
    before = counters["stats"]["unique_graphs"]
    compiled = fit(True)
    assert counters["stats"]["unique_graphs"] > before
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="compile='yes' must be True or False"):
        distopt.Trainer(model=gpt.ModelFactory(TINY), loss=gpt.loss, data=gpt.ByteWindows(
            torch.zeros(100, dtype=torch.uint8), 16), optimizer=adam(1e-2), global_batch_size=2, compile="yes")
