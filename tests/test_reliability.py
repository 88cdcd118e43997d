"""What quadnet promises about what a user already has: a refused command writes and deletes
nothing, runs and sweeps never write into a dir another one holds, and a resume checks what it
resumes. Each refusal the README lists is run against a snapshot of the dir it would touch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file's bytes and mtime under root, and every dir (None), by relative path."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's dir: a finished run R (with Hydra's record and log, and a file of the user's), a
    finished sweep S, and two CSV files of points."""
    d = tmp_path_factory.mktemp("home")
    (d / "good.csv").write_text("x,y,label\n" + "".join(f"{x},{y},{1 + (x < 0) + 2 * (y < 0)}\n"
                                                        for x in (-2, -1, 1, 2) for y in (-2, -1, 1, 2)))  # fmt: skip
    r = run_cli("data=csv", "data.path=good.csv", "epochs=30", "plots=false", "hydra.run.dir=R", cwd=d)
    assert r.returncode == 0, r.stderr
    (d / "R" / "notes.txt").write_text("mine")
    r = run_cli("-m", "hydra/launcher=batched", "seed=0,1", "epochs=30", "hydra.sweep.dir=S", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


REFUSALS = {  # the README's refusals: (arguments, words of the one error line)
    "a bad value": (["lr=-1", "hydra.run.dir=R"], "lr=-1.0 is not allowed"),
    "an unknown key": (["hiden_dim=5", "hydra.run.dir=R"], "did you mean hidden_dim?"),
    "a run into a dir that holds one": (["epochs=50", "hydra.run.dir=R"], "holds an earlier run"),
    "a resume that changes the shape": (["resume=R", "hidden_dim=10", "hydra.run.dir=R"], "cannot resume"),
    "a resume that changes the seed": (["resume=R", "seed=5", "hydra.run.dir=R"], "trained with seed=1"),
    "a resume below its epoch": (["resume=R", "epochs=10", "hydra.run.dir=R"], "below the checkpoint's epoch"),
    "a resume out of memory": (["resume=R", "hidden_dim=1000000", "hydra.run.dir=R"], "cannot resume"),
    "out of memory": (
        ["hidden_dim=1000000", "data=sampled", "data.n_train=10000000", "hydra.run.dir=R/x"],
        "out of memory",
    ),
    "a bad CSV": (["data=csv", "data.path=R/notes.txt", "hydra.run.dir=R/x"], "numbers and a label"),
    "a CSV that never ends": (["data=csv", "data.path=/dev/zero", "hydra.run.dir=R/x"], "is not a regular file"),
    "a device that is not there": (["device=cuda:99", "hydra.run.dir=R/x"], "is not available"),
    "an empty run dir": (["epochs=5", "hydra.run.dir="], "hydra.run.dir= is empty"),
    "a sweep with an unknown key": (["-m", "hiden_dim=5,6"], "did you mean hidden_dim?"),
    "a batched sweep with a bad value": (["-m", "hydra/launcher=batched", "hidden_dim=5,abc"], "hidden_dim"),
    "a launcher given as a value": (["-m", "hydra.launcher=batched", "seed=1,2"], "(a slash)"),
    "a run into a sweep's job dir": (["epochs=50", "hydra.run.dir=S/1"], "holds an earlier run"),
    "a sweep that changes a job's settings": (
        ["-m", "hydra/launcher=batched", "seed=0,1", "epochs=30", "lr=0.5", "hydra.sweep.dir=S"],
        "holds a run at epoch 30",
    ),
    "a sweep below its jobs' epochs": (
        ["-m", "hydra/launcher=batched", "seed=0,1", "epochs=10", "hydra.sweep.dir=S"],
        "below the checkpoint's epoch",
    ),
    "a bad launcher option": (
        ["-m", "hydra/launcher=batched", "hydra.launcher.max_batch=-1", "hydra.sweep.dir=S"],
        "max_batch=-1 is not allowed",
    ),
    "resume= in a batched sweep": (
        ["-m", "hydra/launcher=batched", "resume=R", "epochs=40,50", "hydra.sweep.dir=S"],
        "is not for batched sweeps",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_command_writes_nothing_and_deletes_nothing(case, home):
    args, words = REFUSALS[case]
    before = snapshot(home)
    r = run_cli(*args, cwd=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and words in r.stderr, r.stderr
    assert snapshot(home) == before


def _hold(folder: Path) -> subprocess.Popen[str]:
    """Another process that holds folder, as a running run or sweep does."""
    code = f"from quadnet.rundir import lock; import pathlib, time; lock(pathlib.Path({str(folder)!r}))"
    p = subprocess.Popen([sys.executable, "-c", code + "; print(1, flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "1"
    return p


@pytest.mark.parametrize(
    "args,words",
    [(["epochs=5", "hydra.run.dir=S/7"], "another run or sweep is writing into"),  # a run into a live sweep's job
     (["-m", "seed=0,1", "epochs=5", "hydra.sweep.dir=S"], "another run or sweep is writing into"),  # a basic sweep
     (["-m", "hydra/launcher=batched", "seed=0,1", "epochs=5", "hydra.sweep.dir=S"], "another run or sweep is")],
)  # fmt: skip
def test_nothing_writes_into_a_dir_another_process_holds(args, words, home):
    holder = _hold(home / "S")
    try:
        before = snapshot(home)
        r = run_cli(*args, cwd=home)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {words}"), r.stderr
        assert snapshot(home) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_batched_sweep_leaves_a_job_dir_another_run_holds_alone(tmp_path):
    holder = _hold(tmp_path / "S" / "1")
    try:
        r = run_cli("-m", "hydra/launcher=batched", "seed=0,1,2", "epochs=5", "hydra.sweep.dir=S", cwd=tmp_path)
        assert r.returncode == 2 and "another run or sweep is writing into" in r.stderr.splitlines()[-1], r.stderr
        assert not list((tmp_path / "S" / "1").iterdir())
        assert all((tmp_path / "S" / n / "summary.json").exists() for n in ("0", "2"))
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_checks_the_data_by_its_contents(home, tmp_path):
    """From another dir holding another good.csv, the run's own file is read (its absolute path), and
    a file that changed since is refused."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "good.csv").write_text("x,y,label\n1,1,a\n-1,1,b\n-1,-1,a\n1,-1,b\n2,2,a\n")
    r = run_cli(f"resume={home / 'R'}", "epochs=40", "plots=false", "hydra.run.dir=out", cwd=other)
    assert r.returncode == 0, r.stderr
    assert json.loads((other / "out" / "summary.json").read_text())["config"]["data"]["path"] == str(home / "good.csv")
    copy = tmp_path / "copy.csv"
    copy.write_text((home / "good.csv").read_text() + "3,3,1\n")
    r = run_cli(f"resume={home / 'R'}", f"data.path={copy}", "epochs=40", "hydra.run.dir=out2", cwd=other)
    assert r.returncode == 2 and "is not the data it was trained on" in r.stderr, r.stderr
    assert not (other / "out2").exists()


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_resumed_sweep_trains_again_a_kept_job_whose_checkpoint_is_damaged(damage, tmp_path):
    sweep = ["-m", "hydra/launcher=batched", "seed=0,1", "epochs=30", "plots=false", "hydra.sweep.dir=S"]
    assert run_cli(*sweep, cwd=tmp_path).returncode == 0
    ck = tmp_path / "S" / "1" / "checkpoint.npz"
    ck.write_bytes(ck.read_bytes()[:100]) if damage == "truncate" else ck.unlink()
    r = run_cli(*sweep, cwd=tmp_path)
    assert r.returncode == 0 and "1 new, 0 resumed from their checkpoints, 1 completed before" in r.stdout, r.stdout
    r = run_cli(str(tmp_path / "S" / "1"), "1,1", cwd=tmp_path, module="quadnet.predict")
    assert r.returncode == 0, r.stderr


def test_a_resumed_sweep_keeps_no_job_whose_weights_or_summary_are_not_its_own(tmp_path):
    import numpy as np

    from quadnet import checkpoint

    sweep = ["-m", "hydra/launcher=batched", "seed=0,1,2", "epochs=30", "plots=false", "hydra.sweep.dir=S"]
    assert run_cli(*sweep, cwd=tmp_path).returncode == 0
    ck = tmp_path / "S" / "0" / "checkpoint.npz"
    arrays = checkpoint.read(ck)
    checkpoint.save(ck, {**arrays, "params/W1": arrays["params/W1"] * np.nan})  # still a checkpoint that loads
    (tmp_path / "S" / "1" / "summary.json").write_bytes((tmp_path / "S" / "2" / "summary.json").read_bytes())
    r = run_cli(*sweep, cwd=tmp_path)
    assert "1 completed before" in r.stdout, r.stdout
    assert json.loads((tmp_path / "S" / "0" / "summary.json").read_text())["status"] == "diverged"
    assert json.loads((tmp_path / "S" / "1" / "summary.json").read_text())["overrides"][0] == "seed=1"


def test_a_sweep_whose_every_job_diverged_exits_non_zero(tmp_path):
    r = run_cli("-m", "hydra/launcher=batched", "lr=1e6,1e7", "epochs=50", "plots=false", "hydra.sweep.dir=S",
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 3 and r.stderr.strip().splitlines()[-1].startswith("error: no job of the sweep completed")
    assert "2 jobs: 2 diverged" in r.stdout


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status (Linux)")
def test_sighup_is_a_stop_like_sigterm(tmp_path):
    """A closed terminal or SSH session: the run ends at its step, writes its dir and can resume."""
    p = subprocess.Popen([sys.executable, "-m", "quadnet.train", "epochs=100000000", "plots=false",
                          "checkpoint_every=0", "hydra.run.dir=r"], cwd=tmp_path, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "r" / "train.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # training has begun
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGHUP and "Traceback" not in err, err
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["signal"] == "SIGHUP" and s["epoch"] > 0
    assert os.path.exists(tmp_path / "r" / "checkpoint.npz")


def test_a_plot_that_cannot_be_drawn_costs_the_plot_not_the_run(tmp_path, monkeypatch, caplog):
    from conftest import make_cfg
    from quadnet import plots
    from quadnet.train import train

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(plots, "plot_regions", no_memory)
    s = train(make_cfg("epochs=20", "plots=true"), run_dir=tmp_path / "r")
    assert s["status"] == "completed" and (tmp_path / "r" / "loss.png").exists()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"
    assert "plots not drawn: out of memory" in caplog.text


def test_a_numba_that_does_not_import_falls_back_to_torch_in_one_line(tmp_path):
    broken = tmp_path / "site" / "numba"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('numba built for another numpy')\n")
    env = {"PYTHONPATH": str(tmp_path / "site")}
    r = run_cli("epochs=10", "plots=false", "hydra.run.dir=a", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "numba is installed but does not import (numba built for another numpy): torch trains" in r.stdout
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["engine"] == "torch/fused"
    r = run_cli("epochs=10", "engine=numba", "hydra.run.dir=b", cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "engine=numba: numba is installed but" in r.stderr
    assert not (tmp_path / "b").exists()


def test_a_sweep_the_sweeper_refuses_puts_the_sweep_dirs_record_back(tmp_path):
    """Hydra's sweeper writes multirun.yaml, then checks each job's values: a value it refuses
    (seed=x) leaves an earlier sweep's record as it was, bytes and times."""
    sweep = ["-m", "epochs=5", "hydra/launcher=batched", f"hydra.sweep.dir={tmp_path / 'SD'}"]
    assert run_cli(*sweep, "seed=1,2", cwd=tmp_path).returncode == 0
    record = tmp_path / "SD" / "multirun.yaml"
    before = (record.read_bytes(), record.stat().st_mtime_ns)
    r = run_cli(*sweep, "seed=1,2,x", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: seed='x' is not allowed: must be an integer\n", r.stderr
    assert (record.read_bytes(), record.stat().st_mtime_ns) == before
