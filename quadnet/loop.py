"""The training loop: every job of a batch to its own end. A single run is a batch of one.

:func:`fit` reads top to bottom: finish the jobs whose epochs are reached, run every other
job to the next point where one of them logs, checkpoints, draws a frame or ends, take the
jobs whose loss went non-finite out at the exact epoch, and record metrics at each job's
log points. A signal (:func:`quadnet.exits.listening`) ends every job as ``interrupted`` at
the same step. The caller writes each job's dir from its :class:`Job`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.config import ConfigError, TrainConfig, log_every
from quadnet.data import Dataset
from quadnet.device import describe, resolve_device
from quadnet.engines import METRICS, build
from quadnet.exits import OOM
from quadnet.model import initial_params

log = logging.getLogger("quadnet")
FRAMES = 50  # training.gif's frames at most


@dataclass
class Job:
    """One job's progress: where it starts and, once it leaves the loop, how it ended."""

    cfg: TrainConfig
    state: dict[str, Any]  # params, optimizer buffers and step: at the start, then at `epoch`
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    status: str = "running"  # then completed | diverged | interrupted
    frames: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (epoch, params) if cfg.animate
    name: str = ""  # in a sweep, its run dir (where its checkpoints go while its batch trains)
    on_log: Callable[[dict[str, float]], None] | None = None  # given each metrics row as it is recorded (tracking)


def start_state(c: TrainConfig, data: Dataset | None = None) -> dict[str, Any]:
    """A fresh job's state: its initial weights (the data's features and classes; without data, the
    quadrants' 2 and 4), no optimizer buffers yet, step 0."""
    shape = (data.num_classes, data.x_train.shape[1]) if data is not None else (4, 2)
    return {"params": initial_params(c.hidden_dim, c.seed, c.init, *shape), "optimizer": {}, "step": 0}


def frame_epochs(epochs: int) -> set[int]:
    """Where training.gif's frames are: epoch 0, then log-spaced (the regions change most early on)."""
    return {0, *np.unique(np.geomspace(1, max(epochs, 1), FRAMES - 1).round().astype(int)).tolist()}


def fit(
    engine: Any, jobs: list[Job], stop: Callable[[], bool], save: Callable[[list[Job]], None] | None, quiet: bool
) -> None:
    """Train the jobs in `engine` (all at the same start epoch, sharing checkpoint_every); each logs
    at its own log points. `save(jobs)` is called at each checkpoint; quiet: no progress shown."""
    epoch, ckpt_every = jobs[0].epoch, jobs[0].cfg.checkpoint_every if save else 0
    every = [log_every(j.cfg) for j in jobs]
    frames = [frame_epochs(j.cfg.epochs) if j.cfg.animate else set() for j in jobs]
    kind = [(every[j], jobs[j].cfg.epochs, jobs[j].cfg.animate) for j in range(len(jobs))]  # (same stops)
    points = [{j.cfg.epochs, *f} for j, f in zip(jobs, frames, strict=True)]  # metrics besides the log points

    def record(final: bool = False) -> None:
        """Metrics at this epoch for jobs at their log points and frames (the GIF's loss panel), and frames."""
        ms = engine.metrics()
        pick = [r for r, j in enumerate(engine.rows) if final or epoch % every[j] == 0 or epoch in points[j]]
        for r in pick:
            j = jobs[engine.rows[r]]
            if not j.history or j.history[-1]["epoch"] != epoch:
                j.history.append({"epoch": epoch, **ms[r]})
                if j.on_log:
                    j.on_log(j.history[-1])
        framed = [r for r, j in enumerate(engine.rows) if epoch in frames[j]]
        for r, state in zip(framed, engine.export(framed), strict=True):
            jobs[engine.rows[r]].frames.append((epoch, state["params"]))
        # a loss that is not finite at a log point (after the last step, too) is a divergence
        finish([r for r in pick if not math.isfinite(ms[r]["loss"])], "diverged", epoch)

    def finish(rows: list[int], status: str, at: int | list[int]) -> None:
        if not rows:
            return
        for i, (r, state) in enumerate(zip(rows, engine.export(rows), strict=True)):
            j = jobs[engine.rows[r]]
            j.state, j.status, j.epoch = state, status, at[i] if isinstance(at, list) else at
            if status == "diverged":
                j.history = [h for h in j.history if h["epoch"] < j.epoch]
                j.history.append({"epoch": j.epoch, **dict.fromkeys(METRICS, math.nan)})  # its last row
        engine.keep([r for r in range(len(engine.rows)) if r not in set(rows)])

    def next_stop(j: int) -> int:
        """The next epoch at which job j logs, draws a frame, checkpoints or ends."""
        points = [(epoch // every[j] + 1) * every[j], jobs[j].cfg.epochs, *(f for f in frames[j] if f > epoch)]
        return min(points + ([(epoch // ckpt_every + 1) * ckpt_every] if ckpt_every else []))

    bar = progress(jobs, epoch) if not quiet else lambda *a, **k: None
    record()
    while engine.rows:
        # 1. jobs that reached their epochs are done; a signal ends the others here
        finish([r for r, j in enumerate(engine.rows) if jobs[j].cfg.epochs <= epoch], "completed", epoch)
        if engine.rows and stop():
            record(final=True)
            finish(list(range(len(engine.rows))), "interrupted", epoch)
        if not engine.rows:
            break
        # 2. every other job to the next point where one of them logs, draws, checkpoints or ends
        target = min(next_stop(j) for j in {kind[j]: j for j in engine.rows}.values())
        done, first = engine.run(target - epoch, stop)
        # 3. a job whose loss went non-finite stops at that epoch
        bad = [r for r, b in enumerate(first) if b >= 0]
        finish(bad, "diverged", [epoch + first[r] for r in bad])
        epoch += done
        # 4. metrics at log points, and a checkpoint at its points
        if engine.rows and epoch == target:
            record()
        bar(done, len(engine.rows), epoch)
        if save and ckpt_every and epoch % ckpt_every == 0 and any(jobs[j].cfg.epochs > epoch for j in engine.rows):
            for r, state in enumerate(engine.export(list(range(len(engine.rows))))):
                jobs[engine.rows[r]].state, jobs[engine.rows[r]].epoch = state, epoch
            save(jobs)
    bar(0, 0, epoch, close=True)


def train_batch(jobs: list[Job], data: Any, device: str, stop: Callable[[], bool] = lambda: False,
                save: Any = None, quiet: bool = False) -> Any:  # fmt: skip
    """Jobs of one group, on their data, through :func:`fit` on a device (its name, as config's ``device`` says it):
    the device as summaries record it, the engine's name, the jobs and the seconds; or, for a device
    that is not there, the ConfigError itself (what a submitit job runs where it lands; the error
    comes back whole)."""
    try:
        device = "cpu" if jobs[0].cfg.engine in ("numba", "numpy") else resolve_device(device)
    except ConfigError as e:
        return e
    engine = build([j.cfg for j in jobs], data, [j.state for j in jobs], device)
    t0 = time.perf_counter()
    fit(engine, jobs, stop, save, quiet)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return describe(device), engine.name, jobs, time.perf_counter() - t0


# ---------------------------------------------------------------------- what surrounds the loop


def progress(jobs: list[Job], start: int) -> Callable[..., None]:
    """A tqdm bar on a terminal (or as `progress=` says); else about ten plain lines a run."""
    every, total = log_every(jobs[0].cfg), max(j.cfg.epochs for j in jobs)
    if (show := jobs[0].cfg.progress) is None:  # a terminal that says how wide it is (`script -qc` says 0, or nothing)
        with contextlib.suppress(OSError, ValueError):
            show = sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    what = f"{len(jobs)} jobs" if len(jobs) > 1 else "epoch"
    if show and total > start:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="epoch", desc=what, dynamic_ncols=True, leave=False)

        def update(done: int, left: int, epoch: int, close: bool = False) -> None:
            bar.update(done)
            if len(jobs) > 1:
                bar.set_postfix_str(f"{left} training", refresh=False)
            if close:
                bar.close()

        return update
    step = max(every, math.ceil(max(1, total // 10) / every) * every)

    def lines(done: int, left: int, epoch: int, close: bool = False) -> None:
        if close or not done or (epoch % step and epoch != total):
            return
        head, h = f"epoch {epoch:>{len(str(total))}}/{total}", jobs[0].history[-1] if jobs[0].history else {}
        if len(jobs) > 1:
            log.info("%s  %d of %d jobs training", head, left, len(jobs))
        elif h.get("epoch") == epoch:
            log.info("%s  loss %.6g  train_acc %.3f  test_acc %.3f", head, *(h[k] for k in METRICS[:3]))

    return lines


def check_memory(c: TrainConfig, data: Any) -> None:
    """Refuse, before anything is written, a job whose activations cannot fit in the memory that is
    available (Linux's MemAvailable; elsewhere nothing is checked): an engine holds a few (N, H)
    arrays of the larger split. Raises ConfigError."""
    need, free = 4 * 8 * c.hidden_dim * max(len(data.x_train), len(data.x_test)), math.inf
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        free = 1024 * int(next(ln for ln in lines if ln.startswith("MemAvailable:")).split()[1])
    if need > free:
        raise ConfigError(f"{OOM}: a job needs ~{need / 2**30:.3g} GiB, {free / 2**30:.3g} GiB are available")
