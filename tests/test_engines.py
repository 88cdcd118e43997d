"""The fused torch step against autograd, and the torch engine against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_cfg, requires_cuda
from quadnet.crosscheck import check
from quadnet.data import make_dataset
from quadnet.model import initial_params
from quadnet.reference import NumpyEngine, softmax
from quadnet.torch_engine import TorchEngine

CASES = [
    dict(hidden_dim=50, lr=1e-3, reg=1e-3, momentum=0.0, seed=1, init="normal"),
    dict(hidden_dim=7, lr=0.05, reg=0.0, momentum=0.9, seed=3, init="torch"),
    dict(hidden_dim=1, lr=0.2, reg=0.1, momentum=0.5, seed=0, init="normal"),
]


def _engines(case, dtype, steps=("fused", "autograd"), device="cpu", data="seed"):
    cfg = make_cfg(f"data={data}")
    d = make_dataset(cfg.data)
    p = initial_params(case["hidden_dim"], case["seed"], case["init"])
    opt = dict(lr=case["lr"], reg=case["reg"], momentum=case["momentum"], dtype=dtype)
    return d, {s: TorchEngine(p, d.x_train, d.y_train, device=torch.device(device), step=s, **opt) for s in steps}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fused_step_equals_autograd(case, dtype, tol):
    _, eng = _engines(case, dtype, data="sampled")
    for e in eng.values():
        assert e.train_steps(300, lambda: False) == (300, False)
    a, b = eng["fused"].numpy_params(), eng["autograd"].numpy_params()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol * max(1.0, np.abs(b[k]).max()))
    ma, mb = eng["fused"].momentum_buffers(), eng["autograd"].momentum_buffers()
    if case["momentum"]:
        for k in ma:
            np.testing.assert_allclose(ma[k], mb[k], rtol=0, atol=tol * max(1.0, np.abs(mb[k]).max()))
    else:
        assert ma is None and mb is None


@pytest.mark.parametrize("case", CASES)
def test_torch_engine_equals_numpy_engine(case):
    d, eng = _engines(case, "float64", steps=("fused",))
    p = initial_params(case["hidden_dim"], case["seed"], case["init"])
    ref = NumpyEngine(
        p, d.x_train, d.y_train, lr=case["lr"], reg=case["reg"], momentum=case["momentum"], dtype="float64"
    )
    ref.train_steps(500, lambda: False)
    eng["fused"].train_steps(500, lambda: False)
    np.testing.assert_allclose(
        softmax(eng["fused"].logits(d.x_test)), softmax(ref.logits(d.x_test)), rtol=0, atol=1e-12
    )


def test_divergence_is_reported_at_the_first_non_finite_loss():
    case = dict(hidden_dim=50, lr=1e6, reg=0.0, momentum=0.0, seed=1, init="normal")
    d, eng = _engines(case, "float64")
    p = initial_params(50, 1, "normal")
    ref = NumpyEngine(p, d.x_train, d.y_train, lr=1e6, reg=0.0, momentum=0.0, dtype="float64")
    results = {name: e.train_steps(1000, lambda: False) for name, e in {**eng, "numpy": ref}.items()}
    done = {r[0] for r in results.values()}
    assert all(r[1] for r in results.values()) and len(done) == 1 and done.pop() < 1000


def test_stop_request_ends_after_the_current_step():
    _, eng = _engines(CASES[0], "float64", steps=("fused",))
    calls = []

    def stop():
        calls.append(1)
        return len(calls) == 5

    assert eng["fused"].train_steps(100, stop) == (5, False)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["momentum=0.9", "lr=0.01"],
        ["hidden_dim=3", "reg=0.1", "init=torch"],
        ["data=sampled", "data.n_train=64", "hidden_dim=20", "lr=0.05"],
    ],
)
def test_crosscheck_agrees_within_1e9(overrides):
    r = check(make_cfg("epochs=400", "log_every=50", *overrides))
    for figures in r["engines"].values():
        assert max(figures.values()) < 1e-9
    assert max(r["gradients_vs_autograd"].values()) < 1e-9
    assert r["gradient_check_rel_error"] < 1e-7


# ---------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-5)])
@pytest.mark.parametrize("graph", [True, False])
def test_cuda_fused_step_equals_cpu(dtype, tol, graph):
    case = CASES[1]
    d, cpu = _engines(case, dtype, steps=("fused",))
    p = initial_params(case["hidden_dim"], case["seed"], case["init"])
    gpu = TorchEngine(
        p,
        d.x_train,
        d.y_train,
        lr=case["lr"],
        reg=case["reg"],
        momentum=case["momentum"],
        dtype=dtype,
        device=torch.device("cuda"),
        step="fused",
        cuda_graph=graph,
    )
    for e in (cpu["fused"], gpu):
        assert e.train_steps(250, lambda: False) == (250, False)
        assert e.train_steps(250, lambda: False) == (250, False)
    np.testing.assert_allclose(softmax(gpu.logits(d.x_test)), softmax(cpu["fused"].logits(d.x_test)), rtol=0, atol=tol)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_reports_divergence_step_exactly():
    case = dict(hidden_dim=50, lr=1e6, reg=0.0, momentum=0.0, seed=1, init="normal")
    d, cpu = _engines(case, "float64", steps=("fused",))
    p = initial_params(50, 1, "normal")
    gpu = TorchEngine(
        p,
        d.x_train,
        d.y_train,
        lr=1e6,
        reg=0.0,
        momentum=0.0,
        dtype="float64",
        device=torch.device("cuda"),
        step="fused",
        cuda_graph=True,
    )
    assert gpu.train_steps(1000, lambda: False) == cpu["fused"].train_steps(1000, lambda: False)
