"""The NumPy engine's layers against finite differences, and its gradients against autograd."""

from __future__ import annotations

import numpy as np
import pytest

from quadnet.crosscheck import autograd_grads
from quadnet.data import SEED_TRAIN, quadrant_class
from quadnet.engines import numpy as ref
from quadnet.model import initial_params

rng = np.random.default_rng(0)


def num_grad_of_sum(f, x, dout):
    """Numerical gradient of sum(f(x) * dout) w.r.t. x."""
    return ref.eval_numerical_gradient(lambda _: float(np.sum(f(x) * dout)), x)


def test_affine_backward_matches_numerical():
    x, w, b = rng.normal(size=(5, 3)), rng.normal(size=(3, 4)), rng.normal(size=4)
    dout = rng.normal(size=(5, 4))
    _, cache = ref.affine_forward(x, w, b)
    dx, dw, db = ref.affine_backward(dout, cache)
    assert ref.rel_error(dx, num_grad_of_sum(lambda v: ref.affine_forward(v, w, b)[0], x, dout)) < 1e-9
    assert ref.rel_error(dw, num_grad_of_sum(lambda v: ref.affine_forward(x, v, b)[0], w, dout)) < 1e-9
    assert ref.rel_error(db, num_grad_of_sum(lambda v: ref.affine_forward(x, w, v)[0], b, dout)) < 1e-9
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape


def test_relu_backward_matches_numerical():
    x = rng.normal(size=(6, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink, where the derivative is not defined
    dout = rng.normal(size=x.shape)
    _, cache = ref.relu_forward(x)
    dx = ref.relu_backward(dout, cache)
    assert ref.rel_error(dx, num_grad_of_sum(lambda v: ref.relu_forward(v)[0], x, dout)) < 1e-9


def test_softmax_loss_gradient_and_value():
    scores, y = rng.normal(size=(7, 4)), rng.integers(0, 4, size=7)
    _, dscores = ref.softmax_loss(scores, y)
    num = ref.eval_numerical_gradient(lambda s: ref.softmax_loss(s, y)[0], scores.copy())
    assert ref.rel_error(dscores, num) < 1e-8
    # uniform scores: the loss is log(4)
    assert ref.softmax_loss(np.zeros((3, 4)), np.array([0, 1, 2]))[0] == pytest.approx(np.log(4))


@pytest.mark.parametrize("hidden_dim,reg,seed", [(50, 1e-3, 1), (3, 0.0, 2), (17, 0.1, 5)])
def test_full_gradient_check(hidden_dim, reg, seed):
    params = initial_params(hidden_dim, seed, "normal")
    x, y = SEED_TRAIN, quadrant_class(SEED_TRAIN)
    _, grads = ref.loss_and_grads({k: v.copy() for k, v in params.items()}, x, y, reg)
    for k in params:
        num = ref.eval_numerical_gradient(lambda _: ref.objective(params, x, y, reg), params[k])
        assert ref.rel_error(grads[k], num) < 1e-7, k


@pytest.mark.parametrize("init", ["normal", "torch"])
@pytest.mark.parametrize("reg", [0.0, 1e-3, 0.5])
def test_numpy_gradients_equal_autograd(init, reg):
    x = rng.uniform(-3, 3, size=(32, 2))
    y = quadrant_class(x)
    params = initial_params(11, 3, init)
    _, grads = ref.loss_and_grads({k: v.copy() for k, v in params.items()}, x, y, reg)
    auto = autograd_grads(params, x, y, reg)
    for k in params:
        np.testing.assert_allclose(grads[k], auto[k], rtol=0, atol=1e-14)


def test_gradient_check_catches_a_wrong_gradient():
    """The check is not vacuous: a deliberately broken backward fails it."""
    params = initial_params(8, 0, "normal")
    x, y = SEED_TRAIN, quadrant_class(SEED_TRAIN)
    _, grads = ref.loss_and_grads({k: v.copy() for k, v in params.items()}, x, y, 0.01)
    num = ref.eval_numerical_gradient(lambda _: ref.objective(params, x, y, 0.0), params["W1"])
    assert ref.rel_error(grads["W1"], num) > 1e-4  # reg term missing from the numerical side


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_update_rules_match_torch_optim(rule):
    import torch

    p0, grads = rng.normal(size=5), [rng.normal(size=5) for _ in range(3)]
    h = {"lr": 0.1, "momentum": 0.9, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8}
    update, names = ref.UPDATES[rule]
    params, state = {"w": p0.copy()}, {n: {"w": np.zeros(5)} for n in names}
    for t, g in enumerate(grads, 1):
        update(params, {"w": g}, state, h, t)
    w = torch.tensor(p0, requires_grad=True)
    opt = (
        torch.optim.SGD([w], lr=0.1, momentum=0.9)
        if rule == "sgd"
        else torch.optim.Adam([w], lr=0.1, betas=(0.8, 0.99))
    )
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=0, atol=1e-15)
