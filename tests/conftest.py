from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quadnet.config import TrainConfig, compose, validate

ROOT = Path(__file__).resolve().parent.parent

# The seed program's final test-point probabilities (10,000 epochs, float64), recorded on one
# machine. NumPy's BLAS picks its kernels per CPU, so the last bits differ between machines:
# compare against these to a tolerance, and bit for bit only against `seed_program()`.
SEED_PROBS = np.array(
    [
        [9.9999996480792153e-01, 2.6092473613575218e-09, 3.2582827079547004e-08, 4.0772546836305001e-15],
        [1.3764366147275821e-05, 9.9990990186189510e-01, 7.6301339670452776e-05, 3.2432287277900430e-08],
        [1.1998533757244659e-12, 2.2817835212991019e-06, 9.9991551044545979e-01, 8.2207769819041718e-05],
        [4.1896618430600698e-07, 1.0771369838029900e-05, 2.8329811089093610e-05, 9.9996047985288850e-01],
    ]
)


def seed_program(epochs: int = 10000) -> np.ndarray:
    """The seed article's program, re-run here in plain NumPy: its final test probabilities (4, 4).

    The same operations in the same order as the article's loop (written anew), so that a
    bit-for-bit comparison is made between two computations on the same machine.
    """
    x = np.array([[2, 1], [-1, 1], [-1, -1], [1, -1]])
    t = np.arange(4)
    rs = np.random.RandomState(1)
    w1, w2 = rs.randn(2, 50), rs.randn(50, 4)
    b1, b2 = np.zeros((1, 50)), np.zeros((1, 4))
    reg = lr = 0.001
    for _ in range(epochs):
        h = np.maximum(0, np.dot(x, w1) + b1)
        z = np.dot(h, w2) + b2
        probs = np.exp(z - np.max(z, axis=1, keepdims=True))
        probs /= np.sum(probs, axis=1, keepdims=True)
        dz = probs.copy()
        dz[np.arange(4), t] -= 1
        dz /= 4
        dh = np.dot(dz, w2.T)
        dw2, db2 = np.dot(h.T, dz), np.sum(dz, axis=0, keepdims=True)
        dh[h <= 0] = 0
        dw1, db1 = np.dot(x.T, dh), np.sum(dh, axis=0, keepdims=True)
        dw2 += reg * w2
        dw1 += reg * w1
        w2 += -lr * dw2
        b2 += -lr * db2
        w1 += -lr * dw1
        b1 += -lr * db1
    test = np.array([[2, 2], [-2, 2], [-2, -2], [2, -2]])
    z = np.dot(np.maximum(0, np.dot(test, w1) + b1), w2) + b2
    probs = np.exp(z - np.max(z, axis=1, keepdims=True))
    return probs / np.sum(probs, axis=1, keepdims=True)


@pytest.hookimpl(optionalhook=True)  # (pytest without xdist: -o addopts= runs the tests one at a time)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): a worker for each CPU this process may use, as quadnet counts them
    (its affinity and cgroup quota, not the machine's count), at most 8 (each holds torch and spawns commands)."""
    from quadnet.engines import usable_cpus

    return min(usable_cpus(), 8)


@pytest.fixture(scope="session", autouse=True)
def numba_kernels_cached() -> None:
    """The numba engine's kernels compiled into numba's on-disk cache before any test (10-15 s once
    after an install): a command that a test starts and signals a second later has then begun to
    train, as it has after a user's first run."""
    if importlib.util.find_spec("numba") is not None:
        from quadnet.data import make_dataset
        from quadnet.engines import build
        from quadnet.loop import start_state

        build([TrainConfig()], make_dataset(TrainConfig().data), [start_state(TrainConfig())], "cpu")


@pytest.fixture(
    params=[
        pytest.param("cpu", marks=pytest.mark.cuda),
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """The device a GPU test runs on: the CPU in every run, so that its body cannot rot unseen on machines
    without a GPU, and CUDA where there is one. Both are marked `cuda`: `pytest -m cuda` runs them."""
    return request.param


def make_cfg(*overrides: str) -> TrainConfig:
    """A validated config, composed exactly as the CLI composes it. Quiet by default. A test that
    asks for the numba engine skips where numba is not installed (the torch engine is the rest)."""
    if "engine=numba" in overrides and importlib.util.find_spec("numba") is None:
        pytest.skip("needs numba: pip install -e '.[fast]'")
    return validate(compose(["progress=false", "plots=false", *overrides]))


def probs_of(summary: dict[str, Any]) -> np.ndarray:
    return np.array([p["probs"] for p in summary["predictions"]])


def call_main(main: Any, capsys: Any, *argv: Any) -> tuple[Any, str, str]:
    """(exit code, stdout, stderr) of a command's main(argv) run in this process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(
    *args: str, cwd: Path, module: str = "quadnet.train", timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` as a user would, in cwd."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def read_metrics(path: Path) -> list[dict[str, float]]:
    """A run's metrics.csv as rows of floats (a NaN, a figure the run has not, as None: equal to itself)."""
    import csv

    with open(path, newline="") as f:
        return [{k: None if v == "nan" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
