"""What a run leaves in its dir, written by one function for single runs and sweep jobs alike.

:func:`write` takes a job as the loop left it and writes, in this order, ``checkpoint.npz``
(what resume and predict read), ``metrics.csv``, ``summary.json`` (before anything slow, so
that a signal during the plots loses nothing), then the plots.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np

from quadnet import artifacts, checkpoint, plots
from quadnet.config import ConfigError, to_dict
from quadnet.data import make_dataset
from quadnet.engines.numpy import forward, softmax
from quadnet.loop import Job

log = logging.getLogger("quadnet")


LOCKS: dict[str, int] = {}  # run and sweep dirs this process holds


def lock(folder: Path, what: str = "sweep") -> None:
    """Hold ``folder`` for the life of this process (flock on the dir itself: it dies with the
    process and leaves no file), so that a second run or sweep into it is refused."""
    key = str(folder.resolve())
    if key in LOCKS:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another {what} is writing into {key}; wait for it or choose another dir") from None
    LOCKS[key] = fd


def write(
    run_dir: Path,
    job: Job,
    ran: dict[str, Any],
    stop_signal: int | None = None,
    extra: dict | None = None,
    sweep: Path | None = None,
    end_sweep: bool = True,
) -> dict[str, Any]:
    """Write a finished job's dir; return its summary. ran: where and how it trained (``device``,
    ``engine``, ``train_seconds``: the training loop's time); extra: more keys for the summary;
    sweep: the sweep dir of a sweep's job (its MLflow run is nested in the sweep's, which end_sweep ends)."""
    cfg, run_dir, data = job.cfg, Path(run_dir), make_dataset(job.cfg.data)
    run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.remove_stale(run_dir)
    final, params = job.history[-1], job.state["params"]
    opt = "" if cfg.optimizer == "sgd" else f" {cfg.optimizer}"  # the plots' title:
    title = f"hidden_dim={cfg.hidden_dim}{opt} lr={cfg.lr:g} reg={cfg.reg:g} seed={cfg.seed} · {job.epoch} epochs"
    with np.errstate(all="ignore"):  # a diverged run's weights are not finite
        probs = softmax(forward(params, data.x_test)[0])
    summary = {
        "status": job.status,
        "epoch": job.epoch,
        "epochs": cfg.epochs,
        "final_loss": final["loss"],
        **{key: final[key] for key in ("test_loss", "train_accuracy", "test_accuracy")},
        **ran,
        "dtype": cfg.dtype,
        "run_dir": str(run_dir.resolve()),
        "signal": signal.Signals(stop_signal).name if job.status == "interrupted" and stop_signal else None,
        **(extra or {}),
        "versions": artifacts.versions(),
        "classes": list(data.classes),
        "predictions": artifacts.prediction_rows(data.x_test, probs, data.classes, data.y_test, data.quadrants),
        "config": to_dict(cfg),
    }
    state = checkpoint.arrays(job.state, epoch=job.epoch, config=summary["config"], status=job.status,
                              history=job.history, classes=data.classes)  # fmt: skip
    checkpoint.save(run_dir / checkpoint.CHECKPOINT, state)
    artifacts.write_metrics(run_dir / "metrics.csv", job.history)
    artifacts.write_json(run_dir / "summary.json", summary)
    if cfg.logger == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as tb:
            for row in job.history:
                for key in ("loss", "train_accuracy", "test_accuracy", "test_loss"):
                    tb.add_scalar(key, row[key], int(row["epoch"]))
    if cfg.plots and job.epoch > 0:  # no matplotlib import for an untrained run (plots imports it when it draws)
        plots.plot_curves(run_dir / "loss.png", job.history, title)
        if job.status != "diverged":
            plots.plot_regions(run_dir / "decision_regions.png", params, data, title)
    if cfg.animate and job.frames and job.status != "diverged":
        plots.animate(run_dir / "training.gif", job.frames, job.history, data, title)
    if cfg.logger == "mlflow":  # (last: the store sees the dir's files; a store that fails is a note)
        from quadnet.tracking import log_run

        summary["tracking"] = log_run(summary, job.history, run_dir, sweep, end_sweep)
        artifacts.write_json(run_dir / "summary.json", summary)
    return summary


def write_failed(
    run_dir: Path, error: BaseException | str, config: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """A job that could not train: its dir says why, in one line (and which job it was: its overrides)."""
    why = " ".join(str(error).split())
    summary = {"status": "failed", "error": why, "versions": artifacts.versions(), "config": config}
    summary |= {"overrides": overrides} if overrides is not None else {}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    artifacts.write_json(Path(run_dir) / "summary.json", summary)
    return summary


def headline(s: dict[str, Any], table: bool = True, level: int = logging.INFO) -> None:
    """How a run ended, after its table of test points unless table=False (sweep jobs); a point
    predicted wrongly is marked, as the plots ring it."""
    preds = s["predictions"][:8] if table else []
    points = ["({:g}, {:g})".format(*p["point"]) for p in preds]
    w = max([16, *map(len, points)])
    lines = ["", f"{'point':>{w}}  {'predicted':>9}  {'p(predicted)':>12}  {'true':>4}"] if preds else []
    for point, p in zip(points, preds, strict=True):
        q, t = p["predicted"], p["true"]
        prob = p["probs"][s["classes"].index(q)] if q is not None else math.nan
        wrong = "  ✗ wrong" if q is not None and t is not None and q != t else ""
        lines.append(
            f"{point:>{w}}  {q if q is not None else '-':>9}  {prob:>12.9f}  {t if t is not None else '-':>4}{wrong}"
        )
    if table and len(s["predictions"]) > 8:
        lines.append(f"{'…':>{w}}  ({len(s['predictions']) - 8} more test points in summary.json)")

    def num(v: float | None, pct: bool = False) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%" if pct else f"{v:.6g}"

    status = f"status {s['status']} at epoch {s['epoch']}/{s['epochs']}"
    if not table and s.get("overrides"):  # a sweep's job: which one
        status = f"[{' '.join(s['overrides'])}] {status}"
    accuracy = f"train accuracy {num(s['train_accuracy'], True)}   test accuracy {num(s['test_accuracy'], True)}"
    lines.append(f"{status}   {accuracy}   final loss {num(s['final_loss'])}   train_seconds {s['train_seconds']:.3f}")
    lines.append(f"run dir: {s['run_dir']}")
    log.log(level, "\n".join(lines))
