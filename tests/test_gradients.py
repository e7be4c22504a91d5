"""Tests for distopt.gradients: oracles against torch.optim / torch.autograd, semantics, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from distopt import _nest
from distopt.backends import torch_backend
from distopt.gradients import (
    adam_update,
    execute_with_gradients,
    gradient_descent_update,
    is_variable,
    stop_gradient,
    variable,
)


def _tree(make):
    """A dict holding a list of dicts and a tuple, with odd and 0-d shapes, built leaf by leaf."""
    return {
        "emb": make((7,)),
        "layers": [{"w": make((3, 5)), "b": make((5,))}, {"w": make((5, 1)), "b": make(())}],
        "head": (make((2, 3, 1)),),
    }


def _randn(gen, dtype=torch.float32):
    return lambda shape: torch.randn(shape, generator=gen, dtype=dtype)


def _leaves(tree):
    return [torch.as_tensor(x) for x in _nest.flatten(tree)[0]]


def _assert_close(tree, ref_tensors, **tol):
    got = _leaves(tree)
    assert len(got) == len(ref_tensors)
    for g, r in zip(got, ref_tensors):
        torch.testing.assert_close(g, r.detach().to(g.dtype), **tol)


def _to(tree, fw, dtype):
    if fw == "numpy":
        return _nest.map_leaves(lambda t: t.numpy().astype(dtype), tree)
    return _nest.map_leaves(lambda t: t.clone(), tree)


ADAM_CASES = [("torch", True, "float32"), ("torch", False, "float32"), ("numpy", True, "float64"),
              ("numpy", False, "float64"), ("numpy", True, "float32")]


@pytest.mark.parametrize("fw, inplace, dtype", ADAM_CASES)
def test_adam_matches_torch_optim_adam(fw, inplace, dtype):
    gen = torch.Generator().manual_seed(0)
    tdtype = getattr(torch, dtype)
    w0 = _tree(_randn(gen, tdtype))
    params = [torch.nn.Parameter(t.clone()) for t in _leaves(w0)]
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    ws, mw, vw = _to(w0, fw, dtype), _to(_tree(torch.zeros), fw, dtype), _to(_tree(torch.zeros), fw, dtype)
    for step in range(1, 22):
        grads = _tree(_randn(gen, tdtype))
        for p, g in zip(params, _leaves(grads)):
            p.grad = g.clone()
        opt.step()
        ws, mw, vw = adam_update(ws, _to(grads, fw, dtype), 0.01, mw, vw, step, 0.8, 0.99, 1e-6, inplace)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == "float32" else {"rtol": 1e-10, "atol": 1e-12}
    _assert_close(ws, params, **tol)
    _assert_close(mw, [opt.state[p]["exp_avg"] for p in params], **tol)
    _assert_close(vw, [opt.state[p]["exp_avg_sq"] for p in params], **tol)


@pytest.mark.parametrize("fw, inplace, dtype", ADAM_CASES)
def test_gradient_descent_matches_torch_optim_sgd(fw, inplace, dtype):
    gen = torch.Generator().manual_seed(1)
    w0 = _tree(_randn(gen, getattr(torch, dtype)))
    params = [torch.nn.Parameter(t.clone()) for t in _leaves(w0)]
    opt = torch.optim.SGD(params, lr=0.05)
    ws = _to(w0, fw, dtype)
    for _ in range(20):
        grads = _tree(_randn(gen, getattr(torch, dtype)))
        for p, g in zip(params, _leaves(grads)):
            p.grad = g.clone()
        opt.step()
        ws = gradient_descent_update(ws, _to(grads, fw, dtype), 0.05, inplace)
    _assert_close(ws, params)


def _adam_20_steps(ws, seed=3):
    gen = torch.Generator().manual_seed(seed)
    mw, vw = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    for step in range(1, 21):
        grads = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in ws]
        adam_update(ws, grads, 0.01, mw, vw, step, epsilon=1e-8)
    return ws


def test_fused_kernel_groups_by_device_and_dtype(monkeypatch):
    calls = []
    real = torch._fused_adam_

    def spy(params, *args, **kwargs):
        calls.append((params[0].dtype, len(params), [float(s) for s in args[4]]))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", spy)
    ws = [torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(4)]
    adam_update(ws, [torch.ones_like(w) for w in ws], 0.1, [torch.zeros_like(w) for w in ws],
                [torch.zeros_like(w) for w in ws], step=7)
    assert calls == [(torch.float32, 2, [7.0, 7.0]), (torch.float64, 1, [7.0])]


def test_foreach_fallback_matches_fused(monkeypatch):
    make = lambda: [torch.linspace(-1, 1, 11), torch.ones(3, 2), torch.tensor(0.5)]  # noqa: E731
    fused = _adam_20_steps(make())
    monkeypatch.delattr(torch, "_fused_adam_")
    missing = _adam_20_steps(make())
    torch.testing.assert_close(missing, fused, rtol=1e-6, atol=1e-7)


def test_fused_kernel_that_raises_falls_back_once(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("not implemented for this device")

    monkeypatch.setattr(torch, "_fused_adam_", broken)
    monkeypatch.setattr(torch_backend, "_FUSED_UNSUPPORTED", set())
    ws = _adam_20_steps([torch.ones(3)])
    monkeypatch.undo()
    torch.testing.assert_close(ws, _adam_20_steps([torch.ones(3)]))
    assert calls == [1]  # remembered as unsupported after the first failure


def test_mixed_dtype_group_skips_fused_kernel(monkeypatch):
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: pytest.fail("fused on mixed dtypes"))
    w, m = torch.ones(3), torch.zeros(3, dtype=torch.float64)
    adam_update([w], [torch.ones(3)], 0.1, [m], [torch.zeros(3)], 1)
    assert w[0] < 1 and m[0] > 0


def _loss(x):
    return (x["a"] ** 2).sum() * x["b"][0].sin().sum() + x["b"][1].exp().mean()


def test_execute_with_gradients_matches_autograd_and_returns_extras():
    gen = torch.Generator().manual_seed(4)
    randn = _randn(gen)
    xs = {"a": randn(3), "b": [randn((2, 2)), randn(1)], "unused": torch.ones(2)}
    y, grads, e1, e2 = execute_with_gradients(lambda x: (_loss(x), "extra", 7), xs)
    ref_in = [t.detach().clone().requires_grad_() for t in (xs["a"], *xs["b"])]
    ref_y = _loss({"a": ref_in[0], "b": ref_in[1:]})
    ref = torch.autograd.grad(ref_y, ref_in)
    torch.testing.assert_close(y, ref_y.detach())
    _assert_close({"a": grads["a"], "b": grads["b"]}, list(ref))
    assert torch.equal(grads["unused"], torch.zeros(2))  # y does not depend on it
    assert (e1, e2) == ("extra", 7) and isinstance(grads["b"], list)
    assert not y.requires_grad and not grads["a"].requires_grad and not xs["a"].requires_grad


def test_second_derivative_with_retain_grads():
    x = variable(torch.tensor([1.0, -2.0, 3.0]))
    _, grads = execute_with_gradients(lambda t: (t["x"] ** 3).sum(), {"x": x}, retain_grads=True)
    torch.testing.assert_close(grads["x"], 3 * x.detach() ** 2)
    (second,) = torch.autograd.grad(grads["x"].sum(), x)
    torch.testing.assert_close(second, 6 * x.detach())


def test_hessian_vector_product_on_nested_container():
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    xs = variable({"p": [torch.tensor([1.0, -1.0])]})
    _, grads = execute_with_gradients(lambda x: 0.5 * x["p"][0] @ a @ x["p"][0], xs, retain_grads=True)
    vec = torch.tensor([1.0, 2.0])
    (hvp,) = torch.autograd.grad(grads["p"][0] @ vec, xs["p"][0])
    torch.testing.assert_close(hvp, a @ vec)


def test_gradient_through_out_of_place_gradient_descent_step():
    # MAML-style: w' = w - lr * dL/dw with L = sum(w**2), so L(w') = (1 - 2 lr)**2 * sum(w**2).
    w = variable(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    _, dw = execute_with_gradients(lambda t: (t**2).sum(), w, retain_grads=True)
    w_new = gradient_descent_update({"w": w}, {"w": dw}, lr, inplace=False)["w"]
    d_lr, d_w = torch.autograd.grad((w_new**2).sum(), [lr, w])
    sq = (w.detach() ** 2).sum()
    torch.testing.assert_close(d_lr, -4 * (1 - 2 * lr.detach()) * sq)
    torch.testing.assert_close(d_w, 2 * (1 - 2 * lr.detach()) ** 2 * w.detach())


def test_gradient_through_out_of_place_adam_step_matches_finite_differences():
    w = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    g = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    m, v = torch.full_like(w, 0.1), torch.full_like(w, 0.2)

    def loss(lr):
        w_new, _, _ = adam_update([w], [g], lr, [m], [v], 3, inplace=False)
        return (w_new[0] ** 3).sum()

    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    (d_lr,) = torch.autograd.grad(loss(lr), lr)
    h = 1e-6
    fd = (loss(0.05 + h) - loss(0.05 - h)) / (2 * h)
    torch.testing.assert_close(d_lr, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fw", ["torch", "numpy"])
def test_inplace_returns_and_mutates_the_same_objects(fw):
    arr = torch.ones if fw == "torch" else np.ones
    ws, mw, vw = {"a": [arr(3)]}, {"a": [arr(3) * 0]}, {"a": [arr(3) * 0]}
    leaves = [ws["a"][0], mw["a"][0], vw["a"][0]]
    out = adam_update(ws, {"a": [arr(3)]}, 0.1, mw, vw, 1)
    assert all(o is i for o, i in zip(out, (ws, mw, vw))) and ws["a"][0] is leaves[0]
    assert float(leaves[0][0]) < 1 and float(leaves[1][0]) > 0 and float(leaves[2][0]) > 0
    bare = arr(2)
    assert gradient_descent_update(bare, arr(2), 0.5) is bare and float(bare[0]) == 0.5


@pytest.mark.parametrize("fw", ["torch", "numpy"])
def test_out_of_place_leaves_inputs_untouched(fw):
    arr = torch.ones if fw == "torch" else np.ones
    ws, g, mw, vw = ({"a": (arr(3),)} for _ in range(4))
    new_ws, new_mw, new_vw = adam_update(ws, g, 0.1, mw, vw, 1, inplace=False)
    assert all(float(t["a"][0][0]) == 1 for t in (ws, g, mw, vw))
    assert isinstance(new_ws["a"], tuple) and new_ws["a"][0] is not ws["a"][0]
    assert float(new_ws["a"][0][0]) < 1 and float(new_mw["a"][0][0]) > 0 and float(new_vw["a"][0][0]) > 0
    assert float(gradient_descent_update(ws, g, 0.5, inplace=False)["a"][0][0]) == 0.5
    assert float(ws["a"][0][0]) == 1


@pytest.mark.parametrize("f", [None, "torch", torch])
def test_framework_torch_inferred_or_named(f):
    out = gradient_descent_update([torch.ones(2)], [torch.ones(2)], 0.5, inplace=False, f=f)
    assert isinstance(out, list) and isinstance(out[0], torch.Tensor)


@pytest.mark.parametrize("f", [None, "numpy", np])
def test_framework_numpy_inferred_or_named(f):
    out = gradient_descent_update((np.ones(2),), (np.ones(2),), 0.5, inplace=False, f=f)
    assert isinstance(out, tuple) and isinstance(out[0], np.ndarray)


def test_variable_is_variable_stop_gradient_torch():
    x = {"a": torch.ones(2), "b": [torch.ones(1) * 2]}
    x["b"][0].requires_grad_()
    nonleaf = x["b"][0] * 3
    v = variable({"a": x["a"], "n": nonleaf})
    assert v["a"] is x["a"] and v["a"].requires_grad and v["n"].is_leaf and v["n"].requires_grad
    assert is_variable(v) == {"a": True, "n": True} and is_variable(torch.ones(1)) is False
    s = stop_gradient(v)
    assert not s["n"].requires_grad and s["n"].data_ptr() == v["n"].data_ptr()


def test_variable_is_variable_stop_gradient_numpy():
    x = {"a": np.ones(2), "i": np.arange(3)}
    assert variable(x)["a"] is x["a"] and variable(x)["i"] is x["i"]
    assert is_variable(x) == {"a": False, "i": False}
    assert stop_gradient(x["a"]) is x["a"]


def test_empty_trees_are_a_no_op():
    assert adam_update([], [], 0.1, [], [], 1) == ([], [], [])
    assert adam_update({}, {}, 0.1, {}, {}, 1, inplace=False, f="torch") == ({}, {}, {})


def _adam_args(fw="torch"):
    """Positional arguments of adam_update: ``[ws, dcdws, lr, mw, vw, step]``."""
    arr = torch.ones if fw == "torch" else np.ones
    ws = {"layers": [{"w": arr(2)}, {"w": arr(3)}], "b": arr(1)}
    return [ws, _nest.map_leaves(lambda x: x * 2, ws), 0.1, _nest.map_leaves(lambda x: x * 0, ws),
            _nest.map_leaves(lambda x: x * 0 + 1, ws), 1]


def _call_adam(args, **overrides):
    names = ("ws", "dcdws", "lr", "mw", "vw", "step")
    return adam_update(**{**dict(zip(names, args)), **overrides})


def _snapshot(args):
    return [_nest.map_leaves(copy.deepcopy, tree) for tree in args[:2] + args[3:5]]


def _assert_unchanged(args, before):
    for tree, old in zip(args[:2] + args[3:5], before):
        for a, b in zip(_leaves(tree), _leaves(old)):
            assert torch.equal(a, b)


def _replace(tree, path, value):
    *head, last = path
    node = tree
    for key in head:
        node = node[key]
    node[last] = value


BAD_ADAM = [
    ({"lr": -0.1}, ValueError, r"lr=-0\.1 is negative: pass a learning rate >= 0"),
    ({"lr": torch.tensor(-0.1)}, ValueError, r"is negative: pass a learning rate >= 0"),
    ({"lr": "fast"}, TypeError, r"lr='fast' is not a number"),
    ({"beta1": 1.0}, ValueError, r"beta1=1\.0 is outside \[0, 1\): pass 0 <= beta1 < 1"),
    ({"beta2": -0.5}, ValueError, r"beta2=-0\.5 is outside \[0, 1\)"),
    ({"epsilon": 0.0}, ValueError, r"epsilon=0\.0 is not > 0"),
    ({"step": 0}, ValueError, r"step=0 is invalid: step is the 1-based number of the update.*step=1"),
    ({"step": 2.5}, ValueError, r"step=2\.5 is invalid: step is the 1-based number"),
    ({"f": "jax"}, ValueError, r"f='jax' is not a known framework: pass one of 'numpy', 'torch'"),
]


@pytest.mark.parametrize("fw", ["torch", "numpy"])
@pytest.mark.parametrize("kwargs, error, message", BAD_ADAM)
def test_bad_hyperparameters_raise_and_change_nothing(fw, kwargs, error, message):
    args = _adam_args(fw)
    before = _snapshot(args)
    with pytest.raises(error, match=message):
        _call_adam(args, **kwargs)
    _assert_unchanged(args, before)


def test_bad_lr_for_gradient_descent():
    w = torch.ones(2)
    with pytest.raises(ValueError, match=r"lr=-0\.1 is negative: pass a learning rate >= 0"):
        gradient_descent_update(w, torch.ones(2), -0.1)
    assert torch.equal(w, torch.ones(2))


# (index of the tree in _adam_args, path inside it, bad value, error, message)
BAD_TREES = [
    (1, ["layers", 1, "w"], torch.ones(4), ValueError,
     r"shape mismatch at dcdws\['layers'\]\[1\]\['w'\]: \(4,\) vs ws\['layers'\]\[1\]\['w'\] \(3,\)"),
    (3, ["layers", 1], {}, ValueError, r"mw\['layers'\]\[1\] is missing key 'w' that ws\['layers'\]\[1\] has"),
    (4, ["layers"], [{"w": torch.ones(2)}], ValueError, r"vw\['layers'\] has 1 items but ws\['layers'\] has 2"),
    (1, ["layers", 1, "w"], np.ones(3), TypeError,
     r"dcdws\['layers'\]\[1\]\['w'\] is a numpy\.ndarray but ws\['layers'\]\[0\]\['w'\] is a torch\.Tensor: "
     r"convert with torch\.from_numpy\(x\) or x\.numpy\(\)"),
    (1, ["b"], 3.0, TypeError, r"dcdws\['b'\] is a float, not an array"),
    (1, ["layers", 0, "w"], torch.ones(2, dtype=torch.int64), TypeError,
     r"dcdws\['layers'\]\[0\]\['w'\] has dtype torch\.int64.*convert it with x\.float\(\)"),
    (0, ["b"], torch.ones(1, dtype=torch.bool), TypeError, r"ws\['b'\] has dtype torch\.bool.*x\.float\(\)"),
]


@pytest.mark.parametrize("index, path, value, error, message", BAD_TREES)
def test_bad_trees_name_the_path_and_change_nothing(index, path, value, error, message):
    args = _adam_args()
    _replace(args[index], path, value)
    before = _snapshot(args)
    with pytest.raises(error, match=message):
        adam_update(*args)
    _assert_unchanged(args, before)


def test_numpy_int_arrays_and_explicit_framework_mismatch():
    ws = {"w": np.ones(2, dtype=np.int32)}
    with pytest.raises(TypeError, match=r"ws\['w'\] has dtype int32.*x\.astype\(np\.float32\)"):
        gradient_descent_update(ws, {"w": np.ones(2)}, 0.1)
    with pytest.raises(TypeError, match=r"ws\['w'\] is a numpy\.ndarray but f='torch': convert with"):
        gradient_descent_update(ws, ws, 0.1, f="torch")


def test_shared_moment_buffers_are_rejected_in_place():
    m = torch.zeros(2)
    with pytest.raises(ValueError, match=r"mw\['a'\] and vw\['a'\] are the same array"):
        adam_update({"a": torch.ones(2)}, {"a": torch.ones(2)}, 0.1, {"a": m}, {"a": m}, 1)
    assert torch.equal(m, torch.zeros(2))


def test_variable_rejects_integer_tensors():
    with pytest.raises(TypeError, match=r"x\['i'\] has dtype torch\.int64.*x\.float\(\)"):
        variable({"i": torch.arange(3)})


def test_execute_with_gradients_errors():
    with pytest.raises(TypeError, match=r"numpy has no autodiff.*torch\.from_numpy\(x\).*f='torch'"):
        execute_with_gradients(lambda x: x.sum(), {"a": np.ones(2)})
    with pytest.raises(ValueError, match=r"shape \(2,\): y must be a scalar.*y\.sum\(\) or y\.mean\(\)"):
        execute_with_gradients(lambda x: x * 2, torch.ones(2))
    with pytest.raises(TypeError, match=r"x\.float\(\)"):
        execute_with_gradients(lambda x: x.sum(), torch.arange(2))

def test_execute_with_gradients_named_torch_accepts_numpy():
    _, grads = execute_with_gradients(lambda x: (x["a"] ** 2).sum(), {"a": np.ones(2)}, f="torch")
    assert torch.equal(grads["a"], torch.full((2,), 2.0, dtype=torch.float64))


def test_tensor_lr_in_place_matches_float_lr():
    ws = [torch.ones(3), torch.ones(3)]
    lr = torch.tensor(0.1, requires_grad=True)  # allowed; in place it is read as a float
    adam_update([ws[0]], [torch.ones(3)], lr, [torch.zeros(3)], [torch.zeros(3)], 1)
    adam_update([ws[1]], [torch.ones(3)], 0.1, [torch.zeros(3)], [torch.zeros(3)], 1)
    torch.testing.assert_close(ws[0], ws[1])
