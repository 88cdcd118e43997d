"""Runs you can trust: checkpoints, exact resume, signals, divergence, predict, safe loading."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import quadnet
from conftest import make_cfg, read_metrics, run_cli
from quadnet import checkpoint
from quadnet.config import ConfigError
from quadnet.train import train

VOLATILE = ("train_seconds", "run_dir", "config")


def _stable(summary):
    """The summary without what differs between runs; NaN (no validation split) as None, so that it equals itself."""
    return {k: None if v != v else v for k, v in summary.items() if k not in VOLATILE}


@pytest.mark.parametrize(
    "engine,extra",
    [("torch", []), ("torch", ["momentum=0.9", "lr=0.01"]), ("numpy", ["momentum=0.5"]), ("torch", ["dtype=float32"]),
     ("numba", ["optimizer=adam", "lr=0.01"]), ("numba", ["momentum=0.9", "lr=0.01"])],
)  # fmt: skip
def test_resume_equals_an_uninterrupted_run_exactly(engine, extra, tmp_path):
    extra = [*extra, "log_every=50"]  # (by default a run of 400 epochs logs every 4, one of 1000 every 10)
    full = train(make_cfg(f"engine={engine}", "epochs=1000", *extra), run_dir=tmp_path / "full")
    train(make_cfg(f"engine={engine}", "epochs=400", *extra), run_dir=tmp_path / "first")
    resumed = train(
        make_cfg(f"engine={engine}", "epochs=1000", f"resume={tmp_path / 'first'}", *extra), run_dir=tmp_path / "second"
    )
    assert _stable(resumed) == _stable(full)
    a = checkpoint.load(tmp_path / "full")["params"]
    b = checkpoint.load(tmp_path / "second")["params"]
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert read_metrics(tmp_path / "full" / "metrics.csv") == read_metrics(tmp_path / "second" / "metrics.csv")


def test_resume_takes_the_checkpoints_config_and_refuses_a_new_shape(tmp_path):
    train(make_cfg("epochs=50", "hidden_dim=8", "lr=0.01"), run_dir=tmp_path / "a")
    s = train({"resume": str(tmp_path / "a"), "epochs": 80, "progress": False}, run_dir=tmp_path / "b")
    assert s["config"]["hidden_dim"] == 8 and s["config"]["lr"] == 0.01 and s["epoch"] == 80
    with pytest.raises(ConfigError, match=r"hidden_dim=50.*trained with hidden_dim=8"):
        train({"resume": str(tmp_path / "a"), "hidden_dim": 50}, run_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="below the checkpoint's epoch"):
        train({"resume": str(tmp_path / "a"), "epochs": 10}, run_dir=tmp_path / "d")
    for key, value in (("seed", 5), ("init", "torch")):  # its weights are the checkpoint's: no other label
        with pytest.raises(ConfigError, match=rf"{key}=.*trained with {key}=.*initial weights"):
            train({"resume": str(tmp_path / "a"), key: value}, run_dir=tmp_path / "e")


def test_resume_shape_change_from_the_cli_is_one_line(tmp_path):
    train(make_cfg("epochs=20", "hidden_dim=8"), run_dir=tmp_path / "a")
    r = run_cli(f"resume={tmp_path / 'a'}", "hidden_dim=9", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot resume") and "Traceback" not in r.stderr


def test_a_run_into_a_dir_that_holds_an_earlier_run_is_refused_and_resume_goes_on_there(tmp_path):
    assert run_cli("epochs=100", "plots=false", "hydra.run.dir=r", cwd=tmp_path).returncode == 0
    files = ("checkpoint.npz", "summary.json", "metrics.csv", ".hydra/config.yaml", ".hydra/overrides.yaml")
    before = {f: (tmp_path / "r" / f).read_bytes() for f in files}
    r = run_cli("epochs=50", "hydra.run.dir=r", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds an earlier run" in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="holds an earlier run"):
        quadnet.run(epochs=50, run_dir=tmp_path / "r")
    assert before == {f: (tmp_path / "r" / f).read_bytes() for f in files}  # nothing of it trained over
    r = run_cli("resume=r", "epochs=200", "hydra.run.dir=r", cwd=tmp_path)  # going on with it, in its dir
    assert r.returncode == 0 and json.loads((tmp_path / "r" / "summary.json").read_text())["epoch"] == 200
    (tmp_path / "r" / "older.npz").write_bytes(before["checkpoint.npz"])  # an older one beside a newer checkpoint
    r = run_cli("resume=r/older.npz", "epochs=300", "hydra.run.dir=r", cwd=tmp_path)
    assert r.returncode == 2 and "holds an earlier run" in r.stderr  # only its own checkpoint goes on there


def test_a_signal_while_the_run_dir_is_written_is_not_lost(tmp_path, monkeypatch):
    from quadnet import rundir

    write = rundir.write

    def write_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands while the plots draw
        return write(*args, **kwargs)

    monkeypatch.setattr(rundir, "write", write_and_signal)
    with pytest.raises(KeyboardInterrupt):  # it stops what comes next (a basic sweep's next job)
        train(make_cfg("epochs=20", "plots=false"), run_dir=tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "path", ["/a/b\\x", "/a/it's", "/a/b\\'c", "/a/end\\", "/a/x y,z", "/a/é(1)=[2]", "/plain/a-b"]
)
def test_a_path_in_a_printed_command_is_what_hydra_reads(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from quadnet.console import hydra_value

    assert OverridesParser.create().parse_override(f"resume={hydra_value(path)}").value() == path


def test_with_hydra_job_chdir_relative_paths_are_where_the_user_is(tmp_path):
    (tmp_path / "pts.csv").write_text("1,1,1\n-1,1,2\n-1,-1,3\n1,-1,4\n2,2,1\n")
    chdir = ["hydra.job.chdir=true", "plots=false"]
    r = run_cli("data=csv", "data.path=pts.csv", "epochs=10", "hydra.run.dir=a", *chdir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # resumed (it reads its data by the path it was given), and from a home-relative path
    r = run_cli("resume=a", "epochs=20", "hydra.run.dir=b", *chdir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["epoch"] == 20
    r = run_cli("data=csv", "data.path='~/pts.csv'", "epochs=10", "hydra.run.dir=c", *chdir, cwd=tmp_path,
                env={"HOME": str(tmp_path)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    # a basic sweep into a relative dir: its lock and its jobs' dirs are where the user is
    r = run_cli("-m", "seed=1,2", "epochs=10", "hydra.sweep.dir=s", *chdir, cwd=tmp_path)
    assert r.returncode == 0 and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["0", "1", "multirun.yaml"]
    assert not (tmp_path / "s" / "0" / "s").exists()


def test_checkpoints_are_written_periodically_and_atomically(tmp_path, monkeypatch):
    cfg = make_cfg("epochs=300", "checkpoint_every=100", "momentum=0.5", "log_every=100")
    saved = []
    real_save = checkpoint.save
    epoch = lambda obj: json.loads(str(obj["meta"]))["epoch"]  # noqa: E731
    monkeypatch.setattr(
        checkpoint, "save", lambda path, obj: (saved.append((path.name, epoch(obj))), real_save(path, obj))
    )
    train(cfg, run_dir=tmp_path)
    assert saved == [("checkpoint.npz", 100), ("checkpoint.npz", 200), ("checkpoint.npz", 300)]
    ck = checkpoint.load(tmp_path / "checkpoint.npz")
    assert ck["epoch"] == 300 and ck["status"] == "completed" and ck["config"]["checkpoint_every"] == 100
    assert len(ck["history"]) == 4 and set(ck["state"]["optimizer"]) == {"momentum"}
    assert set(np.load(tmp_path / "checkpoint.npz")) >= {"meta", "history", "params/W1", "optimizer/momentum/W2"}
    before = (tmp_path / "checkpoint.npz").read_bytes()

    def full_disk(f, **arrays):  # what np.savez meets when the disk fills up
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint.npz.*No space left on device"):
        real_save(tmp_path / "checkpoint.npz", {"meta": np.array("x")})
    assert (tmp_path / "checkpoint.npz").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_killed_writers_temporary_file_is_removed_later(tmp_path):
    dead = subprocess.run(["true"]).args and _dead_pid()
    stale = tmp_path / f".checkpoint.npz.{dead}.tmp"
    stale.write_bytes(b"x" * 1000)
    train(make_cfg("epochs=20"), run_dir=tmp_path)
    assert not stale.exists() and (tmp_path / "checkpoint.npz").is_file()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _damaged(c, meta=None, config=None, **arrays):
    """A checkpoint's arrays with its meta (and the config in it) and some arrays changed."""
    m = json.loads(str(c["meta"]))
    m = {**m, **(meta or {}), "config": {**m["config"], **(config or {})}}
    return {**c, **arrays, "meta": np.array(json.dumps(m))}


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda c: _damaged(c, config={"hidden_dim": "wide"}), "bad config"),
        (lambda c: _damaged(c, meta={"epoch": 2.5}), "bad epoch"),
        (lambda c: _damaged(c, meta={"epoch": -5}), "bad epoch"),
        (lambda c: _damaged(c, history=np.zeros((3, 2))), "damaged metrics"),
        (lambda c: _damaged(c, **{"params/W1": np.zeros((3, 3))}), "W1 is not a float array of shape (2, 8)"),
        (lambda c: _damaged(c, **{"params/b2": np.zeros(4, dtype=int)}), "b2 is not a float array"),
        (lambda c: _damaged(c, config={"hidden_dim": 7}), "shape (2, 7)"),
        (lambda c: _damaged(c, **{"optimizer/momentum/W1": np.array(["x"])}), "momentum buffer W1"),
        (lambda c: _damaged(c, meta={"step": "abc"}), "bad optimizer step 'abc'"),
        (lambda c: _damaged(c, meta={"classes": [1]}), "bad classes"),
        (lambda c: _damaged(c, meta={"format": "quadnet-checkpoint/9"}), "not a quadnet checkpoint"),
        (lambda c: {**c, "params/W1": np.array([object()])}, "holds objects other than arrays"),
    ],
)
def test_a_checkpoint_with_bad_contents_is_refused_in_one_line(damage, words, tmp_path):
    train(make_cfg("epochs=20", "hidden_dim=8"), run_dir=tmp_path / "r")
    np.savez(tmp_path / "bad.npz", **damage(checkpoint.read(tmp_path / "r" / "checkpoint.npz")))
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(words)):
        checkpoint.load(tmp_path / "bad.npz")
    r = run_cli(f"resume={tmp_path / 'bad.npz'}", f"hydra.run.dir={tmp_path}/x", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_and_leaves_a_resumable_run(sig, code, tmp_path):
    run = tmp_path / "a run, (1)"  # the printed command quotes it for the shell and for Hydra
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quadnet.train",
            "epochs=1000000",
            "checkpoint_every=0",
            "plots=false",
            "log_every=1000",
            f"hydra.run.dir='{run}'",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the first log line comes just before the loop starts
        assert "quadnet:" in line, line
        line = proc.stdout.readline()  # the second a tenth of the way: the run has trained (~15 s in all)
        assert line.startswith("epoch  100000/"), line
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # (no stray run when an assert fails first)
    assert proc.returncode == code, err
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "interrupted" and 100000 <= s["epoch"] < 1000000 and s["signal"] == sig.name
    command = shlex.split((out + err).split("Resume with:\n")[1].splitlines()[0])
    assert command[:3] == ["python", "-m", "quadnet.train"] and command[3].startswith("resume="), command
    ck = checkpoint.load(run)
    assert ck["epoch"] == s["epoch"] and ck["status"] == "interrupted"
    # and the printed command resumes from there
    r = run_cli(*command[3:], f"epochs={s['epoch'] + 500}", f"hydra.run.dir={tmp_path}/resumed", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s2 = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert s2["status"] == "completed" and s2["epoch"] == s["epoch"] + 500


def test_divergence_stops_at_once_and_the_single_run_exits_non_zero(tmp_path):
    r = run_cli("lr=1e6", "epochs=5000", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 3
    assert "diverged" in r.stdout + r.stderr and "Traceback" not in r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "diverged" and s["epoch"] < 5000 and s["final_loss"] is None
    assert checkpoint.load(tmp_path / "r")["status"] == "diverged"


@pytest.mark.parametrize("lr,epochs", [(1e6, 27), (1e30, 6)])
def test_weights_that_blow_up_on_the_last_step_are_diverged_not_completed(lr, epochs, tmp_path):
    """The loss before each update is finite, the weights after the last one are not."""
    r = run_cli(f"lr={lr}", f"epochs={epochs}", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert r.returncode == 3 and s["status"] == "diverged" and s["epoch"] == epochs, r.stderr
    for engine in ("numpy", "torch", "numba"):
        assert (
            train(make_cfg(f"lr={lr}", f"epochs={epochs}", f"engine={engine}"), run_dir=tmp_path / engine)["status"]
            == "diverged"
        )


def test_divergence_in_process_returns_the_status(tmp_path):
    s = train(make_cfg("lr=1e6", "engine=numpy"), run_dir=tmp_path)
    assert s["status"] == "diverged" and s["epoch"] < 10000


# ---------------------------------------------------------------------------- safe loading


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    train(make_cfg("epochs=10"), run_dir=tmp_path / "r")
    evil = tmp_path / "evil.npz"  # a checkpoint whose weight W1 is a pickle that would run a command
    np.savez(evil, **{**checkpoint.read(tmp_path / "r" / "checkpoint.npz"), "params/W1": np.array([_Payload(marker)])})
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.load(evil)
    assert not marker.exists()
    r = run_cli(str(evil), "1,1", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: refused") and not marker.exists()
    r = run_cli(f"resume={evil}", f"hydra.run.dir={tmp_path}/x", cwd=tmp_path)
    assert r.returncode == 2 and "refused" in r.stderr and not marker.exists()
    np.load(evil, allow_pickle=True)["params/W1"]  # proves the payload would have run
    assert marker.exists()


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    train(make_cfg("epochs=10"), run_dir=tmp_path / "r")
    data = (tmp_path / "r" / "checkpoint.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(checkpoint.CheckpointError, match="not a quadnet checkpoint"):
        checkpoint.load(tmp_path / "text.npz")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match="not a quadnet checkpoint"):
        checkpoint.load(tmp_path / "arrays.npz")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")  # (quadnet 0.1 and 0.2 wrote such files)
    with pytest.raises(checkpoint.CheckpointError, match="not a quadnet checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="holds no"):
        checkpoint.load(tmp_path)


# ---------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    train(make_cfg(), run_dir=d)
    return d


def test_predict_from_the_cli_with_negative_points_and_json(trained, tmp_path):
    r = run_cli(str(trained), "2,2", "-2,2", "-2,-2", "2,-2", "0,3", "--json", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "completed", r.stderr
    preds = json.loads(r.stdout)["predictions"]
    assert [p["predicted"] for p in preds] == [1, 2, 3, 4, preds[4]["predicted"]]
    assert preds[4]["on_axis"] and preds[4]["true"] is None
    assert abs(sum(preds[0]["probs"]) - 1) < 1e-12
    r = run_cli(str(trained / "checkpoint.npz"), "-2,2", "0,1", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 0 and "on an axis: no true quadrant" in r.stdout


def test_predict_reads_a_file_and_stdin(trained, tmp_path):
    (tmp_path / "pts.txt").write_text("# points\n1,1\n-1 -1\n\n")
    r = run_cli(str(trained), "--file", str(tmp_path / "pts.txt"), "--json", module="quadnet.predict", cwd=tmp_path)
    assert [p["predicted"] for p in json.loads(r.stdout)["predictions"]] == [1, 3]
    r = subprocess.run(
        [sys.executable, "-m", "quadnet.predict", str(trained), "--json"],
        input="-3,4\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert json.loads(r.stdout)["predictions"][0]["predicted"] == 2


@pytest.mark.parametrize(
    "args,words",
    [
        (["abc"], "is not a point"),
        (["1,2,3"], "(1.0, 2.0, 3.0) has 3 numbers; the model reads x, y"),
        (["nan,1"], "finite"),
        (["1,inf"], "finite"),
        (["--file", "/no/such"], "does not exist"),
        ([], "no points given"),
        (["--bogus"], "unknown option"),
    ],
)
def test_predict_bad_input_is_one_line_exit_2(trained, tmp_path, args, words):
    r = subprocess.run(
        [sys.executable, "-m", "quadnet.predict", str(trained), *args],
        input="",
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_predict_of_a_word_alone_says_it_is_neither_a_run_nor_a_point(tmp_path):
    r = run_cli("abc", module="quadnet.predict", cwd=tmp_path)
    assert (
        r.returncode == 2
        and r.stderr == "error: 'abc' is neither a run dir or checkpoint (no such path) nor a point x,y\n"
    )


def test_predict_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for target in (tmp_path / "nope", tmp_path / "notes.txt"):
        r = run_cli(str(target), "1,1", module="quadnet.predict", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- logging


def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg("epochs=200", "log_every=50", "logger=tensorboard"), run_dir=tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "train_accuracy", "test_accuracy"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [0, 50, 100, 150, 200]


def test_without_a_terminal_the_log_has_plain_periodic_lines(tmp_path):
    r = run_cli("epochs=1000", "log_every=50", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 10 and lines[-1].startswith("epoch 1000/1000")
    log = (tmp_path / "r" / "train.log").read_text()
    assert "epoch 1000/1000" in log and "[quadnet]" in log  # the file keeps Hydra's timestamped format


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux's script for a pseudo-terminal")
def test_a_terminal_that_reports_no_width_gets_plain_progress_lines(tmp_path):
    """`script -qc` runs the command on a terminal of 0 columns: a bar would print nothing."""
    cmd = f"{sys.executable} -m quadnet.train epochs=3000 plots=false hydra.run.dir=r"
    r = subprocess.run(["script", "-qc", cmd, "/dev/null"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "epoch  300/3000  loss" in r.stdout, r.stdout[-500:]


def test_a_second_run_into_a_dir_a_running_one_holds_is_refused(tmp_path):
    from quadnet.rundir import lock

    lock(tmp_path / "r", "run")  # this test's process holds it, as a running run would
    r = run_cli("epochs=5", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: another run or sweep is writing into"), r.stderr
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "r" / "summary.json").exists() and not (tmp_path / "r" / "checkpoint.npz").exists()
