"""The fused step against autograd and torch.optim, the numba engine against the torch engine, batched
against one by one, torch against the NumPy oracle."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import call_main, make_cfg, run_cli
from quadnet import optim
from quadnet.crosscheck import check
from quadnet.data import make_dataset
from quadnet.engines import build
from quadnet.loop import start_state

CASES = [
    dict(hidden_dim=50, lr=1e-3, reg=1e-3, momentum=0.0, seed=1, init="normal"),
    dict(hidden_dim=7, lr=0.05, reg=0.0, momentum=0.9, seed=3, init="torch"),
    dict(hidden_dim=1, lr=0.2, reg=0.1, momentum=0.5, seed=0, init="normal"),
    dict(hidden_dim=9, lr=0.01, reg=0.01, seed=2, init="normal", optimizer="adam", beta1=0.8, beta2=0.99, eps=1e-6),
]


def _run(cfgs, steps=300, device="cpu", data="seed", stop=lambda: False):
    """Train configs as one batch; return the engine's (steps done, first bad) and each job's state."""
    cfgs = [dataclasses.replace(c, data=make_cfg(f"data={data}").data) for c in cfgs]
    engine = build(cfgs, make_dataset(cfgs[0].data), [start_state(c) for c in cfgs], device)
    out = engine.run(steps, stop)
    return out, engine.export(list(range(len(cfgs)))), engine


def _close(a, b, tol):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol * max(1.0, np.abs(b[k]).max()), err_msg=k)


def _torch_optim(cfg, steps):
    """The reference semantics, written out here: autograd through model.forward and torch.optim's SGD or
    Adam (weight decay on the weights, not the biases) on nn.Parameters, one step at a time."""
    import torch.nn.functional as F

    from quadnet import model

    d, dtype = make_dataset(cfg.data), getattr(torch, cfg.dtype)
    params = [torch.nn.Parameter(t) for t in model.stack([start_state(cfg)["params"]], cfg.hidden_dim, dtype, "cpu")]
    groups = [{"params": params[::2], "weight_decay": cfg.reg}, {"params": params[1::2], "weight_decay": 0.0}]
    opt = (torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd" else
           torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps))  # fmt: skip
    x, y = torch.as_tensor(d.x_train, dtype=dtype), torch.as_tensor(d.y_train)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model.forward(params, x)[1][0], y).backward()
        opt.step()
    return model.unstack(params, [0], [cfg.hidden_dim])[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.get('optimizer', 'sgd')}-h{c['hidden_dim']}")
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fused_step_equals_autograd_and_torch_optim(case, dtype, tol):
    """The hand-written gradients (step=fused) and autograd's (step=autograd), each with quadnet's update
    rules, against autograd with torch.optim's rules."""
    fused, autograd = (
        make_cfg(*(f"{k}={v}" for k, v in case.items()), f"dtype={dtype}", f"step={s}", "engine=torch", "data=sampled")
        for s in ("fused", "autograd")
    )
    (done_f, _), (sf,), _ = _run([fused], data="sampled")
    (done_a, _), (sa,), _ = _run([autograd], data="sampled")
    assert done_f == done_a == 300
    _close(sf["params"], sa["params"], tol)
    _close(sf["params"], _torch_optim(fused, 300), tol)
    buffers = optim.buffers(fused.optimizer, {"momentum": fused.momentum})
    assert set(sf["optimizer"]) == set(sa["optimizer"]) == set(buffers)
    for name in sf["optimizer"]:
        _close(sf["optimizer"][name], sa["optimizer"][name], tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.get('optimizer', 'sgd')}-h{c['hidden_dim']}")
def test_torch_engine_equals_numpy_oracle(case):
    cfg = make_cfg(*(f"{k}={v}" for k, v in case.items()), "engine=torch")
    _, (torch_state,), _ = _run([cfg], steps=500)
    _, (numpy_state,), _ = _run([dataclasses.replace(cfg, engine="numpy")], steps=500)
    _close(torch_state["params"], numpy_state["params"], 1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.get('optimizer', 'sgd')}-h{c['hidden_dim']}")
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("data", ["seed", "sampled"])
def test_numba_engine_equals_the_torch_engine(case, dtype, tol, data):
    """The compiled step (jobs in SIMD lanes) against the torch step: weights, buffers, metrics, steps."""
    cfgs = [
        make_cfg(*(f"{k}={v}" for k, v in case.items()), f"dtype={dtype}", f"engine={e}") for e in ("numba", "torch")
    ]
    (done_n, first_n), (sn,), numba_engine = _run(cfgs[:1], data=data)
    (done_t, first_t), (st,), torch_engine = _run(cfgs[1:], data=data)
    assert numba_engine.name == "numba" and (done_n, first_n) == (done_t, first_t) == (300, [-1])
    _close(sn["params"], st["params"], tol)
    assert set(sn["optimizer"]) == set(st["optimizer"]) and sn["step"] == st["step"]
    for name in sn["optimizer"]:
        _close(sn["optimizer"][name], st["optimizer"][name], tol)
    for a, b in zip(numba_engine.metrics(), torch_engine.metrics(), strict=True):
        assert a == pytest.approx(b, abs=tol, nan_ok=True)


@pytest.mark.parametrize("engine", ["torch", "numba"])
def test_a_batch_equals_each_job_alone(engine):
    """Different widths, seeds, inits and every hyperparameter in one batch, each equal to its own run."""
    cfgs = [
        make_cfg(*(f"{k}={v}" for k, v in case.items() if k != "optimizer"), f"engine={engine}") for case in CASES[:3]
    ]
    cfgs += [dataclasses.replace(cfgs[0], seed=s, lr=0.002) for s in range(70)]  # (two blocks of lanes)
    _, batched, _ = _run(cfgs, data="sampled")
    for c, b in [*[*zip(cfgs, batched, strict=True)][:4], (cfgs[-1], batched[-1])]:  # (the last: in a block of its own)
        _, (alone,), _ = _run([c], data="sampled")
        _close(b["params"], alone["params"], 1e-12)
    adams = [
        make_cfg(f"lr={lr}", "optimizer=adam", f"hidden_dim={h}", f"engine={engine}")
        for lr, h in ((0.01, 5), (0.003, 8))
    ]
    _, batched, _ = _run(adams)
    for c, b in zip(adams, batched, strict=True):
        _close(b["params"], _run([c])[1][0]["params"], 1e-12)


def test_divergence_is_found_at_the_same_step_by_every_engine():
    results = {}
    engines = {"fused": ["engine=torch"], "autograd": ["engine=torch", "step=autograd"], "numpy": ["engine=numpy"]}
    for name, extra in {**engines, "numba": ["engine=numba"]}.items():
        (_, first), _, _ = _run([make_cfg("lr=1e6", *extra)], steps=1000)
        results[name] = first[0]
    assert len(set(results.values())) == 1 and 0 <= results["fused"] < 1000, results
    (_, first), _, _ = _run([make_cfg(f"lr={lr}", "engine=numba") for lr in (0.001, 1e6, 3e5)], steps=1000)
    assert first[0] == -1 and first[1] == results["numba"] and first[2] > 0  # each job its own step


def test_stop_request_ends_after_the_current_step():
    calls = []

    def stop():
        calls.append(1)
        return len(calls) == 5

    (done, first), _, _ = _run([make_cfg("engine=torch")], steps=100, stop=stop)
    assert (done, first) == (5, [-1])
    calls.clear()  # the numba engine asks between its calls of many steps
    (done, first), _, _ = _run([make_cfg("engine=numba")], steps=100_000, stop=stop)
    assert 0 < done < 100_000 and first == [-1]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["momentum=0.9", "lr=0.01"],
        ["hidden_dim=3", "reg=0.1", "init=torch"],
        ["data=sampled", "data.n_train=64", "hidden_dim=20", "lr=0.05"],
        ["optimizer=adam", "lr=0.01", "beta1=0.5"],
    ],
)
def test_crosscheck_agrees_within_1e9(overrides):
    r = check(make_cfg("epochs=400", "log_every=50", *overrides))
    for figures in r["engines"].values():
        assert max(figures.values()) < 1e-9
    assert max(r["gradients_vs_autograd"].values()) < 1e-9
    assert r["gradient_check_rel_error"] < 1e-7


# ---------------------------------------------------------------------------- on a device (CPU, and CUDA)


def _numpy(cfg, steps):
    """One job through the NumPy engine: (steps done, first bad) and its state, the reference on any device."""
    (done, first), (state,), _ = _run([dataclasses.replace(cfg, engine="numpy")], steps=steps)
    return done, first, state


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-5)])
@pytest.mark.parametrize("graph", [True, False])
def test_torch_batch_on_a_device_equals_numpy(dtype, tol, graph, device):
    """The torch engine's batch on the device (replaying CUDA graphs there if asked) against each job in NumPy."""
    cfgs = [make_cfg(*(f"{k}={v}" for k, v in c.items()), f"dtype={dtype}", f"cuda_graph={graph}") for c in CASES[1:3]]
    (done, _), states, _ = _run([dataclasses.replace(c, engine="torch") for c in cfgs], steps=260, device=device)
    assert done == 260
    for cfg, state in zip(cfgs, states, strict=True):
        steps, _, ref = _numpy(cfg, 260)
        assert steps == 260
        _close(state["params"], ref["params"], tol)


def test_divergence_step_is_reported_exactly_on_a_device(device):
    """On CUDA through graph replays, on the CPU through the ordinary path: the step NumPy finds."""
    cfg = make_cfg("lr=1e6", "engine=torch")
    (_, first), _, _ = _run([cfg], steps=1000, device=device)
    _, first_numpy, _ = _numpy(cfg, 1000)
    assert first == first_numpy and first[0] >= 0


def test_crosscheck_from_the_cli_passes_within_its_tolerance_and_fails_past_it(tmp_path):
    ok = run_cli("epochs=50", "log_every=10", module="quadnet.crosscheck", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1].startswith("PASS"), ok.stderr
    bad = run_cli("epochs=50", "log_every=10", "--tol", "1e-30", module="quadnet.crosscheck", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stdout.strip().splitlines()[-1].startswith("FAIL")


def test_crosscheck_judges_divergence_by_its_epoch_and_resumes_from_a_checkpoint(tmp_path, capsys, monkeypatch):
    from quadnet import crosscheck
    from quadnet.checkpoint import load
    from quadnet.config import ConfigError, compose, validate
    from quadnet.train import train

    r = run_cli("lr=1e30", "epochs=50", module="quadnet.crosscheck", cwd=tmp_path)
    assert r.returncode == 0 and "every engine diverged at epoch 6: they agree" in r.stdout, r.stdout
    apart = {"epochs": 9, "diverged": {"numpy": 6, "torch/fused": None}, "gradient_check_rel_error": 0.0}
    figures = dict.fromkeys(("loss_along_the_way", "final_weights", "test_probs"), 0.0)
    apart |= {"engines": {"torch/fused": figures}, "gradients_vs_autograd": {"initial": 0.0, "final": 0.0}}
    monkeypatch.setattr(crosscheck, "check", lambda *_: apart)
    code, out, _ = call_main(crosscheck.main, capsys, "epochs=9")
    assert code == 1 and "diverged at different epochs: numpy at epoch 6, torch/fused never" in out
    train(make_cfg("epochs=30", "hidden_dim=7", "momentum=0.9", "lr=0.01"), run_dir=tmp_path / "r")
    cfg, state = crosscheck.resumed(validate(compose([f"resume={tmp_path / 'r'}", "epochs=5"])), ["epochs=5"])
    ck = load(tmp_path / "r")
    ck["momentum"] = ck["state"]["optimizer"]["momentum"]
    assert (cfg.hidden_dim, cfg.momentum, cfg.epochs) == (7, 0.9, 5) and state["step"] == ck["state"]["step"]
    for got, want in ((state["params"], ck["params"]), (state["optimizer"]["momentum"], ck["momentum"])):
        assert all(np.array_equal(got[k], v) for k, v in want.items()) and want
    with pytest.raises(ConfigError, match="lr=3 is not allowed with resume="):
        crosscheck.resumed(validate(compose([f"resume={tmp_path / 'r'}", "lr=3"])), ["lr=3"])
    code, out, _ = call_main(crosscheck.main, capsys, "--help")
    assert code == 0 and "python -m quadnet.crosscheck [overrides]" in out and "``" not in out
    for key in ("dtype=float32", "device=cuda", "+engine=torch"):  # (keys it sets itself are not silently ignored)
        code, _, err = call_main(crosscheck.main, capsys, key)
        assert code == 2 and err.startswith(f"error: {key} is not allowed: crosscheck runs every engine"), err


@pytest.mark.parametrize(
    "args",
    [["step", "--jobs", "abc"], ["step", "--jobs", "0,8"], ["sweep", "--busy", "-1"], ["sklearn", "--seeds", "0"]],
)
def test_bench_refuses_bad_sizes_in_one_line(args, tmp_path):
    r = run_cli(*args, module="quadnet.bench", cwd=tmp_path)
    assert r.returncode == 2 and "must be whole numbers >= 1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("step", "--jobs", "8,99999999999", module="quadnet.bench", cwd=tmp_path)
    assert r.returncode == 2 and "takes batches of up to 16384 jobs" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("sweep", "--device", "bogus", module="quadnet.bench", cwd=tmp_path)  # (before any job runs)
    assert r.returncode == 2 and r.stderr.startswith("error: device='bogus' is not allowed: choose auto, cpu"), r.stderr
    if not torch.backends.mps.is_available():  # (a device that is not here)
        r = run_cli("sweep", "--device", "mps", module="quadnet.bench", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: device='mps' is not available"), r.stderr


def test_without_a_writable_cache_dir_the_kernels_compile_in_the_process_and_train(tmp_path):
    """numba's on-disk cache (next to the source, else the user's cache dir) is a convenience: where no
    cache dir can be written, the kernels compile in each process, with one warning."""
    pytest.importorskip("numba")
    code = (
        "import numba.core.caching as c\n"
        "c.CacheImpl._locator_classes = []  # no dir is writable\n"
        "import quadnet.engines.numba\n"
        "print(len(quadnet.engines.numba._uncached))\n"
        "from quadnet.train import train\n"
        "from quadnet.config import TrainConfig\n"
        "s = train(TrainConfig(epochs=100, plots=False, progress=False, engine='numba'), run_dir='r')\n"
        "print(s['engine'], s['status'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[1:] == ["numba", "completed"], r.stderr[-2000:]
    assert int(r.stdout.split()[0]) == 4 and r.stderr.count("numba cannot write its cache") == 1  # (one line)


def test_auto_trains_many_classes_and_one_big_job_with_torch():
    """engine=auto: numba up to NUMBA_MAX_CLASSES classes; beyond, its loops over every class lose to
    torch. One job with much work a step (a big table) goes to torch's matrix products too; many
    jobs stay with numba, whose loops are vectorized over them."""
    pytest.importorskip("numba")
    from types import SimpleNamespace

    from quadnet.config import TrainConfig
    from quadnet.engines import NUMBA_MAX_CLASSES, SMALL, engine_name

    def data(n: int, d: int, c: int) -> SimpleNamespace:
        return SimpleNamespace(x_train=np.zeros((n, d)), num_classes=c)

    picks = [engine_name(TrainConfig(), "cpu", data(4, 2, c)) for c in (4, NUMBA_MAX_CLASSES, NUMBA_MAX_CLASSES + 1)]
    assert picks == ["numba", "numba", "torch/fused"]
    big = data(SMALL // (2 + 4) // 50 + 1, 2, 4)
    assert [engine_name(TrainConfig(), "cpu", big, jobs) for jobs in (1, 2)] == ["torch/fused", "numba"]


def test_bench_sklearn_times_the_same_grid_as_one_sweep_and_as_grid_search(tmp_path):
    pytest.importorskip("sklearn")
    r = run_cli("sklearn", "--table", "iris", "--seeds", "2", "--epochs", "20", module="quadnet.bench", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    names = ["quadnet batched sweep", "sklearn GridSearchCV"]
    rows = {n: line.split(n)[1].split() for line in r.stdout.splitlines()[3:] for n in names if n in line}
    assert list(rows) == names and len(r.stdout.splitlines()) == 5, r.stdout
    for row in rows.values():  # configs, seconds, train_s, the best (seed, hidden_dim, lr), epochs, val/test acc, ratio
        assert row[0] == "12" and float(row[1]) > 0 and row[3].startswith("seed=") and 0 <= float(row[-2]) <= 1
    assert float(rows["quadnet batched sweep"][-1]) == 1 and float(rows["sklearn GridSearchCV"][-1]) > 0
    assert r.stdout.splitlines()[2].split()[-1] == "time_vs_quadnet", r.stdout


def test_bench_sklearn_without_scikit_learn_says_how_to_install_it(capsys, monkeypatch):
    from quadnet import bench

    monkeypatch.setitem(sys.modules, "sklearn", None)  # (an import of it raises ImportError)
    code, out, err = call_main(bench.main, capsys, "sklearn", "--seeds", "1")
    assert (
        code == 2
        and out == ""
        and err == "error: bench sklearn needs scikit-learn, which quadnet does not install: pip install scikit-learn\n"
    )


def test_bench_sweep_prints_the_launchers_side_by_side_with_or_without_job_dirs(tmp_path):
    for extra in ([], ["--table-only"]):
        args = ["sweep", "--jobs", "3", "--epochs", "5", "--sample", "2", *extra]
        r = run_cli(*args, module="quadnet.bench", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        head, row = r.stdout.splitlines()[-2:]
        cells = dict(zip(head.split(), row.split(), strict=True))
        # (nan, not a negative ratio, where a busy machine's noise hides the basic launcher's cost of a job)
        assert cells["jobs"] == cells["done"] == "3" and not float(cells["batched_faster_per_job"]) <= 0
