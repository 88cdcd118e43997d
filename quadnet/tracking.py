"""MLflow tracking (``logger=mlflow``): every run an MLflow run; a sweep a parent run with a nested run a job.

Where: MLflow's own ``MLFLOW_TRACKING_URI`` (a server, a database, a folder), else an SQLite store
beside the runs, ``sqlite:///outputs/mlflow.db`` under the dir the command started in (artifacts
in ``outputs/mlartifacts``): ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`` shows
it without a server. The experiment is ``MLFLOW_EXPERIMENT_NAME`` (or ``MLFLOW_EXPERIMENT_ID``),
else ``quadnet``. A run logs its config as params (dotted keys), its metrics at each log point and
its final figures, quadnet's version and commit as tags, and summary.json and its plots as
artifacts. A sweep's parent run is named after its dir, and its id is kept in
``<sweep dir>/.mlflow`` so that every job, of any launcher, finds it. A store that is down or
refuses a write costs a warning and a ``tracking`` note in summary.json; the run and its dir
stay as they are, and the process does not try that store again.
"""

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from quadnet.artifacts import versions
from quadnet.config import flatten, user_path

log = logging.getLogger("quadnet")
STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "diverged": "FAILED", "failed": "FAILED"}
PARENT = ".mlflow"  # in a sweep dir: its parent run
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
        for name in ("mlflow", "urllib3"):  # (a store's failure is one warning of ours, not their tracebacks)
            logging.getLogger(name).setLevel(logging.CRITICAL)
        from mlflow.tracking import MlflowClient

        uri = store()
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if experiment is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "quadnet")
            found = client.get_experiment_by_name(name)
            local = "MLFLOW_TRACKING_URI" not in os.environ  # (else the store keeps its artifacts where it says)
            where = (user_path("outputs").absolute() / "mlartifacts").as_uri() if local else None
            experiment = found.experiment_id if found else client.create_experiment(name, artifact_location=where)
        _state.update(client=client, experiment=experiment, uri=uri)
    return _state["client"], _state["experiment"]


def _guard(what: str, fn: Any, *args: Any) -> Any:
    """fn(*args), or None and one warning for the process when the store fails (it is not asked again)."""
    try:
        return fn(*args)
    except Exception as e:  # any failure of the store: network, database, permissions
        if "error" not in _state:
            _state["error"] = f"MLflow store {store()} failed while {what}: {' '.join(str(e).split())[:300]}"
            log.warning("%s; runs are not logged to it (their dirs are written as always)", _state["error"])
        return None


def _parent(sweep_dir: Path) -> str:
    """The sweep's parent run id: read from <sweep dir>/.mlflow, else made (and written there)."""
    client, experiment = _client()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, RecursionError):
        kept = json.loads((sweep_dir / PARENT).read_text())
        if kept["uri"] == _state["uri"]:  # (the same store: this sweep's jobs go on under it)
            client.update_run(kept["run_id"], status="RUNNING")
            return str(kept["run_id"])
    tags = {"quadnet.sweep_dir": str(sweep_dir.resolve()), **_versions()}
    run = client.create_run(experiment, run_name=sweep_dir.name, tags=tags)
    (sweep_dir / PARENT).write_text(json.dumps({"uri": _state["uri"], "run_id": run.info.run_id}) + "\n")
    return run.info.run_id


def end(sweep_dir: Path, status: str) -> None:
    """Mark the sweep's parent run ended (FINISHED, KILLED) as of now."""
    if (run_id := _state.get("parents", {}).get(str(sweep_dir.resolve()))) is not None:
        _guard("ending the sweep's run", lambda: _client()[0].set_terminated(run_id, status))


def _versions() -> dict[str, str]:
    return {"quadnet.version": str(versions()["quadnet"]), "quadnet.git_commit": str(versions()["git_commit"] or "")}


def log_run(summary: dict[str, Any], history: list[dict[str, float]], run_dir: Path, sweep_dir: Path | None,
            end_sweep: bool = True) -> dict:  # fmt: skip
    """Log a written run dir as an MLflow run (nested in its sweep's run); the note for its summary.
    end_sweep: mark the sweep's run ended as of this job (a sweep of any launcher but the batched one,
    which ends it once, when it is done: its last job leaves it ended)."""
    parents, key = _state.setdefault("parents", {}), sweep_dir and str(sweep_dir.resolve())
    if key and key not in parents:  # (the sweep's parent run, found or made once a process)
        parents[key] = _guard("starting the sweep's run", _parent, sweep_dir)
    parent_id = parents.get(key)
    run_id = _guard("logging a run", _log, summary, history, run_dir, parent_id)
    if end_sweep and sweep_dir is not None:
        end(sweep_dir, STATUS.get(summary["status"], "FAILED"))
    if run_id is None:
        return {"error": _state.get("error", "not logged")}
    return {"uri": _state["uri"], "experiment_id": _state["experiment"], "run_id": run_id, "parent_run_id": parent_id}


def _log(summary: dict[str, Any], history: list[dict[str, float]], run_dir: Path, parent_id: str | None) -> str:
    from mlflow.entities import Metric, Param

    client, experiment = _client()
    name = f"{Path(run_dir).parent.name}/{Path(run_dir).name}" if parent_id else Path(run_dir).name
    tags = {**_versions(), "quadnet.run_dir": str(run_dir), "quadnet.status": summary["status"]}
    tags |= {f"quadnet.{k}": str(summary[k]) for k in ("engine", "device", "error") if summary.get(k) is not None}
    tags |= {"mlflow.parentRunId": parent_id} if parent_id else {}
    run = client.create_run(experiment, run_name=name, tags=tags)
    params = [Param(k, "null" if v is None else str(v)) for k, v in flatten(summary["config"]).items()]
    now, keys = int(time.time() * 1000), ("loss", "train_accuracy", "test_accuracy", "test_loss")
    metrics = [Metric(k, r[k], now, int(r["epoch"])) for r in history for k in keys if r.get(k) == r.get(k)]  # (no NaN)
    last = int(summary.get("epoch") or 0)
    finals = ("final_loss", "test_loss", "train_accuracy", "test_accuracy", "train_seconds")
    metrics += [Metric(f"final.{k}", summary[k], now, last) for k in finals if isinstance(summary.get(k), int | float)]
    for i in range(0, max(len(metrics), 1), 900):  # (MLflow takes 1,000 entities a call; the params, ~40, first)
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 900], params=[] if i else params)
    for file in ("summary.json", "loss.png", "decision_regions.png", "training.gif"):  # (metrics.csv: the histories)
        if (Path(run_dir) / file).is_file():
            client.log_artifact(run.info.run_id, str(Path(run_dir) / file))
    client.set_terminated(run.info.run_id, STATUS.get(summary["status"], "FAILED"))
    return run.info.run_id
