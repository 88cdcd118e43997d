"""MLflow tracking (``logger=mlflow``): every run an MLflow run, live; a sweep a parent run with nested runs.

Where: MLflow's own ``MLFLOW_TRACKING_URI`` (a server, a database, a folder), else an SQLite store
beside the runs, ``sqlite:///outputs/mlflow.db`` under the dir the command started in (artifacts
in ``outputs/mlartifacts``): ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`` shows
it without a server. The experiment is ``MLFLOW_EXPERIMENT_NAME`` (or ``MLFLOW_EXPERIMENT_ID``),
else ``quadnet``. A run is made as it starts (:func:`start`: its config as params, dotted keys;
quadnet's version and commit as tags; a line says where it goes), gets its metrics at each log
point as it trains (:func:`point`, asynchronously) and, at its end (:func:`log_run`), its final
figures, summary.json and its plots. A sweep's parent run is named after its dir, and its id is
kept in ``<sweep dir>/.mlflow`` so that every job, of any launcher, finds it. A batched sweep
logs its progress to it as each chunk is written and, at its end (:func:`log_sweep`), its results
table (without weights) as an artifact, the objective's best and quantiles overall and per swept
value, and a nested run for each of its best jobs by objective, ``hydra.launcher.mlflow_runs`` of
them at most (1,000 by default): a nested run costs ~20 ms, so a million would take hours. A store
that is down or refuses a write costs a warning and a ``tracking`` note in summary.json; the run
and its dir stay as they are, and the process does not try that store again.
"""

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from quadnet import table
from quadnet.artifacts import versions
from quadnet.config import flatten, user_path
from quadnet.engines import METRICS as KEYS

log = logging.getLogger("quadnet")
STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "diverged": "FAILED", "failed": "FAILED"}
PARENT = ".mlflow"  # in a sweep dir: its parent run
FINALS = ("final_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy", "train_seconds")
SEND_EVERY = 1.0  # seconds at least between a live run's batches of metrics
QUANTILES = {"best": 0.0, "q25": 0.25, "median": 0.5, "q75": 0.75}
_state: dict[str, Any] = {}  # this process's client, experiment, and the error that stopped it


def store() -> str:
    """The tracking URI: MLflow's own setting, else the SQLite store under ./outputs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{user_path('outputs').absolute() / 'mlflow.db'}"


def _client() -> tuple[Any, str]:
    """The client and experiment id for this process's store (made once); raises if the store fails."""
    if "error" in _state:
        raise RuntimeError(_state["error"])
    if "client" not in _state:
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(key, value)  # (a server that is down: seconds, not MLflow's minutes of retries)
        uri = store()
        if uri.startswith("sqlite:///"):  # (one MLflow cannot write stalls ~100 s in its retries before it says so)
            db = Path(uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            if db.is_dir() or not os.access(db if db.exists() else db.parent, os.W_OK):
                raise PermissionError(f"{db} cannot be written (a directory, or a read-only place)")
            with contextlib.closing(sqlite3.connect(db)) as con:  # (a write-ahead log: a run's writes ~2x as fast)
                con.execute("PRAGMA journal_mode=WAL")
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "urllib3", "alembic"):  # (after MLflow's import sets its own; one warning of ours)
            logging.getLogger(name).setLevel(logging.CRITICAL)
        client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if experiment is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "quadnet")
            found = client.get_experiment_by_name(name)
            local = "MLFLOW_TRACKING_URI" not in os.environ  # (else the store keeps its artifacts where it says)
            where = (user_path("outputs").absolute() / "mlartifacts").as_uri() if local else None
            experiment = found.experiment_id if found else client.create_experiment(name, artifact_location=where)
        _state.update(client=client, experiment=experiment, uri=uri, name=client.get_experiment(experiment).name)
    return _state["client"], _state["experiment"]


def _guard(what: str, fn: Any, *args: Any) -> Any:
    """fn(*args), or None and one warning for the process when the store fails (it is not asked again)."""
    try:
        return fn(*args)
    except Exception as e:  # any failure of the store: network, database, permissions
        if "error" not in _state:  # (MLflow's message whole, on one line: its end often says what to do)
            _state["error"] = f"MLflow store {store()} failed while {what}: {' '.join(str(e).split())}"
            log.warning("%s; runs are not logged to it (their dirs are written as always)", _state["error"])
        return None


def where(run_id: str) -> str:
    """How to open a run: its page on a server, else the ``mlflow ui`` command for the store."""
    uri, page = _state["uri"], f"#/experiments/{_state['experiment']}/runs/{run_id}"
    if uri.startswith("http"):
        return f"open {uri.rstrip('/')}/{page}"
    return f"open http://127.0.0.1:5000/{page} after: mlflow ui --backend-store-uri {uri}"


def _parent(sweep_dir: Path | None) -> str | None:
    """The sweep's parent run id (None for no sweep): read from <sweep dir>/.mlflow, else made (and written
    there); found or made once a process."""
    parents, key = _state.setdefault("parents", {}), sweep_dir and str(sweep_dir.resolve())
    if key and key not in parents:
        parents[key] = _guard("starting the sweep's run", _find_parent, sweep_dir)
    return parents.get(key)


def _find_parent(sweep_dir: Path) -> str:
    client = _client()[0]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, RecursionError):
        kept = json.loads((sweep_dir / PARENT).read_text())
        if kept["uri"] == _state["uri"]:  # (the same store: this sweep's jobs go on under it)
            client.update_run(kept["run_id"], status="RUNNING")
            return str(kept["run_id"])
    run_id = _create({}, sweep_dir.name, {"quadnet.sweep_dir": str(sweep_dir.resolve())}, None, [])
    (sweep_dir / PARENT).write_text(json.dumps({"uri": _state["uri"], "run_id": run_id}) + "\n")
    log.info("mlflow: the sweep's run %s in experiment %r at %s", run_id, _state["name"], _state["uri"])
    return run_id


def end(sweep_dir: Path, status: str) -> None:
    """Mark the sweep's parent run ended (FINISHED, KILLED) as of now."""
    if (run_id := _state.get("parents", {}).get(str(sweep_dir.resolve()))) is not None:
        _guard("ending the sweep's run", lambda: _client()[0].set_terminated(run_id, status))


def _versions() -> dict[str, str]:
    return {"quadnet.version": str(versions()["quadnet"]), "quadnet.git_commit": str(versions()["git_commit"] or "")}


def _metrics(values: dict[str, Any], step: int, prefix: str = "") -> list[Any]:
    """MLflow metrics of the numbers among values (NaN, ±inf and None left out)."""
    from mlflow.entities import Metric

    now, numbers = int(time.time() * 1000), {k: v for k, v in values.items() if isinstance(v, int | float)}
    return [Metric(prefix + k, v, now, step) for k, v in numbers.items() if math.isfinite(v)]


def _create(params: dict[str, Any], name: str, tags: dict[str, str], parent: str | None, metrics: list[Any]) -> str:
    """A run with these params (dotted keys), tags and metrics; its id."""
    client, experiment = _client()
    tags = {**_versions(), **tags, **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    _batch(run_id, metrics, params)
    return run_id


def _batch(run_id: str, metrics: list[Any], params: dict[str, Any] | None = None) -> None:
    """log_batch with params as the config has them (None: null); MLflow splits what is over its 1,000 a call."""
    from mlflow.entities import Param

    values = [Param(k, "null" if v is None else str(v)) for k, v in (params or {}).items()]
    _client()[0].log_batch(run_id, metrics=metrics, params=values)


def start(config: dict[str, Any], run_dir: Path, sweep_dir: Path | None, history: list[dict[str, float]]) -> None:
    """A run's MLflow run, made as it starts (nested in its sweep's; with the history of a run it resumes);
    a line says where it goes."""
    parent, name = _parent(sweep_dir), f"{run_dir.parent.name}/{run_dir.name}" if sweep_dir else run_dir.name
    past = [m for row in history for m in _metrics({k: row[k] for k in KEYS}, int(row["epoch"]))]
    tags = {"quadnet.run_dir": str(run_dir), "quadnet.status": "running"}
    _state.update(points=[], sending=[], sent=0.0)  # (its metrics not yet sent, those on their way, and when)
    _state["run"] = run_id = _guard("starting a run", _create, flatten(config), name, tags, parent, past)
    if run_id is not None:
        log.info("mlflow: run %s in experiment %r at %s", run_id, _state["name"], _state["uri"])


def point(row: dict[str, float]) -> None:
    """A log point's metrics, to the run that is training: sent once a second at most (a call for ten thousand
    log points would cost more than the training), asynchronously (the store writes them beside it)."""
    if (run_id := _state.get("run")) is not None:
        _state["points"] = metrics = _state["points"] + _metrics({k: row[k] for k in KEYS}, int(row["epoch"]))
        if time.monotonic() - _state["sent"] < SEND_EVERY and len(metrics) < 900:
            return
        _state.update(points=[], sent=time.monotonic())
        sent = _guard("logging metrics", lambda: _client()[0].log_batch(run_id, metrics=metrics, synchronous=False))
        _state["sending"].append(sent)


def abort() -> None:
    """The run :func:`start` made, if :func:`log_run` has not ended it: ended as FAILED."""
    if (run_id := _state.pop("run", None)) is not None:
        _guard("ending a run", lambda: _client()[0].set_terminated(run_id, "FAILED"))


def log_run(summary: dict[str, Any], run_dir: Path, sweep_dir: Path | None) -> dict:
    """The end of the run :func:`start` made: its final figures, tags and files, its status; the note for its
    summary. In a sweep of any launcher but the batched one, the sweep's run is marked ended as of this job
    (the batched one ends it once, when it is done)."""
    run_id, parent_id = _state.pop("run", None), _parent(sweep_dir)
    if run_id is not None:
        _guard("logging a run", _finish, summary, run_dir, run_id)
    if sweep_dir is not None:
        end(sweep_dir, STATUS.get(summary["status"], "FAILED"))
    if "error" in _state or run_id is None:
        return {"error": _state.get("error", "not logged")}
    note = {"uri": _state["uri"], "experiment_id": _state["experiment"], "run_id": run_id}
    return note | {"parent_run_id": parent_id, "open": where(run_id)}


def _finish(summary: dict[str, Any], run_dir: Path, run_id: str) -> None:
    from mlflow.entities import RunTag

    client = _client()[0]
    for sent in filter(None, _state.pop("sending", [])):  # (every log point's metrics in the store before the run ends)
        _guard("logging metrics", sent.wait)  # (one that failed: the run's end is logged all the same)
    tags = [RunTag(f"quadnet.{k}", str(summary[k])) for k in ("status", "engine", "device", "error") if summary.get(k)]
    finals = _metrics({k: summary.get(k) for k in FINALS}, int(summary.get("epoch") or 0), "final.")
    client.log_batch(run_id, metrics=_state.pop("points", []) + finals, tags=tags)
    for file in ("summary.json", "loss.png", "decision_regions.png", "confusion.png", "training.gif"):
        if (Path(run_dir) / file).is_file():  # (metrics.csv: the metrics, logged already)
            client.log_artifact(run_id, str(Path(run_dir) / file))
    client.set_terminated(run_id, STATUS.get(summary["status"], "FAILED"))


def progress(sweep_dir: Path, written: int, best: float | None) -> None:
    """A batched sweep's progress on its run, as each chunk is written: the jobs written and the best objective."""
    if (parent := _parent(sweep_dir)) is not None:
        metrics = _metrics({"jobs_written": written, "best_objective": best}, written)
        _guard("logging the sweep's progress", lambda: _client()[0].log_batch(parent, metrics=metrics))


def log_sweep(sweep_dir: Path, status: str, cap: int) -> None:
    """A batched sweep's end on its run: its results table (without weights) as an artifact, the objective's
    best and quantiles, overall and at each value of each swept key (of 50 values at most), and a nested run
    for each of its best `cap` jobs by objective (their config, final figures and run dir)."""
    parent = _parent(sweep_dir)
    if parent and _guard("logging the sweep's results", _log_sweep, sweep_dir, parent, cap) is not None:
        log.info("mlflow: %s", where(parent))
    end(sweep_dir, status)


def _log_sweep(sweep_dir: Path, parent: str, cap: int) -> bool:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    client, (t, swept, _) = _client()[0], table.rows(sweep_dir)
    if t is None:  # (no chunk could be read)
        return True
    objective = np.where(np.isnan(v := t["objective"].to_numpy()), np.inf, v)  # (+inf: a job that did not complete)
    groups, varied = [("objective", np.isfinite(objective))], [k for k in swept if pc.count_distinct(t[k]).as_py() > 1]
    for key in (k for k in varied if len(t[k].unique()) <= 50):  # (a value in a name: letters, digits, _ - . space)
        values = t[key].to_numpy(zero_copy_only=False)
        named = [(re.sub(r"[^\w. -]|^\.+$", "_", str(v)), v) for v in t[key].unique().to_pylist()]
        groups += [(f"objective/{key}/{name}", groups[0][1] & (values == v)) for name, v in named]
    stats = {"jobs": len(t), "jobs_completed": t["status"].to_pylist().count("completed")}
    for name, rows in groups:
        if (v := objective[rows]).size:
            stats |= {f"{name}/{q}": np.quantile(v, f) for q, f in QUANTILES.items()}
    _batch(parent, _metrics(stats, len(t)))
    with tempfile.TemporaryDirectory() as tmp:  # (the rows without weights: a million jobs in ~30 MB)
        pq.write_table(t, Path(tmp) / "results.parquet")
        client.log_artifact(parent, str(Path(tmp) / "results.parquet"))
    trained = np.flatnonzero(pc.not_equal(t["status"], "failed").to_numpy(zero_copy_only=False))
    best = t.take(trained[np.argsort(objective[trained], kind="stable")[:cap]])  # (the best first)
    if len(best):  # (the sweep's params: the config its jobs share, as its best one has it)
        config = flatten(table.load(sweep_dir, str(best["job"][0].as_py()))["config"])
        _batch(parent, [], {k: v for k, v in config.items() if k not in varied})
    # (a sweep launched again, by a resume or Optuna: a nested run kept while its job is among the best as it was)
    search, rows = f"tags.mlflow.parentRunId = '{parent}'", [r | {"job": str(r["job"])} for r in best.to_pylist()]
    runs = client.search_runs([_state["experiment"]], search, max_results=50000)
    old = {(r.data.tags.get("quadnet.job"), r.data.tags.get("quadnet.status")): r.info.run_id for r in runs}
    for key in old.keys() - {(row["job"], row["status"]) for row in rows}:
        client.delete_run(old[key])
    for row in (row for row in rows if (row["job"], row["status"]) not in old):  # (its params: the keys that vary)
        job_dir, finals = sweep_dir / row["job"], {k: row.get(k) for k in (*FINALS, "objective")}
        tags = {"quadnet.status": row["status"], "quadnet.job": row["job"]}
        tags |= {"quadnet.run_dir": str(job_dir.resolve())} if job_dir.is_dir() else {}
        metrics = _metrics(finals, row["epoch"] or 0, "final.")
        run_id = _create({k: row[k] for k in varied}, f"{sweep_dir.name}/{row['job']}", tags, parent, metrics)
        client.set_terminated(run_id, STATUS.get(row["status"], "FAILED"))
    return True
