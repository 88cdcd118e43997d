"""The sweep report: every job in a table, report.csv and plots; failed, diverged, unfinished and
damaged jobs listed, never fatal."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import matplotlib
import pytest

from conftest import call_main, run_cli
from quadnet.report import main, show

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """16 jobs: lr=1e6 diverges (jobs 4–7 and 12–15); the others complete."""
    root = tmp_path_factory.mktemp("sweep")
    grid = ("hidden_dim=3,30", "lr=0.05,1e6", "reg=0.001,0.01", "seed=0,1")
    args = ("-m", "hydra/launcher=batched", *grid, "epochs=200")
    r = run_cli(*args, "hydra.sweep.dir=s", cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "s"


@pytest.fixture
def sweep(sweep_dir, tmp_path):
    """A fresh copy of the sweep, to damage, as quadnet 0.5 and earlier wrote it: job dirs, no results table."""
    shutil.rmtree(shutil.copytree(sweep_dir, tmp_path / "s") / "results")
    return tmp_path / "s"


def test_the_report_of_a_sweeps_table_is_the_report_of_its_job_dirs(sweep_dir, tmp_path, capsys):
    dirs = shutil.copytree(sweep_dir, tmp_path / "dirs")
    shutil.rmtree(dirs / "results")
    table = shutil.copytree(sweep_dir, tmp_path / "table")
    for n in range(16):
        shutil.rmtree(table / str(n))  # (the table alone)
    reports = [_report(capsys, d, "--no-plots") for d in (dirs, table)]
    assert [code for code, _, _ in reports] == [0, 0]
    assert reports[0][1].replace("/dirs", "/table") == reports[1][1]
    assert (dirs / "report.csv").read_text() == (table / "report.csv").read_text()


def saved_figures(monkeypatch):
    """Every figure saved from now on in the test, by file name (closed, but all its artists still there)."""
    from matplotlib.figure import Figure

    seen, save = {}, Figure.savefig

    def spy(fig, path, *args, **kwargs):
        seen[os.path.basename(str(path))] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


@pytest.fixture
def figures(monkeypatch):
    return saved_figures(monkeypatch)


def texts(fig):
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]


def _report(capsys, *argv):
    return call_main(main, capsys, *argv)


def _rows(sweep):
    with open(sweep / "report.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_a_sweep_with_failed_diverged_and_unfinished_jobs(sweep, capsys, figures):
    (sweep / "5" / "summary.json").unlink()  # never finished
    summary = json.loads((sweep / "9" / "summary.json").read_text())
    summary.update(status="failed", error="CUDA out of memory.\nTried to allocate 2 GiB")
    (sweep / "9" / "summary.json").write_text(json.dumps(summary))
    code, out, err = _report(capsys, sweep)
    assert code == 0 and err == ""
    assert f"sweep {sweep}: 16 jobs, sorted by val_loss" in out
    assert "job 5: unfinished (no summary.json)" in out
    assert "job 9: failed: CUDA out of memory. Tried to allocate 2 GiB" in out  # the reason, on one line
    assert "not completed (9):" in out and out.count(": diverged") == 7
    header, rows = _rows(sweep)
    assert header == [
        "job", "hidden_dim", "lr", "reg", "seed", "overrides", "status", "error",
        "final_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy", "val_error",
        "test_error", "epoch", "train_seconds",
    ]  # fmt: skip
    done = [float(r["test_loss"]) for r in rows if r["status"] == "completed"]
    assert done == sorted(done) and len(done) == 7 and all(r["status"] != "completed" for r in rows[7:])
    assert {float(r["lr"]) for r in rows if r["job"] != "5"} == {0.05, 1e6}  # (5: no record of its values)
    # lr=1e6: every job diverged; drawn all the same (no median, none right), and no heatmap's axis
    names = {"report_hidden_dim.png", "report_lr.png", "report_reg.png", "report_seed.png", "report_heatmap.png"}
    assert set(figures) == names
    for name in figures:
        assert (sweep / name).stat().st_size > 1000, name
    # the seed data has no validation split: its val_ figures are the test set's, and say so
    assert figures["report_reg.png"].axes[0].get_ylabel() == "val_loss (the test set's) (lower is better)"


def test_plots_follow_the_metric_and_draw_each_kind_of_parameter_as_it_is(sweep, capsys, figures):
    assert _report(capsys, sweep, "--metric", "final_loss")[0] == 0
    hidden = figures["report_hidden_dim.png"]
    assert [ax.get_xscale() for ax in hidden.axes[:2]] == ["log", "log"]  # 3 and 30: a multiplicative grid
    assert hidden.axes[2].get_ylabel() == "fraction of jobs with every test point right"  # its own axis
    assert "(16 jobs, 8 completed)\neach value pools every setting of lr, reg, seed" in hidden._suptitle.get_text()
    assert list(figures["report_lr.png"].axes[2].lines[0].get_ydata()) == [0.75, 0.0]  # lr=1e6: all 8 diverged
    assert hidden.axes[0].get_ylabel() == "final_loss (lower is better)"
    assert hidden.axes[1].get_ylabel() == "test_accuracy (higher is better)"
    assert hidden.axes[0].lines and "median" in texts(hidden) and "16–84% of jobs" in texts(hidden)
    seed = figures["report_seed.png"].axes
    assert all(not ax.lines and ax.get_xscale() == "linear" for ax in seed)  # seeds: a scatter, nothing joined
    assert "median final_loss (lower is better)" in texts(figures["report_heatmap.png"])
    figures.clear()
    assert _report(capsys, sweep, "--metric", "test_accuracy")[0] == 0
    labels = [ax.get_ylabel() for ax in figures["report_hidden_dim.png"].axes[:2]]
    assert labels == ["test_accuracy (higher is better)", "test_loss (lower is better)"]  # no panel twice
    assert "median test_accuracy (higher is better)" in texts(figures["report_heatmap.png"])
    header, _ = _rows(sweep)
    assert len(header) == len(set(header)) and header.count("test_accuracy") == 1


def test_every_job_is_printed_with_its_overrides_in_full(sweep, capsys):
    """40 more jobs (past the old silent cut of 30), one with an Optuna-style value."""
    for i in range(40):
        job = sweep / f"j{i}"
        if not job.exists():
            shutil.copytree(sweep / "0", job)
        reg = "1.1889379831773006e-05" if i == 7 else f"0.00{i + 1}"
        summary = json.loads((job / "summary.json").read_text())  # (the values it ran with, as in its summary)
        summary["config"].update(hidden_dim=3, reg=float(reg), seed=i)
        summary["overrides"] = ["hidden_dim=3", f"reg={reg}", f"seed={i}"]
        (job / "summary.json").write_text(json.dumps(summary))
    code, out, _ = _report(capsys, sweep, "--no-plots")
    assert code == 0 and "56 jobs" in out
    assert all(f" j{i} " in out for i in range(40))
    assert "reg=1.189e-05" in out and "reg=1.1889379831773006 " not in out
    _, rows = _rows(sweep)
    assert [float(r["reg"]) for r in rows if r["job"] == "j7"] == [1.1889379831773006e-05]  # the full value in the CSV
    code, out, _ = _report(capsys, sweep, "--no-plots", "--top", "5")
    assert "51 more jobs not shown (--top N shows more); all are in report.csv" in out
    code, _, err = _report(capsys, sweep, "--no-plots", "--top", "-1")
    assert code == 2 and err.strip() == "error: --top -1 is not allowed: must be >= 1"


def test_damaged_job_dirs_are_listed_and_the_report_goes_on(sweep, capsys):
    def edit(job, **changes):
        s = json.loads((sweep / job / "summary.json").read_text())
        (sweep / job / "summary.json").write_text(json.dumps({**s, **changes}))

    (sweep / "0" / "summary.json").write_text("[1, 2]")
    edit("1", status=3)
    edit("4", test_loss="0.5")
    (sweep / "5" / "summary.json").write_bytes(b'{"status": "completed\xff"}')
    edit("6", overrides=None)  # (a summary without the overrides: they are read from .hydra/, as 0.2 kept them)
    edit("7", overrides=None)
    for job in ("6", "7"):
        (sweep / job / ".hydra").mkdir()
    (sweep / "6" / ".hydra" / "overrides.yaml").write_bytes(b"- lr=\xff\n")
    (sweep / "7" / ".hydra" / "overrides.yaml").write_text("just a scalar\n")
    code, out, err = _report(capsys, sweep)
    assert code == 0 and err == "" and "Traceback" not in out
    for line in (
        "job 0: damaged: summary.json is not a JSON object",
        "job 1: damaged: summary.json has no status string",
        "job 4: damaged: summary.json: test_loss not a number",
        "job 5: damaged: summary.json cannot be read (UnicodeDecodeError)",
        "job 6: damaged: .hydra/overrides.yaml cannot be read (UnicodeDecodeError)",
        "job 7: damaged: .hydra/overrides.yaml is not a list of overrides",
    ):
        assert line in out, line
    assert len(_rows(sweep)[1]) == 16


def test_figures_are_shown_as_a_reader_writes_them():
    assert [show(v) for v in (10000.0, 12345.0, 0.002663, 1e7, 1.5e-05, None, 3)] == [
        "10000", "12345", "0.002663", "1e+07", "1.5e-05", "-", "3"]  # fmt: skip
    assert show(0.9583, pct=True) == "95.8%" and show("a\nb") == "a\\nb"


def test_odd_summaries_are_shown_escaped_and_a_fifo_is_not_read(sweep, capsys, figures):
    summary = json.loads((sweep / "2" / "summary.json").read_text())
    summary["config"]["hidden_dim"] = [3, 4]  # a swept key that holds a list
    (sweep / "2" / "summary.json").write_text(json.dumps(summary))
    summary.update(status="failed\x1b[2J", error="line one\nline\x1b[31m two")
    (sweep / "3" / "summary.json").write_text(json.dumps(summary))
    (sweep / "1" / "summary.json").unlink()
    os.mkfifo(sweep / "1" / "summary.json")  # (reading it would wait for a writer for ever)
    code, out, err = _report(capsys, sweep)
    assert code == 0 and err == "" and "\x1b" not in out and "hidden_dim=[3, 4]" in out
    assert "job 3: failed\\x1b[2J: line one line\\x1b[31m two" in out  # (as repr writes them)
    assert "job 1: damaged: summary.json is not a regular file" in out
    assert "and report_hidden_dim.png, report_lr.png, report_reg.png" in out and "report_hidden_dim.png" in figures


def test_report_says_which_plots_it_wrote(sweep, capsys):
    for job in range(1, 16):
        (sweep / str(job) / "summary.json").unlink()  # one completed job: nothing to plot
    code, out, _ = _report(capsys, sweep)
    assert code == 0 and ".png" not in out and f"wrote {sweep / 'report.csv'} (no plots: no swept" in out
    assert not list(sweep.glob("report_*.png"))


def test_a_sweep_dir_that_cannot_be_written_still_gets_its_table(sweep, capsys):
    if os.geteuid() != 0:  # root writes through permission bits: there, a dir in report.csv's way
        os.chmod(sweep, 0o555)
    else:
        (sweep / "report.csv").mkdir()
    try:
        code, out, err = _report(capsys, sweep)
    finally:
        os.chmod(sweep, 0o755)
    assert code == 1 and "sorted by val_loss" in out and out.count("completed") >= 4
    assert err.startswith("error: could not write report.csv in ") and err.count("\n") == 1 and ".tmp" not in err


def test_report_picks_the_newest_sweep_and_takes_a_metric(tmp_path, capsys):
    for dims in ("2,4", "5,7"):
        assert run_cli("-m", "hydra/launcher=batched", f"hidden_dim={dims}", "epochs=30", cwd=tmp_path).returncode == 0
        time.sleep(1.1)
    os.chdir(tmp_path)
    code, out, _ = _report(capsys, "--metric", "test_accuracy", "--no-plots")
    assert code == 0 and "hidden_dim=5" in out and "hidden_dim=2" not in out and "sorted by test_accuracy" in out


def test_report_bad_input_is_one_line(sweep, tmp_path, capsys):
    os.chdir(tmp_path)
    for argv, words in (
        (["--metric", "speed"], "--metric 'speed'"),
        ([], "no sweep under"),
        ([tmp_path / "nope"], "is not a directory"),
        ([sweep / "0"], "is a single run, not a sweep"),
    ):
        code, _, err = _report(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_summaries_whose_keys_or_numbers_do_not_fit_are_listed_not_fatal(sweep, capsys):
    def edit(job, **changes):
        s = json.loads((sweep / job / "summary.json").read_text())
        (sweep / job / "summary.json").write_text(json.dumps({**s, **changes}))

    edit("0", status="failed", overrides=["+status=completed", "+final_loss=0.001"])  # (keys of the report's own)
    edit("1", epoch=10**400)
    edit("2", config=None, overrides=["seed=99999999999999999999"])  # (a value no int64 holds: as text)
    code, out, err = _report(capsys, sweep, "--top", "99999999999999999999999")
    assert code == 0 and err == "" and "job 0: failed" in out
    assert "job 1: damaged: summary.json: epoch not a number" in out and "seed=99999999999999999999" in out
    assert {r["job"]: r["status"] for r in _rows(sweep)[1]}["0"] == "failed"


def test_chunks_that_are_empty_foreign_or_damaged_are_listed(sweep_dir, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    s = shutil.copytree(sweep_dir, tmp_path / "s")
    (chunk,) = (s / "results").iterdir()
    t = pq.read_table(chunk)
    pq.write_table(t.slice(0, 0), s / "results" / "chunk-000000048.parquet")  # (no rows)
    pq.write_table(pa.table({"job": ["x"], "a": [1]}), s / "results" / "chunk-000000016.parquet")  # (not a chunk)
    # (a chunk whose seed is text: it reads, but its columns conflict with the sweep's)
    t = t.set_column(t.column_names.index("seed"), "seed", pa.array([str(v) for v in t["seed"].to_pylist()]))
    pq.write_table(t, s / "results" / "chunk-000000032.parquet")
    code, out, err = _report(capsys, s, "--no-plots")
    assert code == 0 and err == "" and "19 jobs" in out, out + err
    assert all(f"job chunk-0000000{n}.parquet: damaged" in out for n in (16, 32, 48)) and len(_rows(s)[1]) == 19


def test_a_damaged_chunk_keeps_its_name_and_status_where_a_swept_key_is_named_like_a_column(tmp_path, capsys):
    """+job=… and +status=… are swept keys of their own: a damaged chunk's row is still named by its file."""
    for key in ("job", "status"):
        s = tmp_path / key
        args = ("hydra/launcher=batched", "hydra.launcher.job_dirs=false", "hydra.launcher.max_batch=1", "epochs=5")
        run_cli("-m", *args, f"+{key}=a,b,c", f"hydra.sweep.dir={s}", cwd=tmp_path)  # (each job fails: no such key)
        (s / "results" / "chunk-000000001.parquet").write_bytes(b"PAR1")
        code, out, err = _report(capsys, s, "--no-plots")
        assert code == 0 and "job chunk-000000001.parquet: damaged: chunk cannot be read" in out, out + err
