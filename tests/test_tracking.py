"""MLflow tracking (logger=mlflow): a run, a sweep as a parent run with nested runs, a real server,
a store that is down."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import make_cfg, run_cli
from quadnet import rundir
from quadnet.config import allowed_keys
from quadnet.train import train

mlflow = pytest.importorskip("mlflow", reason="needs the [mlflow] extra: pip install -e '.[mlflow]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quadnet")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def test_a_run_goes_to_the_sqlite_store_under_outputs_with_everything_a_user_looks_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("quadnet.tracking._state", {})
    s = train(make_cfg("epochs=300", "log_every=100", "logger=mlflow", "plots=true"), run_dir=tmp_path / "r")
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    (run,) = _runs(uri)
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    opened = f"open {page} after: mlflow ui --backend-store-uri {uri}"  # (the closing line's)
    assert s["tracking"] == {"uri": uri, "experiment_id": run.info.experiment_id, "run_id": run.info.run_id,
                             "parent_run_id": None, "open": opened}  # fmt: skip
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["tracking"]["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["quadnet.status"] == "completed"
    assert run.data.params["hidden_dim"] == "50" and run.data.params["data.name"] == "seed"
    assert run.data.params["resume"] == "null" and sorted(run.data.params) == sorted(allowed_keys())  # every config key
    assert run.data.tags["quadnet.version"] and "mlflow.parentRunId" not in run.data.tags
    assert run.data.metrics["final.test_accuracy"] == s["test_accuracy"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 100, 200, 300]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert files == {"summary.json", "loss.png", "decision_regions.png", "confusion.png"}
    assert Path(client.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://")) == (
        tmp_path / "outputs" / "mlartifacts"
    )


def test_a_run_is_in_the_store_as_it_trains(tmp_path, monkeypatch):
    """Live: the run is made as it starts, with its params, and each log point's metrics reach the store
    while it is still running (here: as its dir is about to be written)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("quadnet.tracking._state", {})
    uri, seen, write = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}", {}, rundir.write

    def spy(*args, **kwargs):
        mlflow.flush_async_logging()
        (run,) = _runs(uri)
        history = mlflow.tracking.MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "loss")
        seen.update(status=run.info.status, steps=[m.step for m in history], epochs=run.data.params["epochs"])
        return write(*args, **kwargs)

    monkeypatch.setattr(rundir, "write", spy)
    monkeypatch.setattr("quadnet.tracking.SEND_EVERY", 0)  # (each log point's at once: else once a second)
    train(make_cfg("epochs=300", "log_every=100", "logger=mlflow"), run_dir=tmp_path / "r")
    assert seen == {"status": "RUNNING", "steps": [0, 100, 200, 300], "epochs": "300"}
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and "final.test_loss" in run.data.metrics


def test_a_run_that_raises_ends_its_mlflow_run_as_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("quadnet.tracking._state", {})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "write", full_disk)
    with pytest.raises(OSError):
        train(make_cfg("epochs=20", "logger=mlflow"), run_dir=tmp_path / "r")
    (run,) = _runs(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert run.info.status == "FAILED"  # (not RUNNING for ever)


def test_a_live_batch_the_store_refused_leaves_the_end_of_the_run_logged(tmp_path, monkeypatch, caplog):
    """An asynchronous batch of log points that failed: one warning; the run's final figures, tags and
    files are logged all the same, and it ends (not RUNNING for ever)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("quadnet.tracking._state", {})
    monkeypatch.setattr("quadnet.tracking.SEND_EVERY", 0)
    log_batch = mlflow.tracking.MlflowClient.log_batch

    class Refused:
        def wait(self) -> None:
            raise RuntimeError("the store refused the batch")

    def refusing(self, *args, synchronous=None, **kwargs):  # (every live batch: refused when waited for)
        return Refused() if synchronous is False else log_batch(self, *args, synchronous=synchronous, **kwargs)

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_batch", refusing)
    s = train(make_cfg("epochs=300", "log_every=100", "logger=mlflow"), run_dir=tmp_path / "r")
    (run,) = _runs(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert run.info.status == "FINISHED" and run.data.tags["quadnet.status"] == "completed"
    assert run.data.metrics["final.test_accuracy"] == s["test_accuracy"]
    assert "the store refused the batch" in s["tracking"]["error"] and "refused" in caplog.text


def test_a_store_that_cannot_be_written_is_one_warning_at_once(tmp_path):
    (tmp_path / "db").mkdir()  # (a directory where the SQLite file would be: MLflow retried ~100 s before it said so)
    r = run_cli("epochs=20", "logger=mlflow", "hydra.run.dir=r", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/db"})  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (r.stdout + r.stderr).count(f"{tmp_path}/db cannot be written (a directory, or a read-only place)") == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["tracking"]["error"]


def test_a_batched_sweep_logs_its_results_and_its_best_jobs_up_to_the_cap(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = run_cli("-m", "hydra/launcher=batched", "hidden_dim=3,30", "seed=0,1", "epochs=100", "logger=mlflow",
                "hydra.launcher.mlflow_runs=2", "hydra.launcher.job_dirs=false", "hydra.sweep.dir=s", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert r.returncode == 0, r.stderr
    runs = _runs(uri)
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rows = pq.read_table(tmp_path / "s" / "results").to_pylist()
    best = sorted(rows, key=lambda row: row["objective"])
    assert len(runs) == 3 and {c.data.tags["quadnet.job"] for c in children} == {str(b["job"]) for b in best[:2]}
    assert {c.data.metrics["final.objective"] for c in children} == {b["objective"] for b in best[:2]}
    assert all(set(c.data.params) == {"hidden_dim", "seed"} and c.info.status == "FINISHED" for c in children)
    assert parent.data.params["lr"] == "0.001" and parent.data.params["epochs"] == "100"  # (the config they share)
    m = parent.data.metrics
    assert m["jobs"] == m["jobs_completed"] == m["jobs_written"] == 4 and m["objective/best"] == best[0]["objective"]
    wide = sorted(row["objective"] for row in rows if row["hidden_dim"] == 30)
    assert m["objective/hidden_dim/30/median"] == pytest.approx(sum(wide) / 2)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["results.parquet"]
    assert f"mlflow: the sweep's run {parent.info.run_id} in experiment 'quadnet'" in r.stdout
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in r.stdout
    r = run_cli(*r.args[3:], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})  # (the same sweep again: its runs afresh)
    assert r.returncode == 0 and len(_runs(uri)) == 3, r.stderr


def test_a_store_that_is_down_is_a_warning_and_a_note_and_the_run_is_kept(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    t0 = time.time()
    r = run_cli("epochs=50", "logger=mlflow", "hydra.run.dir=r", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (r.stdout + r.stderr).count("runs are not logged to it") == 1 and time.time() - t0 < 60
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "completed" and "failed while" in s["tracking"]["error"]
    assert (tmp_path / "r" / "checkpoint.npz").is_file()


def test_logger_mlflow_without_mlflow_is_refused_before_training(monkeypatch, tmp_path):
    import importlib.util

    from quadnet.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=mlflow needs mlflow: pip install mlflow \(quadnet's \[mlflow\]"):
        train(make_cfg("epochs=5", "logger=mlflow"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on localhost, with a SQLite backend."""
    if shutil.which("mlflow") is None and not (Path(sys.executable).parent / "mlflow").exists():
        pytest.skip("no mlflow command (the [mlflow] extra installs mlflow's server)")
    root, port = tmp_path_factory.mktemp("mlflow"), _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--default-artifact-root", str(root / "art"),
           "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as ok:
                if ok.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the mlflow server did not start within 120 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("launcher", ["batched", "basic"])
def test_a_sweep_is_a_parent_run_with_a_nested_run_a_job_on_a_real_server(server, launcher, tmp_path):
    env = {"MLFLOW_TRACKING_URI": server, "MLFLOW_EXPERIMENT_NAME": f"sweeps-{launcher}"}
    r = run_cli("-m", f"hydra/launcher={launcher}", "seed=0,1,2", "epochs=40", "logger=mlflow", "plots=false",
                f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server)
    runs = client.search_runs([client.get_experiment_by_name(f"sweeps-{launcher}").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "s" and parent.info.status == "FINISHED"
    assert sorted(run.data.params["seed"] for run in children) == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" and run.data.metrics["final.train_seconds"] > 0 for run in children)
    for n in range(3):  # (a batched sweep logs its jobs at its end: their runs name their dirs)
        s = json.loads((tmp_path / "s" / str(n) / "summary.json").read_text())
        assert launcher == "batched" or s["tracking"]["parent_run_id"] == parent.info.run_id
    assert {run.data.tags["quadnet.run_dir"] for run in children} == {str(tmp_path / "s" / str(n)) for n in range(3)}
    # the same sweep again into its dir (it goes on): its jobs are kept, its parent run is the same
    os.environ.pop("MLFLOW_RUN_ID", None)
    assert json.loads((tmp_path / "s" / ".mlflow").read_text())["run_id"] == parent.info.run_id


def test_a_single_run_on_a_real_server(server, tmp_path):
    r = run_cli("epochs=30", "logger=mlflow", "hydra.run.dir=r", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": server})
    assert r.returncode == 0, r.stderr
    run_id = json.loads((tmp_path / "r" / "summary.json").read_text())["tracking"]["run_id"]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "30"
    assert f"mlflow: run {run_id} in experiment 'quadnet' at {server}" in r.stdout  # where it goes, then how to open it
    assert f"mlflow: open {server}/#/experiments/{run.info.experiment_id}/runs/{run_id}" in r.stdout
