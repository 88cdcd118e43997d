"""The sweep report: a table, report.csv and plots, with failed, diverged and unfinished jobs listed."""

from __future__ import annotations

import csv
import os
import time

from conftest import run_cli
from quadnet.report import main


def test_report_on_a_sweep_with_failed_diverged_and_unfinished_jobs(tmp_path, capsys):
    r = run_cli("-m", "hydra/launcher=batched", "hidden_dim=3,6", "lr=0.05,1e6", "seed=0,1", "epochs=200", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    # a job that failed before writing its summary, and one whose summary is corrupt
    (sweep / "3" / "summary.json").unlink()
    (sweep / "5" / "summary.json").write_text("{not json")
    os.chdir(tmp_path)
    main([])  # the newest sweep under outputs/
    out = capsys.readouterr().out
    assert f"sweep {os.path.join('outputs', 'multirun', sweep.name)}" in out or f"sweep {sweep}" in out
    assert "not completed (5):" in out  # jobs 2, 3, 6, 7 diverged (lr=1e6); 3 and 5 lost their summaries
    assert "failed or unfinished" in out and "unreadable summary.json" in out and "diverged" in out
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    done = [float(r["test_loss"]) for r in rows if r["status"] == "completed"]
    assert done == sorted(done) and len(done) == 3
    assert [r["status"] for r in rows[3:]].count("completed") == 0  # not-completed jobs sort last
    for name in ("report_hidden_dim.png", "report_lr.png", "report_seed.png", "report_heatmap.png"):
        assert (sweep / name).stat().st_size > 1000, name


def test_report_picks_the_newest_sweep_and_takes_a_metric(tmp_path, capsys):
    for dims in ("2,4", "5,7"):
        assert run_cli("-m", "hydra/launcher=batched", f"hidden_dim={dims}", "epochs=30", cwd=tmp_path).returncode == 0
        time.sleep(1.1)
    os.chdir(tmp_path)
    main(["--metric", "test_accuracy", "--no-plots"])
    out = capsys.readouterr().out
    assert "hidden_dim=5" in out and "hidden_dim=2" not in out and "sorted by test_accuracy" in out


def test_report_bad_input_is_one_line(tmp_path, capsys):
    os.chdir(tmp_path)
    for argv, words in (
        (["--metric", "speed"], "--metric 'speed'"),
        ([], "no sweep under"),
        ([str(tmp_path / "nope")], "is not a directory"),
    ):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
