"""The real command line, as a user types it, and what a run leaves behind."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SEED_PROBS, make_cfg, read_metrics, run_cli
from quadnet import checkpoint, exits
from quadnet.config import ConfigError
from quadnet.device import resolve_device
from quadnet.exits import Stopped
from quadnet.train import train

SUMMARY_KEYS = {
    "final_loss",
    "train_accuracy",
    "test_accuracy",
    "train_seconds",
    "epochs",
    "device",
    "dtype",
    "engine",
    "status",
    "predictions",
    "test_loss",
    "epoch",
    "config",
    "run_dir",
}


def test_default_run_from_the_cli_writes_every_artifact(tmp_path):
    r = run_cli("hidden_dim=50", "epochs=10000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for name in (
        ".hydra/config.yaml",
        "metrics.csv",
        "summary.json",
        "loss.png",
        "decision_regions.png",
        "train.log",
        "checkpoint.npz",
    ):
        assert (run / name).is_file(), name
    assert not (run / "model.pt").exists()  # (the checkpoint of a completed run is its model)
    s = json.loads((run / "summary.json").read_text())
    assert set(s["versions"]) == {"quadnet", "git_commit", "python", "torch", "numpy", "hydra-core", "omegaconf"}
    assert set(s) >= SUMMARY_KEYS
    engine = "numba" if importlib.util.find_spec("numba") else "torch/fused"
    assert (
        s["status"] == "completed" and s["device"] == "cpu" and s["engine"] == engine and s["classes"] == [1, 2, 3, 4]
    )
    probs = np.array([p["probs"] for p in s["predictions"]])
    np.testing.assert_allclose(probs, SEED_PROBS, rtol=0, atol=1e-9)
    assert s["predictions"][0]["point"] == [2.0, 2.0] and s["predictions"][0]["true"] == 1
    # what the user sees: the device, the table, the figures and the run dir
    assert "on cpu (float64)" in r.stdout
    assert "p(predicted)" in r.stdout and "test accuracy 100.0%" in r.stdout
    assert f"run dir: {run}" in r.stdout or "run dir: outputs/" in r.stdout
    # the log file holds the same lines
    assert "test accuracy 100.0%" in (run / "train.log").read_text()
    rows = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in rows][:3] == [0, 100, 200] and rows[-1]["epoch"] == 10000
    assert rows[-1]["loss"] == pytest.approx(s["final_loss"]) and rows[-1]["test_loss"] == pytest.approx(s["test_loss"])
    m = checkpoint.load(run)
    assert m["config"]["hidden_dim"] == 50 and m["epoch"] == 10000


def test_hydra_run_dir_chooses_the_dir_and_epochs_100_fails_as_in_the_article(tmp_path):
    r = run_cli("epochs=100", "engine=numpy", f"hydra.run.dir={tmp_path}/mine", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "mine" / "summary.json").read_text())
    assert [p["predicted"] for p in s["predictions"]] == [3, 1, 4, 2]
    assert s["engine"] == "numpy"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_same_config_twice_gives_identical_summaries(dtype, engine, tmp_path):
    cfg = make_cfg(f"dtype={dtype}", f"engine={engine}", "epochs=2000", "data=sampled", "init=torch")
    a, b = train(cfg, run_dir=tmp_path / "a"), train(cfg, run_dir=tmp_path / "b")
    for s in (a, b):
        s.pop("train_seconds"), s.pop("run_dir")
    assert a == b
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()


def test_sampled_data_respects_margin_and_labels(tmp_path):
    from quadnet.data import make_dataset, quadrant_class

    d = make_dataset(make_cfg("data=sampled", "data.margin=0.5", "data.n_train=500").data)
    assert d.x_train.shape == (500, 2) and (np.abs(d.x_train) >= 0.5).all()
    assert (np.abs(d.x_train) <= 3.0).all() and set(d.y_train) == {0, 1, 2, 3}
    np.testing.assert_array_equal(
        quadrant_class(np.array([[1, 1], [-1, 1], [-1, -1], [1, -1], [0, 2]])), [0, 1, 2, 3, -1]
    )


def test_plots_off_and_progress_bar_on(tmp_path, capsys):
    train(make_cfg("epochs=50", "log_every=10", "progress=true"), run_dir=tmp_path)
    assert not (tmp_path / "loss.png").exists()
    assert len(read_metrics(tmp_path / "metrics.csv")) == 6


# ---------------------------------------------------------------------------- devices


def test_auto_device_is_cuda_else_mps_else_cpu():
    dev = resolve_device("auto")
    if torch.cuda.is_available():
        assert dev == "cuda:0"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        assert dev == "mps"
    else:
        assert dev == "cpu"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_cuda_is_an_error_not_a_fallback(tmp_path):
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match="not available"):
            resolve_device(name)
    r = run_cli("device=cuda", "epochs=1", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 2 and "device='cuda' is not available" in r.stderr


def test_missing_cuda_index_is_an_error():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="not available"):
        resolve_device(f"cuda:{n + 7}")


def test_numpy_engine_refuses_a_gpu(tmp_path):
    with pytest.raises(ConfigError, match="engine=numpy"):
        make_cfg("engine=numpy", "device=cuda")


def test_a_torch_run_on_a_device_matches_the_seed(tmp_path, device):
    s = train(make_cfg(f"device={device}", "engine=torch"), run_dir=tmp_path)
    assert s["device"].startswith(resolve_device(device)) and s["engine"].startswith("torch")
    np.testing.assert_allclose(np.array([p["probs"] for p in s["predictions"]]), SEED_PROBS, atol=1e-9)


def test_your_own_points_from_a_csv_and_one_line_for_a_bad_one(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(80, 2)) * 0.3 + np.repeat([[1, 1], [-1, 1], [-1, -1], [1, -1]], 20, axis=0)  # 4 blobs
    labels = np.repeat([1, 2, 3, 4], 20)
    lines = ["x,y,label"] + [f"{x},{y},{c}" for (x, y), c in zip(pts, labels, strict=True)]
    (tmp_path / "blobs.csv").write_text("\n".join(lines) + "\n")
    s = train(
        make_cfg("data=csv", f"data.path={tmp_path / 'blobs.csv'}", "epochs=300", "lr=0.05"), run_dir=tmp_path / "r"
    )
    assert s["status"] == "completed" and len(s["predictions"]) == 16 and s["test_accuracy"] >= 0.9  # a fifth held out
    (tmp_path / "test.csv").write_text("2,2,3\n-2,2,4\n-2,-2,1\n2,-2,2\n")  # labels are the file's, not quadrants
    t = train(
        make_cfg(
            "data=csv", f"data.path={tmp_path / 'blobs.csv'}", f"data.test_path={tmp_path / 'test.csv'}", "epochs=5"
        ),
        run_dir=tmp_path / "t",
    )
    assert [p["true"] for p in t["predictions"]] == [3, 4, 1, 2]
    (tmp_path / "bom.csv").write_text("\ufeffx,y,label\n1e-3,1,1\n-1,1,2\n-1,-1,3\n1,-1,4\n2,2,1\n", encoding="utf-8")
    from quadnet.data import read_csv

    assert len(read_csv(str(tmp_path / "bom.csv"), "data.path")[0]) == 5  # the header skipped, 1e-3 kept
    (tmp_path / "noted.csv").write_text("# my points\n\nx,y,label\n1,1,a\n-1,1,b\n")  # a header after a comment
    assert read_csv(str(tmp_path / "noted.csv"), "data.path")[1] == ["a", "b"]
    (tmp_path / "nan.csv").write_text("nan,1,1\n")
    with pytest.raises(ConfigError, match="line 1: 'nan,1,1' is not x,y,label"):
        read_csv(str(tmp_path / "nan.csv"), "data.path")
    (tmp_path / "bad.csv").write_text("1,2,1\n3,4\n")
    r = run_cli("data=csv", f"data.path={tmp_path / 'bad.csv'}", "hydra.run.dir=x", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "line 2: '3,4' is not x,y,label" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("labels", [["red", "green", "blue"], [0, 1, 2, 3, 4], [1, 2, 3, 4]])
def test_a_csv_has_the_classes_its_labels_name(labels, tmp_path):
    """Any number of classes: the labels (words or numbers, sorted) set the net's width, the
    predictions, the checkpoint, predict's columns and the plot's key."""
    rng = np.random.default_rng(1)
    centres = np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, len(labels), endpoint=False)]) * 2
    lines = [f"{x},{y},{lab}" for lab, c in zip(labels, centres, strict=True) for x, y in rng.normal(c, 0.3, (30, 2))]
    (tmp_path / "p.csv").write_text("x,y,label\n" + "\n".join(lines) + "\n")
    s = train(make_cfg("data=csv", f"data.path={tmp_path / 'p.csv'}", "epochs=400", "lr=0.05", "plots=true"),
              run_dir=tmp_path / "r")  # fmt: skip
    classes = sorted(labels, key=str) if isinstance(labels[0], str) else labels
    assert s["classes"] == classes and s["test_accuracy"] >= 0.9
    assert all(len(p["probs"]) == len(labels) and p["predicted"] in classes for p in s["predictions"])
    assert all("on_axis" not in p and p["true"] in classes for p in s["predictions"])
    assert checkpoint.load(tmp_path / "r")["params"]["W2"].shape == (50, len(labels))
    r = run_cli(str(tmp_path / "r"), "2,0", "--json", module="quadnet.predict", cwd=tmp_path)
    assert json.loads(r.stdout)["predictions"][0]["predicted"] == labels[0]  # the class at angle 0
    r = run_cli(str(tmp_path / "r"), "2,0", module="quadnet.predict", cwd=tmp_path)
    assert all(f"p({lab})" in r.stdout for lab in labels) and "true" not in r.stdout.splitlines()[1]
    from quadnet.plots import class_names

    assert class_names(make_dataset_of(tmp_path / "p.csv")) == [f"class {c}" for c in classes]


def make_dataset_of(path):
    from quadnet.data import make_dataset

    return make_dataset(make_cfg("data=csv", f"data.path={path}").data)


def test_animate_writes_a_gif_of_the_run_and_nothing_without_it(tmp_path):
    from PIL import Image

    from quadnet.loop import frame_epochs

    train(make_cfg("animate=true", "epochs=500", "log_every=50"), run_dir=tmp_path / "a")
    with Image.open(tmp_path / "a" / "training.gif") as gif:
        assert gif.n_frames == len(frame_epochs(500)) <= 50  # log-spaced: 0, 1, 2, 3, … 500
    assert sorted(frame_epochs(500))[:4] == [0, 1, 2, 3] and max(frame_epochs(500)) == 500
    train(make_cfg("epochs=500", "log_every=50"), run_dir=tmp_path / "b")
    assert not (tmp_path / "b" / "training.gif").exists()
    # the GIF's loss panel is drawn from metrics at each frame's epoch, and the rest of a row equals the plain run's
    a, b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["epoch"] for r in a] == sorted(frame_epochs(500) | set(range(0, 501, 50)))
    assert [r for r in a if r["epoch"] % 50 == 0] == b


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status (Linux)")
@pytest.mark.parametrize(
    "command",
    [["-m", "quadnet.train"], ["quadnet-train"], ["-m", "quadnet.report"], ["quadnet-predict"],
     ["-m", "quadnet.crosscheck"]],
)  # fmt: skip
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_command_starts_is_one_line(command, sig, code, tmp_path):
    """Ctrl-C or SIGTERM while torch and Hydra import (python -m quadnet.train, or the console script quadnet-train)."""
    argv = [sys.executable, *command] if command[0].startswith("-") else [Path(sys.executable).parent / command[0]]
    p = subprocess.Popen([*argv, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # until quadnet's handler is up (SIGTERM caught), then at once
        caught = re.search(r"SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{p.pid}/status").read_text())
        if caught and int(caught[1], 16) >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.002)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_a_reader_that_stops_reading_stops_neither_the_run_nor_prints_a_traceback(tmp_path):
    """`python -m quadnet.train | head`: the run goes on and writes its dir; --cfg's output just ends."""
    for args, code in ((["epochs=10", "plots=false", "hydra.run.dir=r"], 0), (["--cfg", "job"], 1)):
        p = subprocess.Popen(
            [sys.executable, "-m", "quadnet.train", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        p.stdout.close()  # type: ignore[union-attr]
        err = p.stderr.read().decode()  # type: ignore[union-attr]
        assert p.wait() == code and err == "", err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status (Linux)")
@pytest.mark.parametrize(
    "command",
    [["quadnet.crosscheck", "epochs=100000000"], ["quadnet.bench", "step", "--jobs", "1", "--repeat", "1000"]],
)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_other_commands_in_one_line(command, sig, code, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", *command], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # until the command's handler is up, then a while into its work
        caught = re.search(r"SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{p.pid}/status").read_text())
        if caught and int(caught[1], 16) >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.01)
    time.sleep(2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and err.strip() == "error: interrupted: stopped at once", err


def test_a_signal_that_a_library_wraps_as_it_imports_is_still_one_line(capsys):
    """Python 3.11 wraps an exception raised while a class is made (torch's FakeTensor, as bench imports torch)."""
    with pytest.raises(SystemExit) as e, exits.command():
        try:
            raise Stopped(signal.SIGTERM)
        except Stopped as stopped:
            raise RuntimeError("Error calling __set_name__ on 'SymNumberMemoDescriptor' instance") from stopped
    assert e.value.code == 143 and capsys.readouterr().err == "error: interrupted: stopped at once\n"


def test_a_write_that_fails_is_named_by_the_file_not_its_temporary():
    pyarrows = OSError(
        30, "Failed to open local file '/ro/.report.csv.9.tmp'. Detail: [errno 30] Read-only file system"
    )
    assert str(exits.unwritable(pyarrows, "'/ro/report.csv'")) == "cannot write '/ro/report.csv': Read-only file system"


def test_a_signal_between_a_basic_sweeps_jobs_is_one_line_with_the_command_that_goes_on(tmp_path, monkeypatch, capsys):
    """(Between jobs Hydra composes the next one: no loop listens, so the signal stops the command at once.)"""
    import quadnet.train as t

    prepare = t.prepare

    def second_job_stopped(cfg, out, overrides=None):
        if out.name == "1":
            raise Stopped(signal.SIGTERM)  # as the handler raises it
        return prepare(cfg, out, overrides)

    monkeypatch.setattr(t, "prepare", second_job_stopped)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["quadnet.train", "-m", "seed=0,1", "epochs=5", "hydra.sweep.dir=s"])
    with pytest.raises(SystemExit) as e:
        t.main()
    err = capsys.readouterr().err
    assert e.value.code == 143 and err.count("\n") == 1, err
    assert err.startswith("error: interrupted: stopped at once (what was written so far is kept); go on with")
    assert err.strip().endswith(f"-m seed=0,1 epochs=5 hydra/launcher=batched hydra.sweep.dir={tmp_path / 's'}")
    assert (tmp_path / "s" / "0" / "summary.json").exists()


def test_a_basic_launcher_sweep_prints_one_line_a_job_and_logs_the_rest(tmp_path):
    r = run_cli("-m", "lr=0.01,5000", "epochs=100", "hydra.sweep.dir=s", cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and r.stderr == "" and len(lines) == 3, r.stdout  # (no "#1 : lr=5000 epochs=100")
    assert lines[0].startswith("[lr=0.01 epochs=100] status completed at epoch 100/100   train accuracy")
    assert lines[1].startswith("[lr=5000 epochs=100] status diverged at epoch ")
    assert "2 jobs: 1 completed, 1 diverged; report:" in lines[2]
    first, second = ((tmp_path / "s" / job / "train.log").read_text() for job in "01")
    assert "quadnet: seed data" in first and "epoch 100/100  loss" in first and "run dir:" in first
    assert "diverged: the loss became non-finite" in second
