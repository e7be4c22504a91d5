"""ShardedOptimizer as a torch optimizer: parameter groups, schedulers, mixed dtypes, frozen
and tied parameters, and the bytes it holds, each against torch.optim in one process."""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import run_ranks
from distopt.optim import ShardedOptimizer, adam, sgd
from distopt.optim.reducer import POOL

from odd_params import TiedModel

STEPS = 5
RULES = {  # distopt rule, the torch optimizer that must match it
    "adamw": (lambda: adam(1e-2, weight_decay=0.1, decoupled=True), torch.optim.AdamW, {}),
    "adam": (lambda: adam(1e-2, weight_decay=0.05), torch.optim.Adam, {"weight_decay": 0.05}),
    "sgd": (lambda: sgd(1e-2, momentum=0.9, nesterov=True), torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
}
SCHEDULES = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 1e-2], total_steps=STEPS + 1),
}


def _build():
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.LayerNorm(9), torch.nn.Linear(9, 3))


torch.manual_seed(0)
_INIT = _build().state_dict()  # built once: rank threads must not race on the global RNG


def _model():
    model = _build()
    model.load_state_dict(_INIT)
    return model


def _groups(model, wd=0.1):
    """The usual AdamW split: matrices decayed, biases and norms not, and at their own lr."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "lr": 5e-3}]


def _batch(k, r, n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 * k + r)
    return torch.randn(n, 5, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _distopt(comms, rule, stage, schedule=None, make_model=_model, bucket_bytes=96):
    def body(comm):
        model = make_model()
        opt = ShardedOptimizer(_groups(model), rule(), comm, zero_stage=stage, bucket_bytes=bucket_bytes)
        sched = SCHEDULES[schedule](opt) if schedule else None
        for k in range(STEPS):
            _loss(model, *_batch(k, comm.rank)).backward()
            opt.step()
            opt.zero_grad()
            if sched:
                sched.step()
        return model
    return run_ranks(comms, body)


def _torch(w, optimizer, kw, schedule=None, make_model=_model):
    """One process on the global batch: the mean over ranks' batches is the mean loss."""
    model = make_model()
    opt = optimizer(_groups(model, kw.pop("group_wd", 0.1)), lr=1e-2, **kw)
    sched = SCHEDULES[schedule](opt) if schedule else None
    for k in range(STEPS):
        xs, ys = zip(*[_batch(k, r) for r in range(w)])
        _loss(model, torch.cat(xs), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
    return model


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_groups_equal_torch_optim_with_the_same_groups(groups, w, stage, rule):
    make_rule, optimizer, kw = RULES[rule]
    got = _distopt(groups(w), make_rule, stage)
    want = _torch(w, optimizer, dict(kw))
    for model in got:
        for (name, p), q in zip(want.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    first = list(got[0].parameters())
    assert all(torch.equal(a, b) for m in got for a, b in zip(first, m.parameters())), "ranks disagree"


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("stage", [1, 2])
def test_torch_schedulers_drive_the_groups(groups, stage, schedule):
    got = _distopt(groups(2), RULES["adamw"][0], stage, schedule)
    want = _torch(2, torch.optim.AdamW, {}, schedule)
    for (name, p), q in zip(want.named_parameters(), got[0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_group_lr_is_live(groups):
    model = _model()
    opt = ShardedOptimizer(_groups(model), adam(1e-2), groups(1)[0])
    opt.param_groups[1]["lr"] = 0.0  # frozen by its learning rate from the next step on
    before = [p.detach().clone() for p in opt.param_groups[1]["params"]]
    _loss(model, *_batch(0, 0)).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[1]["params"]))
    assert not torch.equal(model[0].weight, _model()[0].weight)


def test_mixed_dtypes_each_match_torch(groups):
    def make():
        model = _model()
        model[1].double()  # a float64 norm between fp32 layers
        return model

    def forward(model, x, y):
        return _loss(model[2], model[1](model[0](x).double()).float(), y)

    def body(comm):
        model = make()
        opt = ShardedOptimizer(dict(model.named_parameters()), adam(1e-2, weight_decay=0.1, decoupled=True), comm,
                               zero_stage=2, bucket_bytes=96)
        assert len(opt.params_flat.segments) == 2  # one flat buffer per dtype
        for k in range(STEPS):
            forward(model, *_batch(k, comm.rank)).backward()
            opt.step()
            opt.zero_grad()
        return model
    got = run_ranks(groups(3), body)[0]
    want = make()
    ref = torch.optim.AdamW(want.parameters(), lr=1e-2, weight_decay=0.1)
    for k in range(STEPS):
        xs, ys = zip(*[_batch(k, r) for r in range(3)])
        forward(want, torch.cat(xs), torch.cat(ys)).backward()
        ref.step()
        ref.zero_grad()
    for (name, p), q in zip(want.named_parameters(), got.parameters()):
        assert q.dtype == p.dtype
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_train_beside_fp32(groups, dtype):
    def body(comm):
        model = _model()
        model[2].to(dtype)
        opt = ShardedOptimizer(model.parameters(), sgd(0.1), comm, zero_stage=1)
        assert {t.dtype for ts in opt.shard_state.values() for t in ts} <= {dtype, torch.float32}
        for k in range(3):
            x, y = _batch(k, comm.rank)
            _loss(model[2], model[1](model[0](x)).to(dtype), y.to(dtype)).backward()
            opt.step()
            opt.zero_grad()
        return model
    got = run_ranks(groups(2), body)
    want = _model()
    want[2].to(dtype)
    ref = torch.optim.SGD(want.parameters(), lr=0.1)
    for k in range(3):
        xs, ys = zip(*[_batch(k, r) for r in range(2)])
        _loss(want[2], want[1](want[0](torch.cat(xs))).to(dtype), torch.cat(ys).to(dtype)).backward()
        ref.step()
        ref.zero_grad()
    for (name, p), q in zip(want.named_parameters(), got[0].parameters()):
        assert q.dtype == p.dtype
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-2, msg=name)  # half-precision gradient sums


def test_frozen_parameters_get_no_state_and_no_traffic(groups):
    def body(comm):
        model = _model()
        model[1].requires_grad_(False)
        frozen = [p.detach().clone() for p in model[1].parameters()]
        opt = ShardedOptimizer(model.named_parameters(), adam(1e-2), comm, zero_stage=1)
        assert set(opt.names) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for k in range(2):
            _loss(model, *_batch(k, comm.rank)).backward()
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(frozen, model[1].parameters()))
        return opt.plan.layout.total, sum(p.numel() for n, p in model.named_parameters() if not n.startswith("1."))
    for total, trainable in run_ranks(groups(2), body):
        assert trainable <= total < trainable + 2 * 2 * 32 * 2  # the plan covers the trainable ones only


def test_tied_parameters_get_one_state_and_one_update(groups):
    def body(args):
        comm, model = args
        named = dict(model.named_parameters(remove_duplicate=False))  # the tied weight under two names
        assert named["embed.weight"] is named["out.weight"]
        opt = ShardedOptimizer(named, adam(1e-2), comm, zero_stage=2)
        assert opt.names.count("embed.weight") == 1 and "out.weight" not in opt.names
        for k in range(3):
            idx = torch.randint(0, 11, (4,), generator=torch.Generator().manual_seed(10 * k + comm.rank))
            model(idx).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        return model
    # Built here: TiedModel seeds the global RNG, rank threads would race. Its batch norm
    # runs on fixed statistics (eval), so per-rank batches average to the global batch.
    models = [TiedModel().eval() for _ in range(2)]
    got = run_ranks(list(zip(groups(2), models)), body)[0]
    want = TiedModel().eval()
    ref = torch.optim.Adam(want.parameters(), lr=1e-2)
    for k in range(3):
        idx = torch.cat([torch.randint(0, 11, (4,), generator=torch.Generator().manual_seed(10 * k + r))
                         for r in range(2)])
        want(idx).logsumexp(-1).mean().backward()
        ref.step()
        ref.zero_grad()
    for (name, p), q in zip(want.named_parameters(), got.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_carries_the_groups_hyperparameters(groups):
    def body(comm):
        model = _model()
        opt = ShardedOptimizer(_groups(model), adam(1e-2), comm, zero_stage=1)
        sched = SCHEDULES["lambda"](opt)
        _loss(model, *_batch(0, comm.rank)).backward()
        opt.step()
        sched.step()
        sd = opt.state_dict()
        again = ShardedOptimizer(_groups(_model()), adam(1e-2), comm, zero_stage=1)
        again.load_state_dict(sd)
        return sd, [g["lr"] for g in again.param_groups], again.step_count
    for sd, lrs, step in run_ranks(groups(2), body):
        assert lrs == [g["lr"] for g in sd["param_groups"]] == [1e-2 / 2, 5e-3 / 2] and step == 1


@pytest.mark.parametrize("w", [1, 2, 4])
def test_bytes_held_are_zero_formulas(groups, w):
    """Stage 1 holds 4P of parameters, 4P of gradient buckets and 8P/N of state; stage 2
    drops the gradient buckets for a 4P/N shard plus at most POOL packed buckets (bytes
    counted, P padded by the plan)."""
    bucket_bytes = 4096

    def body(comm, stage):
        model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
        opt = ShardedOptimizer(model.parameters(), adam(1e-3), comm, zero_stage=stage, bucket_bytes=bucket_bytes)
        model(torch.ones(2, 32)).sum().backward()
        opt.step()
        return opt.memory_bytes(), opt.plan.layout.total
    for held, total in run_ranks(groups(w), lambda c: body(c, 1)):
        assert held["params"] == held["grads"] == 4 * total
        assert held["state"] == 8 * total // w and held["packing"] == held["grad_shards"] == 0  # shards in place
    for held, total in run_ranks(groups(w), lambda c: body(c, 2)):
        assert held["params"] == 4 * total and held["grads"] == 0
        assert held["grad_shards"] == 4 * total // w and held["state"] == 8 * total // w
        assert 0 < held["packing"] <= POOL * bucket_bytes


def test_a_fresh_process_builds_and_steps_without_importing_dynamo():
    """torch's own add_param_group imports torch._dynamo (seconds in a fresh process: a
    replacement worker's recovery would wait for it)."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "from distopt.collectives import in_process\n"
            "from distopt.optim import ShardedOptimizer, adam\n"
            "p = [torch.zeros(3, requires_grad=True)]\n"
            "opt = ShardedOptimizer(p, adam(1e-3), in_process(1)[0])\n"
            "sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)\n"
            "p[0].sum().backward(); opt.step(); opt.zero_grad(); sched.step(); opt.state_dict()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
