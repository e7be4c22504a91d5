"""ShardedOptimizer: sharded equals unsharded, determinism, memory, clipping, skips, state."""
from __future__ import annotations

import math

import pytest
import torch

from distopt.collectives import run_ranks
from distopt.optim import ShardedOptimizer, adam, sgd

from odd_params import SHAPES, grads_of as _grads, init_params as _init

STEPS = 12




def _step(opt, grads):
    opt.step(grads=grads)
    return opt.info


def _train(comms, stage, make_rule, steps=STEPS, bucket_bytes=25 * 2**20, **kw):
    def body(comm):
        params = _init()
        opt = ShardedOptimizer(params, make_rule(), comm, zero_stage=stage, bucket_bytes=bucket_bytes, **kw)
        infos = [_step(opt, _grads(k, comm.rank)) for k in range(steps)]
        return params, opt, infos
    return run_ranks(comms, body)


def _reference(w, make_ref, steps=STEPS, clip=None):
    params = {k: v.detach().clone().requires_grad_() for k, v in _init().items()}
    ref = make_ref(list(params.values()))
    for k in range(steps):
        per_rank = [_grads(k, r) for r in range(w)]
        for name, p in params.items():
            p.grad = sum(g[name] for g in per_rank) / w
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        ref.step()
    return {k: v.detach() for k, v in params.items()}


RULES = {
    "adam": (lambda: adam(1e-2, weight_decay=0.01, decoupled=True),
             lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01)),
    "sgd": (lambda: sgd(0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_sharded_equals_one_torch_optim(groups, w, stage, rule):
    make_rule, make_ref = RULES[rule]
    bucket_bytes = 256 if w in (3, 8) else 25 * 2**20  # several buckets on some sizes
    results = _train(groups(w), stage, make_rule, bucket_bytes=bucket_bytes)
    expected = _reference(w, make_ref)
    for params, _, infos in results:
        assert [i.step for i in infos] == list(range(1, STEPS + 1))
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)
    first = results[0][0]
    assert all(torch.equal(first[n], p[n]) for p, _, _ in results for n in first), "ranks disagree"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_same_configuration_gives_the_same_bits(groups, stage):
    a = _train(groups(3), stage, RULES["adam"][0], bucket_bytes=512)
    b = _train(groups(3), stage, RULES["adam"][0], bucket_bytes=512)
    for (pa, _, _), (pb, _, _) in zip(a, b):
        assert all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_state_bytes_are_one_nth_plus_at_most_one_alignment_unit(groups, w):
    n = sum(math.prod(s) for s in SHAPES)
    full = _train(groups(w), 0, RULES["adam"][0], steps=1)[0][1]
    assert full.state_bytes() == 2 * 4 * (-(-n // 32) * 32)  # stage 0 pads once to the 32-element unit
    for stage in (1, 2):
        for _, opt, _ in _train(groups(w), stage, RULES["adam"][0], steps=1):
            per_state_tensor = opt.state_bytes() // 2
            assert per_state_tensor == 4 * (-(-n // (32 * w)) * 32)  # exactly the plan's shard
            assert per_state_tensor - 4 * n / w < 4 * 32  # 1/N of the whole + under one unit (128 B)
            assert opt.state_bytes() * w >= 2 * 4 * n


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_global_norm_clipping_matches_torch(groups, stage):
    make_rule, make_ref = RULES["sgd"]
    results = _train(groups(2), stage, make_rule, max_grad_norm=0.5)
    expected = _reference(2, make_ref, clip=0.5)
    for params, _, infos in results:
        assert all(i.grad_norm > 0.5 for i in infos)  # clipping was active
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_non_finite_gradient_on_one_rank_skips_the_step_everywhere(groups, stage):
    def body(comm):
        params = _init()
        opt = ShardedOptimizer(params, adam(1e-2), comm, zero_stage=stage)
        _step(opt, _grads(0, comm.rank))
        before = {k: v.detach().clone() for k, v in params.items()}
        bad = _grads(1, comm.rank)
        if comm.rank == 2:
            bad["p3"][1, 1, 1] = float("inf")
        info = _step(opt, bad)
        assert all(torch.equal(before[k], params[k]) for k in params)
        return info, _step(opt, _grads(2, comm.rank))

    for skipped, after in run_ranks(groups(3), body):
        assert skipped.skipped and skipped.step == 1 and not math.isfinite(skipped.grad_norm)
        assert not after.skipped and after.step == 2


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_dot_grad_path_and_model_sees_updates(groups, stage):
    def body(comm):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        ref_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        opt = ShardedOptimizer(list(model.parameters()), adam(1e-2), comm, zero_stage=stage)
        ref_model.load_state_dict(model.state_dict())  # after the optimizer's broadcast from rank 0
        ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if stage < 2:  # backward accumulated straight into the gradient bucket
                assert model[0].weight.grad.data_ptr() == opt.grad_buckets.views[0].data_ptr()
            opt.step()
            ref.zero_grad()
            ref_model(x).pow(2).mean().backward()
            ref.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    run_ranks(groups(2), body)  # every rank sees the same batch: the average is that gradient


def test_state_dict_round_trip_and_full_state_reshards(groups):
    make_rule = RULES["adam"][0]
    two = _train(groups(2), 2, make_rule, steps=6)
    shard_sd = [opt.state_dict() for _, opt, _ in two]
    fulls = run_ranks([opt for _, opt, _ in two], lambda opt: opt.full_state_dict())
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in _init().items()}
    ref = RULES["adam"][1](list(ref_params.values()))
    for k in range(6):
        for name, p in ref_params.items():
            p.grad = sum(_grads(k, r)[name] for r in range(2)) / 2
        ref.step()
    for i, name in enumerate(ref_params):
        st = ref.state[ref_params[name]]
        torch.testing.assert_close(fulls[0]["state"][name]["exp_avg"], st["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fulls[1]["state"][name]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-5, atol=1e-9)

    def resume(comm):  # 2 -> 3 ranks at stage 1, then 4 more steps
        params = {k: v.detach().clone().requires_grad_() for k, v in two[0][0].items()}
        opt = ShardedOptimizer(params, make_rule(), comm, zero_stage=1)
        opt.load_full_state_dict(fulls[0])
        for k in range(6, 10):
            opt.step(grads=_grads(k, comm.rank % 2) if comm.rank < 2 else {n: torch.zeros(t.shape) for n, t in
                                                                            params.items()})
        return params

    # rank 2 contributes zeros, so feed ranks 0/1 scaled grads: mean over 3 = 2/3 of the 2-rank mean
    def continued_reference():
        for k in range(6, 10):
            for name, p in ref_params.items():
                p.grad = sum(_grads(k, r)[name] for r in range(2)) / 3
            ref.step()
        return {k: v.detach() for k, v in ref_params.items()}

    resumed = run_ranks(groups(3), resume)
    expected = continued_reference()
    for params in resumed:
        for name in expected:
            torch.testing.assert_close(params[name], expected[name], rtol=1e-5, atol=1e-6)

    def reload(args):
        comm, sd = args
        params = _init()
        opt = ShardedOptimizer(params, make_rule(), comm, zero_stage=2)
        opt.load_state_dict(sd)
        return opt.state_dict()
    again = run_ranks(list(zip(groups(2), shard_sd)), reload)
    for a, b in zip(again, shard_sd):
        assert a["step"] == b["step"] == 6
        assert all(torch.equal(a["state"][f], b["state"][f]) for f in a["state"])
    with pytest.raises(RuntimeError, match="different world_size"):
        run_ranks(list(zip(groups(3), shard_sd + shard_sd[:1])), reload)


def test_bad_arguments_fail_before_any_communication(groups):
    comm = groups(2)[0]
    p = [torch.zeros(3, requires_grad=True)]
    q = torch.zeros(2, requires_grad=True)
    cases = [
        (lambda: ShardedOptimizer(p, adam(1e-3), comm, zero_stage=3), ValueError, "zero_stage=3 must be 0, 1 or 2"),
        (lambda: ShardedOptimizer([torch.zeros(3, dtype=torch.int64)], adam(1e-3), comm), TypeError,
         r"parameter '0' must be a floating-point tensor"),
        (lambda: ShardedOptimizer([], adam(1e-3), comm), ValueError, "params is empty"),
        (lambda: ShardedOptimizer([torch.zeros(3)], adam(1e-3), comm), ValueError, "no parameter requires grad"),
        (lambda: ShardedOptimizer(p, torch.optim.SGD, comm), TypeError, "is not an update rule"),
        (lambda: ShardedOptimizer(p, adam(1e-3), comm, max_grad_norm=0), ValueError, "max_grad_norm=0 must be > 0"),
        (lambda: ShardedOptimizer(p, adam(1e-3), comm, bucket_bytes=0), ValueError, "bucket_bytes=0"),
        (lambda: ShardedOptimizer([{"params": p}, {"params": [q] + p}], adam(1e-3), comm), ValueError,
         r"parameter '2' is in param group 0 \(as '0'\) and in param group 1"),
        (lambda: ShardedOptimizer([{"params": p}, {"params": []}], adam(1e-3), comm), ValueError,
         "param group 1 is empty"),
        (lambda: ShardedOptimizer([{"params": p, "lr": 1e-2, "momentum": 0.9}], adam(1e-3), comm), ValueError,
         r"unknown key\(s\) \['momentum'\]"),
        (lambda: ShardedOptimizer([{"params": p, "weight_decay": -1.0}], adam(1e-3), comm), ValueError,
         "param group 0: weight_decay=-1.0 must be >= 0"),
        (lambda: ShardedOptimizer([{"lr": 1.0}], adam(1e-3), comm), ValueError, "param group 0 has no 'params'"),
        (lambda: ShardedOptimizer(p, adam(1e-3), None), RuntimeError, "torch.distributed.init_process_group"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    assert not comm._broken


def test_mismatched_grads_are_named(groups):
    opt = ShardedOptimizer({"a": torch.zeros(3, requires_grad=True)}, adam(1e-3), groups(1)[0])
    with pytest.raises(ValueError, match=r"missing \['a'\], unexpected \['b'\]"):
        opt.step(grads={"b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"grads\['a'\] has shape \(4,\), param has \(3,\)"):
        opt.step(grads={"a": torch.zeros(4)})


def test_bf16_wire_stays_close(groups):
    results = _train(groups(2), 1, RULES["sgd"][0], wire_dtype=torch.bfloat16)
    expected = _reference(2, RULES["sgd"][1])
    for params, _, _ in results:
        for name in expected:
            torch.testing.assert_close(params[name], expected[name], rtol=3e-2, atol=3e-2)


def _build_mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 2), torch.nn.Linear(3, 3))  # the last layer is never used


torch.manual_seed(0)
_MLP_INIT = _build_mlp().state_dict()  # built once: threads must not race on the global RNG


def _mlp():
    model = _build_mlp()
    model.load_state_dict(_MLP_INIT)
    return model


def _forward(model, x):
    return model[:5](x).pow(2).mean()


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("w", [1, 3])
def test_plain_loop_gives_the_bits_of_explicit_gradients(groups, w, stage):
    def body(comm, plain_loop):
        model = _mlp()
        params = dict(model.named_parameters())
        opt = ShardedOptimizer(params, adam(1e-2), comm, zero_stage=stage, bucket_bytes=200)
        for k in range(4):
            x = torch.randn(5, 6, generator=torch.Generator().manual_seed(100 * k + comm.rank))
            if plain_loop:  # buckets reduced by the hooks while backward runs
                _forward(model, x).backward()
                opt.step()
                opt.zero_grad()
            else:
                grads = torch.autograd.grad(_forward(model, x), list(params.values()), allow_unused=True)
                opt.step(grads=[g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params.values())])
        return {k: v.detach().clone() for k, v in params.items()}

    comms = groups(w)
    explicit = run_ranks(comms, lambda c: body(c, False))
    plain = run_ranks(comms, lambda c: body(c, True))
    for a, b in zip(explicit, plain):
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_accumulation_under_no_sync_matches_torch(groups, stage):
    xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(2 * 2 * 3)]

    def body(comm):
        model = _mlp()
        opt = ShardedOptimizer(dict(model.named_parameters()), sgd(0.1, momentum=0.9), comm, zero_stage=stage,
                               bucket_bytes=200)
        for k in range(3):
            with opt.no_sync():
                (_forward(model, xs[(k * 2 + comm.rank) * 2]) / 2).backward()
            assert not opt.reducer.pending  # nothing reduced during the first micro-batch
            (_forward(model, xs[(k * 2 + comm.rank) * 2 + 1]) / 2).backward()
            opt.step()
            opt.zero_grad()
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    got = run_ranks(groups(2), body)[0]
    model = _mlp()
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for k in range(3):
        ref.zero_grad()
        total = sum(_forward(model, xs[(k * 2 + r) * 2 + m]) for r in range(2) for m in range(2)) / 4
        total.backward()
        ref.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_a_second_backward_without_no_sync_is_refused(groups):
    model = _mlp()
    opt = ShardedOptimizer(dict(model.named_parameters()), sgd(0.1), groups(1)[0], bucket_bytes=200)
    _forward(model, torch.ones(2, 6)).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        _forward(model, torch.ones(2, 6)).backward()


@pytest.mark.parametrize("stage", [1, 2])
def test_last_layers_are_on_the_wire_before_backward_ends(groups, stage):
    def body(comm):
        model = _build_mlp()[:5]
        opt = ShardedOptimizer(dict(model.named_parameters()), adam(1e-2), comm, zero_stage=stage, bucket_bytes=200,
                               last_bucket_bytes=None)
        _forward(model, torch.ones(2, 6)).backward()
        launched = len(opt.reducer.pending)
        dropped = all(p.grad is None for p in model.parameters())
        opt.step()
        return launched, len(opt.plan.layout.buckets), dropped

    for launched, buckets, dropped in run_ranks(groups(2), body):
        assert buckets >= 3 and launched == buckets  # every bucket launched by its last gradient's hook
        assert dropped == (stage == 2)  # stage 2 packed each bucket and let go of .grad
