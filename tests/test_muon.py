"""Muon, alone and beside AdamW through parameter groups, sharded by whole matrices: against
torch.optim.Muon + torch.optim.AdamW in one process on the averaged gradients."""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import run_ranks
from distopt.optim import ShardedOptimizer, adam, decay_groups, hidden_matrices, muon, muon_groups, sgd
from distopt.optim.plan import matrix_layout

STEPS = 4


class TinyGPT(torch.nn.Module):
    """Embedding, two residual blocks of matrices of four shapes, a norm and a head."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(3 * d, d, bias=False)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.norm, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.emb(tok)
        h = h + self.proj(torch.tanh(self.qkv(h)))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h))


torch.manual_seed(0)
_INIT = TinyGPT().state_dict()


def _model() -> TinyGPT:
    model = TinyGPT()
    model.load_state_dict(_INIT)
    return model


def _batch(k: int, r: int, n: int = 3):
    g = torch.Generator().manual_seed(1000 * k + r)
    tok = torch.randint(0, 11, (n, 7), generator=g)
    return tok[:, :-1], tok[:, 1:]


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


MUON = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)


def _torch_hybrid(world: int, muon_kw: dict) -> TinyGPT:
    model = _model()
    hidden = set(hidden_matrices(model))
    named = list(model.named_parameters())
    opts = [torch.optim.Muon([p for n, p in named if n in hidden], **muon_kw),
            torch.optim.AdamW([{"params": [p for n, p in named if n not in hidden and p.ndim >= 2]},
                               {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, weight_decay=0.1)]
    for k in range(STEPS):
        xs, ys = zip(*[_batch(k, r) for r in range(world)])
        _loss(model, torch.cat(xs), torch.cat(ys)).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    return model


def _distopt_hybrid(comms, stage: int, muon_kw: dict, bucket_bytes: int = 2048):
    def body(comm):
        model = _model()
        opt = ShardedOptimizer(muon_groups(model, muon(**muon_kw)), adam(1e-2, weight_decay=0.1, decoupled=True),
                               comm, zero_stage=stage, bucket_bytes=bucket_bytes)
        for k in range(STEPS):
            _loss(model, *_batch(k, comm.rank)).backward()
            opt.step()
            opt.zero_grad()
        return model, opt
    return run_ranks(comms, body)


def _assert_same(got: torch.nn.Module, want: torch.nn.Module) -> None:
    for (name, p), q in zip(want.named_parameters(), got.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_hybrid_equals_torch_muon_plus_adamw(groups, stage, world):
    runs = _distopt_hybrid(groups(world), stage, MUON)
    want = _torch_hybrid(world, MUON)
    for model, _ in runs:
        _assert_same(model, want)


@pytest.mark.parametrize("kw", [dict(lr=0.03, nesterov=False, weight_decay=0.0),
                                dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3, momentum=0.9)])
def test_hybrid_with_other_muon_arguments(groups, kw):
    want = _torch_hybrid(2, kw)
    for model, _ in _distopt_hybrid(groups(2), 1, kw):
        _assert_same(model, want)


def test_every_matrix_is_updated_whole_by_one_rank_and_state_is_its_momentum(groups):
    runs = _distopt_hybrid(groups(2), 1, MUON, bucket_bytes=1 << 20)
    opts = [opt for _, opt in runs]
    hidden = set(hidden_matrices(_model()))
    owned = sorted(tuple(shape) for opt in opts for b in range(len(opt.plan.layout.buckets)) if opt.rules.bucket_whole[b]
                   for _, _, shape in opt.rules.matrices(opt.shard_rank, b))
    assert owned == sorted(tuple(p.shape) for n, p in _model().named_parameters() if n in hidden)  # each on one rank
    p_muon = sum(p.numel() for n, p in _model().named_parameters() if n in hidden)
    for opt in opts:
        muon_buckets = [b for b, whole in enumerate(opt.rules.bucket_whole) if whole]
        assert all(opt.shard_state[f][b].numel() == 0 for f in ("exp_avg", "exp_avg_sq") for b in muon_buckets)
        kept = sum(opt.shard_state["momentum_buffer"][b].numel() for b in muon_buckets)
        assert kept <= p_muon / 2 + 32 * 3  # about 4 P_muon / N bytes: a rank's matrices plus row padding


def test_matrix_layout_balances_ranks_by_size():
    numels = [600, 600, 600, 600, 200, 200, 50]
    lay = matrix_layout(numels, 2, bucket_numel=10_000, align=8)
    loads = [0, 0]
    for i, o in enumerate(lay.offsets):
        start, end = lay.buckets[lay.bucket_of[i]]
        width = (end - start) // 2
        r = (o - start) // width
        assert o + numels[i] <= start + (r + 1) * width  # inside its owner's slice
        loads[r] += numels[i]
    assert abs(loads[0] - loads[1]) <= 50


def test_muon_alone_equals_torch_on_one_rank(groups):
    def body(comm):
        torch.manual_seed(3)
        w = [torch.randn(6, 4, requires_grad=True), torch.randn(4, 9, requires_grad=True)]
        opt = ShardedOptimizer([{"params": w}], muon(0.05), comm, zero_stage=1)
        for k in range(3):
            opt.step(grads=[torch.ones_like(t) * (k + 1) + t.detach() for t in w])
        return [t.detach().clone() for t in w]
    got = run_ranks(groups(1), body)[0]
    torch.manual_seed(3)
    w = [torch.randn(6, 4, requires_grad=True), torch.randn(4, 9, requires_grad=True)]
    ref = torch.optim.Muon(w, lr=0.05)
    for k in range(3):
        for t in w:
            t.grad = torch.ones_like(t) * (k + 1) + t.detach()
        ref.step()
    for a, b in zip(got, w):
        assert torch.equal(a, b.detach())


def test_decay_groups_split_matrices_from_biases_and_norms():
    model = _model()
    decayed, rest = decay_groups(model, 0.2)
    assert decayed["weight_decay"] == 0.2 and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for _, p in decayed["params"]) and all(p.ndim < 2 for _, p in rest["params"])
    assert len(decayed["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert "weight_decay" not in decay_groups(model)[0]  # None keeps the rule's


def test_hidden_matrices_leave_out_embedding_and_head():
    assert hidden_matrices(_model()) == ["qkv.weight", "proj.weight", "up.weight", "down.weight"]


@pytest.mark.parametrize("bad, match", [
    (lambda: muon(0.02, ns_steps=0), "ns_steps"),
    (lambda: muon(0.02, momentum=-0.1), "momentum"),
    (lambda: muon(-1.0), "lr"),
    (lambda: muon(0.02, weight_decay=-1), "weight_decay"),
    (lambda: muon(0.02, adjust_lr_fn="rms"), "adjust_lr_fn"),
    (lambda: muon(0.02, ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
])
def test_bad_muon_arguments_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_a_muon_group_with_a_vector_names_it(groups):
    model = _model()
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match="'norm.weight'.*2-D"):
        ShardedOptimizer([{"params": [("qkv.weight", named["qkv.weight"]), ("norm.weight", named["norm.weight"])],
                           "rule": muon(0.02)}], adam(1e-3), groups(1)[0])


def test_a_group_rule_that_is_not_a_rule_and_foreign_keys_are_refused(groups):
    model = _model()
    with pytest.raises(TypeError, match="rule"):
        ShardedOptimizer([{"params": list(model.parameters()), "rule": "muon"}], adam(1e-3), groups(1)[0])
    with pytest.raises(ValueError, match="betas"):  # Adam's key in a Muon group
        ShardedOptimizer([{"params": [model.qkv.weight], "rule": muon(0.02), "betas": (0.9, 0.95)}],
                         adam(1e-3), groups(1)[0])


def test_sgd_momentum_groups_beside_muon_keep_their_own_buffers(groups):
    def body(comm):
        model = _model()
        opt = ShardedOptimizer(muon_groups(model), sgd(0.01), comm, zero_stage=1, bucket_bytes=512)
        assert set(opt.shard_state) == {"momentum_buffer"}  # Muon's only; SGD without momentum keeps none
        return [t.numel() for t in opt.shard_state["momentum_buffer"]]
    sizes = run_ranks(groups(2), body)
    assert all(any(n == 0 for n in s) and any(n > 0 for n in s) for s in sizes)
