"""A sweep's results table (quadnet.table): what it holds against the job dirs, a sweep without
job dirs, its resume (a chunk at a time, a damaged chunk trained again), and what reads it:
report, predict, quadnet.load, pandas."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import quadnet
from conftest import run_cli
from quadnet import table

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")
pq = pytest.importorskip("pyarrow.parquet")

GRID = ["hydra/launcher=batched", "seed=range(6)", "hidden_dim=5,9", "epochs=60", "plots=false"]
TABLE_ONLY = "hydra.launcher.job_dirs=false"


def _sweep(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    r = run_cli("-m", *args, f"hydra.sweep.dir={tmp_path / name}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r


def _frame(sweep: Path) -> pd.DataFrame:
    return pd.read_parquet(sweep / "results").sort_values("job").reset_index(drop=True)


def test_the_table_holds_what_the_job_dirs_hold_bit_for_bit(tmp_path):
    _sweep(tmp_path, "s", *GRID, "data=sampled", "hydra.launcher.max_batch=5")  # (3 chunks)
    df = _frame(tmp_path / "s")
    assert list(df.job) == list(range(12)) and len(table.tables(tmp_path / "s")) == 3
    for row in df.itertuples():
        s = json.loads((tmp_path / "s" / str(row.job) / "summary.json").read_text())
        assert (row.status, row.epoch, row.seed, row.hidden_dim) == (s["status"], s["epoch"], *(
            s["config"][k] for k in ("seed", "hidden_dim")))  # fmt: skip
        for key in ("final_loss", "train_accuracy", "test_accuracy", "val_loss", "val_accuracy", "train_seconds"):
            assert getattr(row, key) == s[key], key
        assert list(row.overrides) == s["overrides"]
        from_dir, from_table = quadnet.load(tmp_path / "s" / str(row.job)), quadnet.load(tmp_path / "s", row.job)
        for k, v in from_dir.params.items():
            assert np.array_equal(v, from_table.params[k]) and v.dtype == from_table.params[k].dtype, k
        assert (from_table.classes, from_table.epoch, from_table.features) == (
            from_dir.classes, from_dir.epoch, from_dir.features)  # fmt: skip
        np.testing.assert_array_equal(from_table.shift, from_dir.shift)


def test_a_sweep_without_job_dirs_writes_the_table_alone_equal_to_one_with_them(tmp_path):
    _sweep(tmp_path, "dirs", *GRID)
    _sweep(tmp_path, "table", *GRID, TABLE_ONLY)
    assert sorted(p.name for p in (tmp_path / "table").iterdir()) == ["multirun.yaml", "results"]
    a, b = _frame(tmp_path / "dirs"), _frame(tmp_path / "table")
    for k in ("W1", "b1", "W2", "b2"):
        assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k
    for k in ("status", "epoch", "final_loss", "test_accuracy", "objective"):
        assert a[k].tolist() == b[k].tolist(), k


def test_resume_from_the_table_keeps_ended_chunks_and_trains_a_damaged_or_missing_one_again(tmp_path):
    args = [*GRID, TABLE_ONLY, "hydra.launcher.max_batch=4"]  # 3 chunks of 4 jobs
    _sweep(tmp_path, "straight", *args)
    _sweep(tmp_path, "s", *args)
    chunks = table.tables(tmp_path / "s")
    kept = chunks[0].stat().st_mtime_ns
    chunks[1].write_bytes(chunks[1].read_bytes()[:500])  # half-written
    chunks[2].unlink()
    r = _sweep(tmp_path, "s", *args)
    assert "12 jobs (8 new, 0 resumed from their checkpoints, 4 completed before, 0 refused)" in r.stdout + r.stderr
    assert chunks[0].stat().st_mtime_ns == kept
    a, b = _frame(tmp_path / "s"), _frame(tmp_path / "straight")
    for k in ("W1", "b1", "W2", "b2"):
        assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k
    r = _sweep(tmp_path, "s", *args)  # all there: nothing trains
    assert "12 completed before" in r.stdout + r.stderr


def test_kill_9_of_a_sweep_without_job_dirs_then_the_same_command_completes_it_as_a_straight_run(tmp_path):
    args = ["hydra/launcher=batched", "seed=range(64)", "epochs=20000", "plots=false", TABLE_ONLY,
            "hydra.launcher.max_batch=16"]  # fmt: skip
    cmd = [sys.executable, "-m", "quadnet.train", "-m", *args, f"hydra.sweep.dir={tmp_path}/s"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not table.tables(tmp_path / "s") and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(table.tables(tmp_path / "s"))
    assert 1 <= done < 4
    r = _sweep(tmp_path, "s", *args)
    assert f"{16 * done} completed before" in r.stdout + r.stderr
    _sweep(tmp_path, "straight", *args)
    a, b = _frame(tmp_path / "s"), _frame(tmp_path / "straight")
    assert len(a) == 64 and (a.status == "completed").all()
    for k in ("W1", "b1", "W2", "b2"):
        assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k


def test_a_sweep_stopped_before_its_last_chunks_counts_the_jobs_it_did_not_start(tmp_path):
    """Its closing line adds up to the sweep's jobs: the chunks it never reached are "not reached"."""
    args = ["hydra/launcher=batched", "seed=range(64)", "epochs=20000", "plots=false", TABLE_ONLY,
            "hydra.launcher.max_batch=16"]  # fmt: skip
    cmd = [sys.executable, "-m", "quadnet.train", "-m", *args, f"hydra.sweep.dir={tmp_path}/s"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not table.tables(tmp_path / "s") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    (line,) = [t for t in out.splitlines() if "64 jobs: " in t]
    counts = dict((w, int(n)) for n, w in re.findall(r"(\d+) (completed|interrupted|not reached)", line))
    assert sum(counts.values()) == 64 and counts["completed"] == 16 * len(table.tables(tmp_path / "s")), line
    assert counts["not reached"] > 0, line


def test_report_predict_and_load_read_a_sweep_without_job_dirs(tmp_path):
    _sweep(tmp_path, "s", *GRID, TABLE_ONLY)
    r = run_cli(str(tmp_path / "s"), "--no-plots", module="quadnet.report", cwd=tmp_path)
    assert r.returncode == 0 and "sweep" in r.stdout and (tmp_path / "s" / "report.csv").is_file(), r.stderr
    lines = (tmp_path / "s" / "report.csv").read_text().splitlines()
    assert len(lines) == 13 and next(csv.reader(lines))[:3] == ["job", "seed", "hidden_dim"]
    r = run_cli(f"{tmp_path}/s/3", "1,1", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 0 and f"model: {tmp_path}/s/3" in r.stdout, r.stderr
    r = run_cli(str(tmp_path / "s"), "--job", "hidden_dim=9 seed=1", "1,1", module="quadnet.predict", cwd=tmp_path)
    assert r.returncode == 0 and f"model: {tmp_path}/s/3" in r.stdout, r.stderr
    for job, words in (("seed=1", "jobs 2, 3 match"), ("99", "no such job")):
        r = run_cli(str(tmp_path / "s"), "--job", job, "1,1", module="quadnet.predict", cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    model = quadnet.load(tmp_path / "s", "seed=2 hidden_dim=5")
    assert model.predict([[1, 1]]).shape == (1,) and model.path == f"{tmp_path}/s/4"


@pytest.mark.parametrize(
    "setting, words",
    [
        ("hydra.job.chdir=true", "hydra.job.chdir=true needs job dirs"),
        ("hydra.sweep.subdir=job_${hydra.job.num}", "hydra.sweep.subdir=job_${hydra.job.num} needs job dirs"),
    ],
)
def test_what_needs_a_job_dir_is_refused_without_them_before_anything_is_written(tmp_path, setting, words):
    r = run_cli("-m", *GRID, TABLE_ONLY, setting, f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "s").exists()


def test_a_job_that_logs_needs_job_dirs_and_fails_alone(tmp_path):
    r = run_cli("-m", "hydra/launcher=batched", "logger=none,tensorboard", "epochs=5", TABLE_ONLY,
                f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "logger=tensorboard needs " in r.stderr.splitlines()[-1]  # (job dirs, or its extra)
    assert _frame(tmp_path / "s").status.tolist() == ["completed", "failed"]


def test_a_table_of_other_settings_data_or_chunks_refuses_the_sweep_and_is_kept(tmp_path):
    args = ["hydra/launcher=batched", "seed=range(4)", "epochs=40", "plots=false", TABLE_ONLY]
    csv = tmp_path / "points.csv"
    csv.write_text("x,y,label\n" + "".join(f"{i % 5 - 2},{i % 3 - 1.5},{i % 2}\n" for i in range(40)))
    _sweep(tmp_path, "s", *args, "lr=0.5", "hydra.launcher.max_batch=2")
    _sweep(tmp_path, "c", *args, "data=csv", f"data.path={csv}")
    before = {p: p.read_bytes() for d in ("s", "c") for p in table.tables(tmp_path / d)}
    csv.write_text(csv.read_text().replace("1,", "2,", 1))  # other contents, the same path
    for name, changed, words in (
        ("s", ["lr=0.5", "hydra.launcher.max_batch=4"], "is not a chunk of this sweep's (chunks of 4 jobs)"),
        ("s", ["hydra.launcher.max_batch=2"], "holds other jobs than this sweep's 0 on"),  # (lr=0.5 dropped)
        ("s", ["lr=0.5", "hydra.launcher.max_batch=2", "reg=0.01"], "holds other jobs"),
        ("c", ["data=csv", f"data.path={csv}"], "is not the data it was trained on"),
    ):
        r = run_cli("-m", *args, *changed, f"hydra.sweep.dir={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "run the sweep as it was" in r.stderr and "Traceback" not in r.stderr
        assert {p: p.read_bytes() for d in ("s", "c") for p in table.tables(tmp_path / d)} == before
        assert (tmp_path / name / "multirun.yaml").is_file()


def test_every_chunk_has_one_schema_so_the_table_reads_as_one(tmp_path):
    """Chunks without a failed job, and of failed jobs alone: their columns have the same types."""
    grid = ["hydra/launcher=batched", "hidden_dim=50,0", "seed=range(2)", "lr=0.1,1e6", "epochs=30", "plots=false"]
    r = run_cli("-m", *grid, TABLE_ONLY, "hydra.launcher.max_batch=2", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    assert r.returncode == 2 and len(table.tables(tmp_path / "s")) == 4
    schemas = {pq.read_schema(p) for p in table.tables(tmp_path / "s")}
    assert len(schemas) == 1 and schemas.pop().field("hidden_dim").type == pa.int64()
    frame = _frame(tmp_path / "s")  # (a job that failed keeps its swept values, as its overrides say)
    assert frame.status.tolist().count("failed") == 4 and frame.hidden_dim.tolist().count(0) == 4
    assert quadnet.load(tmp_path / "s", "hidden_dim=50 seed=0 lr=1e-1").epoch == 30  # (values: 1e-1 is 0.1)
