"""What a run leaves in its dir, written by one function for single runs and sweep jobs alike.

:func:`write` takes a job as the loop left it and writes, in this order, ``checkpoint.npz``
(what resume and predict read), ``metrics.csv``, ``summary.json`` (before anything slow, so
that a signal during the plots loses nothing), then the plots.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np

from quadnet import artifacts, checkpoint, exits, plots, table, tracking
from quadnet.config import ConfigError, to_dict
from quadnet.data import Dataset
from quadnet.engines import METRICS
from quadnet.engines.numpy import Params, forward, softmax
from quadnet.loop import Job

log = logging.getLogger("quadnet")


LOCKS: dict[str, int] = {}  # run and sweep dirs this process holds
MADE: dict[str, list[Path]] = {}  # the dirs each lock made
KEPT_PREDICTIONS = 1000  # a bigger test set's summary keeps its misclassified points (600,000 points were 69 MB)


def lock(folder: Path, what: str = "sweep", outer: bool = False, shown: str | None = None) -> None:
    """Hold ``folder`` (a flock on the dir itself: it dies with the process and leaves no file), so
    that a second run or sweep into it is refused; outer: refuse too a dir inside one that another
    process holds (a single run into a running sweep's job dir). The dir is made only once every
    check has passed. shown: the dir as the user named it, for the error."""
    key = str(folder.resolve())
    if key in LOCKS:
        return
    for above in Path(key).parents if outer else ():
        if str(above) not in LOCKS and held(above):
            raise ConfigError(f"another run or sweep is writing into {above}; wait for it or choose a dir outside it")
    made = [p for p in (Path(key), *Path(key).parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise exits.unwritable(e, f"the {what} dir {shown or folder} (hydra.{what}.dir)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another run or sweep is writing into {key}; wait for it or choose another dir") from None
    LOCKS[key], MADE[key] = fd, made


def unlock(folder: Path) -> None:
    with contextlib.suppress(KeyError, OSError):
        os.close(LOCKS.pop(str(folder.resolve())))


def discard(folder: Path) -> None:
    """A run's or sweep's dir that its lock made and that holds no training (Hydra's record alone: a
    run stopped before it trained, a sweep whose jobs Hydra refused) goes, with the dirs above it
    that the lock made."""
    trained = (f"{table.RESULTS}/*.parquet", f"**/{checkpoint.CHECKPOINT}", "**/summary.json")
    if folder.resolve() in MADE.get(str(folder.resolve()), []) and not any(any(folder.glob(g)) for g in trained):
        shutil.rmtree(folder, ignore_errors=True)
        release(folder)


def release(folder: Path) -> None:
    """Unlock a refused run's or sweep's dir, and remove the dirs its lock made while they are empty."""
    made = MADE.pop(str(folder.resolve()), [])
    unlock(folder)
    with contextlib.suppress(OSError):  # (a dir that is not empty stops it)
        for p in (p for p in made if p.exists()):
            p.rmdir()


def theirs(folder: Path) -> list[str]:
    """The files in folder named as a run's that no quadnet run wrote, which a run would write over: none
    where its summary.json is quadnet's, whatever its status (a run's dir, its checkpoint deleted or not)."""
    with contextlib.suppress(OSError, ValueError, RecursionError, TypeError, KeyError):  # (a FIFO is not read)
        s = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        if isinstance(s["versions"], dict) and "quadnet" in s["versions"] and "status" in s:
            return []
    return [n for n in artifacts.RUN_FILES if (folder / n).exists()]


def held(folder: Path) -> bool:
    """Whether another process holds folder (lock's flock); False for a dir that is not there."""
    with contextlib.suppress(OSError):  # (no dir there: not held)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def write(run_dir: Path, job: Job, data: Dataset, ran: dict[str, Any], stop_signal: int | None = None,
          sweep: Path | None = None, track: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write a finished job's dir; return its summary. ran: where and how it trained (``device``,
    ``engine``, ``train_seconds``: the training loop's time, ``overrides``: the job's, and more keys for the summary);
    sweep: the sweep dir of a sweep's job (its MLflow run is nested in the sweep's); track: end the run
    :func:`quadnet.tracking.start` made (logger=mlflow; a batched sweep logs its jobs from its table at its end)."""
    cfg, run_dir = job.cfg, Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.remove_stale(run_dir)
    opt = "" if cfg.optimizer == "sgd" else f" {cfg.optimizer}"  # the plots' title:
    title = f"hidden_dim={cfg.hidden_dim}{opt} lr={cfg.lr:g} reg={cfg.reg:g} seed={cfg.seed} · {job.epoch} epochs"
    summary = {"status": job.status, "epoch": job.epoch, "epochs": cfg.epochs, **artifacts.final_figures(job.history)}
    stopped = signal.Signals(stop_signal).name if job.status == "interrupted" and stop_signal else None
    summary |= ran | {"dtype": cfg.dtype, "run_dir": str(run_dir.resolve()), "signal": stopped}
    summary |= {"versions": artifacts.versions(), "classes": list(data.classes), "data_sha256": data.digest}
    summary |= classifier_figures(data, job.state["params"]) | {"config": to_dict(cfg)}
    checkpoint.save(run_dir / checkpoint.CHECKPOINT, checkpoint.of(job, job.status, data))
    artifacts.write_metrics(run_dir / "metrics.csv", job.history)
    artifacts.write_json(run_dir / "summary.json", summary)
    if cfg.logger == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as tb:
            for row in job.history:
                for key in METRICS:
                    tb.add_scalar(key, row[key], int(row["epoch"]))
    try:  # a plot that cannot be drawn (memory, a font) costs the plot, not the run
        if cfg.plots and job.epoch > 0:  # (no matplotlib import for an untrained run)
            plots.plot_curves(run_dir / "loss.png", job.history, title)
            if job.status != "diverged":
                plots.plot_confusion(run_dir / "confusion.png", np.array(summary["confusion"]["counts"]), data, title)
            if job.status != "diverged" and data.x_train.shape[1] >= 2:  # (a plane: 2 features, or 2 components)
                plots.plot_regions(run_dir / "decision_regions.png", job.state["params"], data, title)
        if cfg.animate and job.frames and job.status != "diverged" and data.x_train.shape[1] >= 2:
            plots.animate(run_dir / "training.gif", job.frames, job.history, data, title)
    except Exception as e:
        log.warning("%s: plots not drawn: %s", run_dir, exits.OOM if exits.out_of_memory(e) else exits.one_line(e))
    if cfg.logger == "mlflow" and track:  # (last: the store sees the dir's files; a store that fails is a note)
        summary["tracking"] = tracking.log_run(summary, run_dir, sweep)
        artifacts.write_json(run_dir / "summary.json", summary)
    return summary


def classifier_figures(data: Dataset, params: Params) -> dict[str, Any]:
    """The test set's per-class accuracy, its confusion matrix (rows: the true class, columns: the one
    predicted; points without a class or a finite prediction count in none) and its predictions: every
    point's, or of a test set over KEPT_PREDICTIONS points the misclassified ones (up to KEPT_PREDICTIONS)."""
    c, y = data.num_classes, data.y_test
    with np.errstate(all="ignore"):  # (a diverged run's weights are not finite; a class without test points: 0/0)
        probs = softmax(forward(params, data.x_test)[0])
        pred = np.where(np.isfinite(probs).all(axis=1), probs.argmax(axis=1), -1)  # (-1: no prediction)
        counts = np.bincount((c * y + pred)[(y >= 0) & (pred >= 0)], minlength=c * c).reshape(c, c)
        right = artifacts.clean(np.diag(counts) / np.bincount(y[y >= 0], minlength=c))  # (as summary.json has it)
    keep = np.flatnonzero(((y >= 0) & (pred != y)) | (len(y) <= KEPT_PREDICTIONS))[:KEPT_PREDICTIONS]
    rows = artifacts.prediction_rows(data.raw(data.x_test[keep]), probs[keep], data.classes, y[keep], data.quadrants)
    figures = {"per_class_accuracy": dict(zip(map(str, data.classes), right, strict=True)), "test_points": len(y)}
    return figures | {"confusion": {"classes": list(data.classes), "counts": counts.tolist()}, "predictions": rows}


def write_failed(run_dir: Path, error: BaseException | str, config: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> None:  # fmt: skip
    """A job that could not train: its dir says why, in one line (and which job it was: its overrides); a dir
    that holds another program's files (:func:`theirs`) is left as it is."""
    if theirs(Path(run_dir)):
        return
    summary = {"status": "failed", "error": " ".join(str(error).split()), "versions": artifacts.versions()}
    summary |= {"config": config} | ({"overrides": overrides} if overrides is not None else {})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    artifacts.write_json(Path(run_dir) / "summary.json", summary)
