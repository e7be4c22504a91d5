"""Update rules and the sharding plan, against torch.optim and by their stated properties."""
from __future__ import annotations

import pytest
import torch

from distopt.optim import adam, plan, sgd

SHAPES = [(5, 3), (7,), (1,), (4, 2, 3)]


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


RULES = [
    (lambda: sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    (lambda: sgd(0.05, momentum=0.9, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    (lambda: sgd(0.05, momentum=0.8, nesterov=True),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True)),
    (lambda: adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    (lambda: adam(1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (lambda: adam(1e-2, weight_decay=0.1, decoupled=True), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("make_rule,make_ref", RULES)
def test_rule_matches_torch_optim_over_25_steps(make_rule, make_ref):
    params, ref_params = _tensors(0), [p.detach().clone().requires_grad_() for p in _tensors(0)]
    rule = make_rule()
    state = rule.init(params)
    ref = make_ref(ref_params)
    for step in range(1, 26):
        grads = _tensors(step)
        rule.update(params, grads, state, step)
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)


def test_lr_schedule_is_called_with_the_one_based_step():
    seen = []
    rule = sgd(lambda step: seen.append(step) or 0.1 / step)
    params = [torch.zeros(3)]
    for step in (1, 2, 3):
        rule.update(params, [torch.ones(3)], rule.init(params), step)
    assert seen == [1, 2, 3]
    torch.testing.assert_close(params[0], -torch.full((3,), 0.1 + 0.05 + 0.1 / 3))


@pytest.mark.parametrize("call,message", [
    (lambda: sgd(-0.1), r"lr=-0.1 must be a finite float >= 0"),
    (lambda: sgd(0.1, momentum=-1), r"momentum=-1 must be >= 0"),
    (lambda: sgd(0.1, nesterov=True), r"nesterov=True needs momentum > 0"),
    (lambda: adam(1e-3, betas=(0.9, 1.0)), r"betas\[1\]=1.0 is outside \[0, 1\)"),
    (lambda: adam(1e-3, eps=0), r"eps=0 must be > 0"),
    (lambda: adam(1e-3, weight_decay=-0.1), r"weight_decay=-0.1 must be >= 0"),
])
def test_rule_arguments_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_schedule_returning_bad_value_names_the_step():
    rule = sgd(lambda step: float("nan"))
    with pytest.raises(ValueError, match="learning rate at step 4 is nan"):
        rule.update([torch.zeros(1)], [torch.zeros(1)], rule.init([torch.zeros(1)]), 4)


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_plan_is_even_contiguous_aligned_and_complete(w):
    numels = [17, 1, 300, 5, 1000, 33]
    p = plan(numels, w, bucket_numel=400, align=8)
    assert p == plan(numels, w, bucket_numel=400, align=8)  # pure
    sizes = {p.shard_numel(r) for r in range(w)}
    assert len(sizes) == 1  # equal shards: they differ by less than one alignment unit
    covered = sorted(rng for r in range(w) for rng in p.ranges(r))
    pos = 0
    for (s, e) in covered:
        assert s == pos and (e - s) % 8 == 0
        pos = e
    assert pos == p.layout.total
    for (bs, be) in p.layout.buckets:
        n = sum(numels[i] for i, b in enumerate(p.layout.bucket_of) if p.layout.buckets[b] == (bs, be))
        assert (be - bs) // w <= -(-n // w) + 8  # at most one alignment unit above the even split


def test_plan_arguments_are_checked():
    with pytest.raises(ValueError, match="world_size=0 must be a positive int"):
        plan([3], 0)
    with pytest.raises(ValueError, match="needs at least one tensor"):
        plan([], 2)
