"""quadnet reproduces the seed program: its final probabilities, and its failure at 100 epochs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SEED_PROBS, make_cfg, probs_of, seed_program
from quadnet.train import train


@pytest.mark.parametrize("engine", ["numba", "torch", "numpy"])
def test_seed_job_reproduces_the_seed_matrix(engine, tmp_path):
    s = train(make_cfg(f"engine={engine}"), run_dir=tmp_path)
    assert s["status"] == "completed" and s["epoch"] == 10000
    np.testing.assert_allclose(probs_of(s), SEED_PROBS, rtol=0, atol=1e-9)
    assert [p["predicted"] for p in s["predictions"]] == [1, 2, 3, 4]
    assert s["test_accuracy"] == 1.0 and s["train_accuracy"] == 1.0


def test_numpy_engine_is_bit_for_bit_the_seed(tmp_path):
    """Bit for bit against the seed's program run on this machine; to 1e-12 against the recorded matrix."""
    s = train(make_cfg("engine=numpy"), run_dir=tmp_path)
    here = seed_program()
    assert np.array_equal(probs_of(s), here)
    np.testing.assert_allclose(here, SEED_PROBS, rtol=0, atol=1e-12)


def test_the_bit_for_bit_check_can_fail(tmp_path):
    """One step fewer changes the last bits: the comparison above is not vacuous."""
    s = train(make_cfg("engine=numpy", "epochs=9999"), run_dir=tmp_path)
    assert not np.array_equal(probs_of(s), seed_program())
    assert np.array_equal(probs_of(s), seed_program(9999))


def test_torch_autograd_step_reproduces_the_seed_matrix(tmp_path):
    s = train(make_cfg("step=autograd"), run_dir=tmp_path)
    np.testing.assert_allclose(probs_of(s), SEED_PROBS, rtol=0, atol=1e-9)


@pytest.mark.parametrize("engine", ["numba", "torch", "numpy"])
def test_100_epochs_reproduces_the_articles_failure(engine, tmp_path):
    s = train(make_cfg(f"engine={engine}", "epochs=100"), run_dir=tmp_path)
    assert [p["predicted"] for p in s["predictions"]] == [3, 1, 4, 2]
    assert s["test_accuracy"] == 0.0


def test_metrics_row_before_last_update_is_the_seeds_last_printed_loss(tmp_path):
    """The seed prints the loss before each update; its last print is our row at epoch 9999."""
    s = train(make_cfg("engine=numpy", "log_every=9999"), run_dir=tmp_path)
    import csv

    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 9999, 10000]
    assert float(rows[1]["loss"]) == pytest.approx(0.003966347544057221, rel=1e-12)
    assert s["final_loss"] < float(rows[1]["loss"])


@pytest.mark.parametrize("seeds", [[1, 0, 1], [7, 2**31 - 1, 7]])
def test_initial_weights_are_the_seeds_randomstate_draws_in_any_order(seeds):
    """The seed program's draw: RandomState(seed).randn for W1, then W2; biases zero."""
    from quadnet.model import initial_params

    for seed in seeds:
        p = initial_params(50, seed, "normal")
        rs = np.random.RandomState(seed)
        np.testing.assert_array_equal(p["W1"], rs.randn(2, 50))
        np.testing.assert_array_equal(p["W2"], rs.randn(50, 4))
        assert not p["b1"].any() and not p["b2"].any()
