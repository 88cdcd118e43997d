"""The batched launcher's work: quadnet's jobs of a sweep trained as a few batched programs, in
chunks, so that memory does not grow with the sweep.

Reading order: :func:`launch` takes the jobs in chunks of at most ``max_batch`` (1,024 on the
CPU). Each chunk is composed (:class:`quadnet.compose.Composer`), each job's start found (new,
resumed from a checkpoint, or completed before), grouped (:func:`group_key`), trained
(:func:`train_here`, or :func:`train_submitit` on a cluster) in a helper thread, and its dirs
written while the next chunk trains; then it is dropped. What stays of a job for the whole
sweep is its status and objective (:class:`Returns`, Hydra's ``JobReturn`` made when read). A
job that fails (a bad value, memory, any exception) fails alone; Ctrl-C or SIGTERM ends every
running job as ``interrupted``, writes its dir and exits 130/143; the same command resumes the
sweep. A task function that is not quadnet's runs through Hydra's ``run_job`` as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import logging
import math
import os
import sys
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

from quadnet import artifacts, checkpoint, console, exits, loop, rundir, table, tracking
from quadnet.config import ConfigError, TrainConfig, check, check_installed, one_line, to_dict, unknown_key, validate
from quadnet.data import Dataset, make_dataset
from quadnet.device import gpu_possible

log = logging.getLogger(__name__)

# one line per sweep; `python -m quadnet.bench sweep` reads it back
TIMING_LINE = "composed %d jobs in %.2f s, trained in %.2f s, wrote their results in %.2f s; %.2f s in all"
CHATTY = 16  # sweeps up to this size log a line per job; bigger ones a summary
CPU_BATCH = 1024  # most jobs in one CPU batch by default (bigger batches cost more per job: bench step)
CUDA_CHUNK = 16384  # most jobs composed at once on CUDA (a batch may hold more, memory permitting)
BATCH_SAVE_SECONDS = 10.0  # a batch's checkpoints at most this often: saving every job is not free
ENDED: Counter[str] = Counter()  # how the jobs of this process's launches ended (train.Callbacks' line)
RECORD: list[tuple[Path, Any]] = []  # multirun.yaml and what it held before this sweep (BatchedLauncher.setup)


@dataclasses.dataclass
class Job:
    """One job of a batched sweep, from its overrides to its result."""

    idx: int
    overrides: list[str]
    dir: Path  # its output dir (hydra.runtime.output_dir)
    cfg: TrainConfig | None = None
    data: Dataset | None = None
    config: Any = None  # Hydra's composition, for a job the Composer leaves to Hydra
    kept: bool = False  # completed in an earlier launch of this sweep: its dir is kept as it is
    start: loop.Job | None = None  # where it starts: afresh, or an unfinished job resumed
    result: loop.Job | None = None
    error: str | None = None  # why it failed, in one line
    ran: dict[str, Any] = dataclasses.field(default_factory=dict)  # device, engine, train_seconds, overrides, batch


class SweepRefused(ConfigError):
    """The sweep dir holds runs that this sweep cannot continue: it is refused before anything is written."""


class Returns(Sequence[JobReturn]):
    """Every job's JobReturn, made when it is read: the sweep keeps a value a job, its objective or (a
    failed job's) its error. It is read once every job is written (a signal ends the sweep before)."""

    def __init__(self, overrides: Sequence[Sequence[str]], name: str) -> None:
        self.overrides, self.name, self.errors, self.value = overrides, name, {}, array("d", bytes(8 * len(overrides)))

    def __len__(self) -> int:
        return len(self.overrides)

    def __getitem__(self, i: Any) -> Any:  # (an index: Hydra's sweepers only iterate the launch's results)
        status, value = JobStatus.FAILED if i in self.errors else JobStatus.COMPLETED, self.errors.get(i, self.value[i])
        return JobReturn(
            list(self.overrides[i]), working_dir=os.getcwd(), task_name=self.name, status=status, _return_value=value
        )


def refuse_resume(resume: str | None) -> None:
    if resume:
        raise SweepRefused(
            f"resume={resume!r} is not for batched sweeps: to go on with a sweep, run it again with "
            "hydra.sweep.dir=<its dir>; to go on with one of its jobs, run that job alone (without -m)"
        )


def batchable(task: Any) -> bool:
    """Whether a task function is quadnet's (:func:`quadnet.train.task`): its jobs train in batches."""
    return getattr(task, "__module__", None) == "quadnet.train" and getattr(task, "__name__", None) == "task"


def group_key(j: Job) -> tuple[Any, ...]:
    """Jobs that train as one batch share data, precision, device, engine, step, optimizer, checkpoint
    points and start epoch. The NumPy engine trains one job at a time."""
    c = j.start.cfg  # type: ignore[union-attr]
    return (repr(c.data), c.dtype, c.device, c.engine, c.step, c.optimizer, c.checkpoint_every, j.start.epoch,  # type: ignore
            c.engine == "numpy" and j.idx)  # fmt: skip


# ---------------------------------------------------------------------- resuming a sweep


KEPT_KEYS = {"status": str, "epoch": int, "epochs": int, "train_seconds": (int, float), "run_dir": str, "config": dict}
KEPT_KEYS |= dict.fromkeys(("final_loss", "train_accuracy", "test_accuracy"), (int, float, type(None)))


def completed(folder: Path) -> dict[str, Any]:
    """A completed run's summary.json; {} when it is missing, damaged (a key missing or of another
    type: the job trains again), or of another status."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, RecursionError):
        s = json.loads((folder / "summary.json").read_text())
        ok, overrides = all(k in s and isinstance(s[k], t) for k, t in KEPT_KEYS.items()), s.get("overrides", [])
        ok = ok and isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)
        return s if ok and s["status"] == "completed" and "objective" in s["config"] else {}
    return {}


def resumable(job: Job, c: TrainConfig, data: Dataset) -> loop.Job:
    """Where a job (config c, as trained) starts: afresh, or from the checkpoint in its dir (a
    diverged one aside). A job that completed at c.epochs, as its summary and its checkpoint both
    say, is kept as it is. A checkpoint it cannot go on from (:func:`quadnet.checkpoint.resume_check`)
    refuses the sweep (:class:`SweepRefused`): going on would throw its training away."""
    ck = None
    with contextlib.suppress(checkpoint.CheckpointError):  # a damaged or half-written one: the job trains again
        ck = checkpoint.load(here) if (here := checkpoint.in_dir(job.dir)) else None
    if ck is None or ck["status"] == "diverged":
        return loop.Job(c, loop.start_state(c, data))
    try:
        checkpoint.resume_check(ck, c, data)
    except ConfigError as e:
        why = f"run the sweep with the settings it had and epochs >= {ck['epoch']}, or choose another hydra.sweep.dir"
        raise SweepRefused(f"{job.dir} holds a run at epoch {ck['epoch']} and {e}; {why}") from None
    done, finite = completed(job.dir), all(np.isfinite(v).all() for v in ck["params"].values())
    kept = ck["status"] == "completed" and ck["epoch"] == c.epochs == done.get("epoch") and finite
    # kept only when its summary is this checkpoint's (a summary copied in from another job is not)
    status = "completed" if kept and done["config"] == ck["config"] else "running"
    return loop.Job(c, ck["state"], ck["epoch"], ck["history"], status=status)


EXECUTORS = ("local", "slurm", "debug")  # submitit's clusters ("debug": in this process)


def check_options(opts: dict[str, Any]) -> None:
    """The batched launcher's options (hydra.launcher.*), checked; ConfigError in one line."""
    from hydra_plugins.quadnet_batched_launcher.config import BatchedLauncherConf

    known = [f.name for f in dataclasses.fields(BatchedLauncherConf) if f.name != "_target_"]
    if unknown := sorted(set(opts) - set(known) - {"_target_"}):
        raise ConfigError(unknown_key(f"hydra.launcher.{unknown[0]}", known, "the batched launcher's keys"))
    for key, zero in (("max_batch", "what fits"), ("mlflow_runs", "none")):
        if opts[key] < 0:
            raise ConfigError(f"hydra.launcher.{key}={opts[key]!r} is not allowed: must be >= 0 (0: {zero})")
    if opts["executor"] not in (None, *EXECUTORS):
        allowed = f"choose one of {', '.join(EXECUTORS)}, or null"
        raise ConfigError(f"hydra.launcher.executor={opts['executor']!r} is not allowed: {allowed}")
    if opts["executor"] is not None and importlib.util.find_spec("submitit") is None:
        raise ConfigError(f"hydra.launcher.executor={opts['executor']} needs submitit: pip install submitit")


def check_table_only(task: Any, config: Any, callbacks: list[Any]) -> None:
    """A sweep without job dirs (hydra.launcher.job_dirs=false) keeps Hydra's grammar, sweepers and
    multirun.yaml; what needs a job's dir is refused, in one line."""
    dirs = "needs job dirs: drop hydra.launcher.job_dirs=false"
    if not batchable(task):
        raise ConfigError(f"hydra.launcher.job_dirs=false is for quadnet's jobs: {task.__name__} {dirs}")
    if config.hydra.job.chdir:
        raise ConfigError(f"hydra.job.chdir=true {dirs}")
    if (subdir := OmegaConf.to_container(config.hydra.sweep)["subdir"]) != "${hydra.job.num}":
        raise ConfigError(f"hydra.sweep.subdir={subdir} {dirs}")
    if other := [type(c).__name__ for c in callbacks if not type(c).__module__.startswith("quadnet")]:
        raise ConfigError(f"the job callback {other[0]} {dirs}")


# ---------------------------------------------------------------------- training


def _saver(data: Dataset) -> Callable[[list[loop.Job]], None]:
    """While a batch trains, each job's checkpoint goes to its dir (made now: a run dir of a job that
    has not ended holds its checkpoint alone) at its checkpoint points, but at most once every
    BATCH_SAVE_SECONDS and never more than a tenth of the time (1,024 files, a second on a slow disk)."""
    last, cost = -math.inf, 0.0

    def save(jobs: list[loop.Job]) -> None:
        nonlocal last, cost
        if (now := time.monotonic()) - last < max(BATCH_SAVE_SECONDS, 10 * cost):
            return
        try:  # (a convenience: training goes on without it, and each job's dir is written at the end)
            for j in jobs:
                Path(j.name).mkdir(parents=True, exist_ok=True)
                checkpoint.save(Path(j.name) / checkpoint.CHECKPOINT, checkpoint.of(j, "running", data))
        except OSError as e:
            log.warning("no checkpoint written for the batch: %s", one_line(e))
        last, cost = now, time.monotonic() - now

    return save


def on_cuda(c: TrainConfig) -> bool:
    """Whether a job trains on CUDA (torch is imported only where a GPU may be there)."""
    if not c.device.startswith(("cuda", "auto")) or c.engine in ("numba", "numpy") or not gpu_possible():
        return False
    import torch

    return torch.cuda.is_available()


def _batches(groups: list[list[Job]], max_batch: int) -> list[list[Job]]:
    """Each group in batches of at most max_batch jobs; 0: up to 1,024 on the CPU, and on CUDA
    what half the free memory holds (activations and temporaries, counted generously)."""
    out = []
    for g in groups:
        size = max_batch or CPU_BATCH
        if not max_batch and on_cuda(g[0].cfg):  # type: ignore[arg-type]
            import torch

            d, h = g[0].data, max(j.cfg.hidden_dim for j in g)  # type: ignore[union-attr]
            free = torch.cuda.mem_get_info()[0] * 0.5
            size = max(1, int(free) // (8 * (16 * max(len(d.x_train), len(d.x_test)) * (h + 4) + 128 * h)))
        out += [g[i : i + size] for i in range(0, len(g), size)]
    return out


def _done(batch: list[Job], out: Any, **extra: Any) -> None:
    """A batch's outcome into its jobs: an error for each, or its result and its share of the time
    (in proportion to the steps it trained, so that a 10-epoch job shows less than a 10,000-epoch one)."""
    if isinstance(out, Exception):
        for j in batch:
            j.error = str(out)
        return
    device, engine, done, seconds = out
    steps = [max(r.epoch - j.start.epoch, 0) for j, r in zip(batch, done, strict=True)]  # type: ignore[union-attr]
    for j, r, s in zip(batch, done, steps, strict=True):
        j.result, j.ran = r, {"train_seconds": seconds * s / max(sum(steps), 1), "device": device, "engine": engine}
        j.ran |= {"overrides": j.overrides, "batch": {"jobs": len(batch), "seconds": seconds, **extra}}


def train_here(
    groups: list[list[Job]], max_batch: int, stop: Callable[[], bool], quiet: bool, dirs: bool = True
) -> None:
    """Each batch in this process; a batch that fails is split until the failing job fails alone."""
    todo = _batches(groups, max_batch)
    for batch in todo:  # (a batch split in two is appended: its halves train in this loop too)
        starts = [dataclasses.replace(j.start, history=list(j.start.history), name=str(j.dir)) for j in batch]  # type: ignore
        try:
            save = _saver(batch[0].data) if dirs else None  # (a sweep without job dirs keeps no checkpoints)
            _done(batch, loop.train_batch(starts, batch[0].data, batch[0].cfg.device, stop, save, quiet))  # type: ignore
        except Exception as e:
            if len(batch) > 1:
                todo += [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
            else:
                _done(batch, RuntimeError(one_line(e)))


def train_submitit(groups: list[list[Job]], opts: dict[str, Any], folder: Path) -> None:
    """Each batch as one submitit job (all of them a SLURM job array on a cluster), as the launcher's
    options (opts) say; a batch that fails (a crash, a timeout, a device not there) fails each of
    its jobs, naming its log."""
    import submitit

    params = OmegaConf.to_container(OmegaConf.create(opts["executor_params"] or {}))
    ex = submitit.AutoExecutor(folder=folder, cluster=opts["executor"])
    try:
        ex.update_parameters(**params)  # type: ignore[arg-type]
    except Exception as e:  # submitit's words for an unknown or bad parameter
        raise ConfigError(f"hydra.launcher.executor_params={params!r} is not allowed: {one_line(e)}") from None
    batches = _batches(groups, opts["max_batch"])
    with ex.batch():
        futures = [ex.submit(loop.train_batch, [j.start for j in b], b[0].data, b[0].cfg.device) for b in batches]  # type: ignore
    log.info("Submitted %d batched program(s) to submitit (%s) in %s", len(batches), opts["executor"], folder)
    for batch, future in zip(batches, futures, strict=True):
        try:
            _done(batch, future.result(), submitit_job=future.job_id)
        except Exception as e:
            why = f"submitit job {future.job_id} failed: {one_line(e)} (log: {future.paths.stderr})"
            _done(batch, RuntimeError(why))


# ---------------------------------------------------------------------- the launcher


class Sweep:
    """One launch: its chunks composed, started, trained and written in turn."""

    def __init__(self, launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> None:
        self.ctx, self.config, self.opts = launcher.hydra_context, launcher.config, launcher.options
        hc = self.config.hydra
        self.dir, self.overrides, self.first = Path(str(hc.sweep.dir)), job_overrides, first
        self.root = Path(os.path.abspath(self.dir))  # (a job's dir: root / its number)
        # counts: how jobs started; ended: how the jobs written ended
        self.quiet, self.counts, self.seconds, self.ended = len(job_overrides) > CHATTY, Counter(), Counter(), Counter()
        numbered = OmegaConf.to_container(hc.sweep)["subdir"] == "${hydra.job.num}"  # type: ignore[index]
        loader = self.ctx.config_loader  # (else Hydra makes each job's dir, and calls the callbacks)
        lean = numbered and all(type(c).__module__.startswith("quadnet") for c in self.ctx.callbacks.callbacks)
        self.composer = loader.composer(self.config) if lean and hasattr(loader, "composer") else None
        self.loader, self.returns = getattr(loader, "_loader", loader), Returns(job_overrides, str(hc.job.name))
        size = int(self.opts["max_batch"]) or (CUDA_CHUNK if on_cuda(TrainConfig()) else CPU_BATCH)
        self.chunk = size * (16 if self.opts["executor"] else 1)  # (a cluster trains 16 batches at once)
        self.quiet_training = len(job_overrides) > self.chunk  # a chunk's progress is a line, not a bar
        self.datasets: dict[str, Dataset] = {}  # each data config's (its repr), made once
        self.tracked, self.best = False, math.inf  # a job logs to MLflow: the sweep's run, and its best objective
        self.dirs = bool(self.opts["job_dirs"])  # else the table alone (quadnet.table)

    def hydra_config(self, idx: int, overrides: list[str]) -> Any:
        """Job idx composed by Hydra, with what Hydra's launchers set (its id and number) and what its
        run_job will (its output dir)."""
        config = self.loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id, config.hydra.job.num = str(idx), idx
            config.hydra.runtime.output_dir = os.path.abspath(self.dir / str(config.hydra.sweep.subdir))
        return config

    def run_job(self, task: Callable[[Any], Any], config: Any) -> JobReturn:
        """A job as Hydra's launchers run it: task inside its .hydra/, log and callbacks."""
        return run_job(task, config, "hydra.sweep.dir", "hydra.sweep.subdir", hydra_context=self.ctx)

    def job(self, i: int) -> Job:
        """Job i composed, and where it starts; a bad value fails the job (its error), not the sweep.
        An earlier run in its dir that it cannot go on with refuses the sweep (SweepRefused)."""
        job = Job(self.first + i, list(self.overrides[i]), self.root / str(self.first + i))
        try:
            typed = self.composer.typed(job.overrides) if self.composer is not None else None
            if typed is None:
                job.config = self.hydra_config(job.idx, job.overrides)
                job.dir = Path(job.config.hydra.runtime.output_dir)
            job.cfg = validate(job.config) if typed is None else check(typed)
            check_installed(job.cfg)
            refuse_resume(job.cfg.resume)
            if (data := repr(job.cfg.data)) not in self.datasets:  # (each data config's made once)
                if len(self.datasets) > 64:  # (jobs keep theirs: this only saves making one again)
                    self.datasets.clear()
                self.datasets[data] = make_dataset(job.cfg.data)
            job.data = self.datasets[data]
            # without job dirs a job's history is not kept: its figures at its start and end alone (1/3 of the time)
            table_only = {"log_every": max(job.cfg.epochs, 1)} if not self.dirs else {}
            plots = job.cfg.plots and self.opts["plots"]
            job.cfg = dataclasses.replace(job.cfg, data=job.data.config, plots=plots, **table_only)
            if not self.dirs:  # (each job afresh: a chunk that ended is in the table, and not composed again)
                if job.cfg.logger == "tensorboard":
                    raise ConfigError(f"logger={job.cfg.logger} needs job dirs: drop hydra.launcher.job_dirs=false")
                job.start = loop.Job(job.cfg, loop.start_state(job.cfg, job.data))
                return job
            if rundir.held(job.dir):
                raise ConfigError(f"another run or sweep is writing into {job.dir}: this sweep leaves it alone")
            if job.dir.is_dir() and checkpoint.in_dir(job.dir) is None and (theirs := rundir.theirs(job.dir)):
                raise SweepRefused(f"{job.dir} holds {theirs[0]}, which the run would write over: choose another dir")
            job.start = resumable(job, job.cfg, job.data)
            if job.start.status == "completed":
                job.result, job.kept = job.start, True
        except (ConfigError, checkpoint.CheckpointError) as e:
            why = str(e) if isinstance(e, SweepRefused) else f"{e} ({job.dir} holds an earlier run)"
            if isinstance(e, SweepRefused) or checkpoint.in_dir(job.dir) is not None:  # (an earlier run's dir)
                raise SweepRefused(why) from None
            job.error = str(e)
        return job

    def train(self, jobs: list[Job], stop: Any) -> list[Job]:
        if stop():  # (a chunk composed ahead when a signal came: neither trained nor written, its jobs not reached)
            return []
        self.counts.update("refused" if j.start is None else j.start.status if j.start.epoch else "new" for j in jobs)
        t0, groups = time.perf_counter(), defaultdict(list)
        for j in jobs:
            if j.start is not None and not j.kept:
                groups[group_key(j)].append(j)
        if self.opts["executor"] is None:
            train_here(list(groups.values()), self.opts["max_batch"], stop, self.quiet_training, self.dirs)
        elif groups:
            train_submitit(list(groups.values()), self.opts, self.dir / ".submitit")
        self.seconds["train"] += time.perf_counter() - t0
        return jobs

    def write(self, training: Future[list[Job]] | None, stop: exits.Stop) -> None:
        """Each job's dir, once its chunk has trained (none: no chunk is training): for a job the
        Composer made, its files (:func:`quadnet.rundir.write`: summary.json holds its config and
        overrides, multirun.yaml the sweep's Hydra config, so no ``.hydra/`` copy: three files a job,
        not five; a file cost ~0.7 ms and 4 KB here) and its log when it logs; for a job Hydra
        composed, Hydra's run_job around them (its .hydra/, log and callbacks)."""
        if training is None or not (jobs := training.result()):  # (none: a chunk that a signal left untrained)
            return
        t0, objectives, signum = time.perf_counter(), [], stop.signal  # (after the result: its time, and its signal)
        for j in jobs:
            if self.dirs:
                task = lambda _, j=j: self._write(j, signum)  # noqa: E731
                ret = self.run_job(task, j.config) if j.config is not None else self._write_lean(j, task)
                ok, value = ret.status == JobStatus.COMPLETED, ret._return_value
            else:
                ok, value = j.result is not None, ConfigError(j.error) if j.result is None else objective(j)
            (self.returns.value if ok else self.returns.errors)[j.idx - self.first] = value
            self.ended[j.result.status if ok else "failed"] += 1  # type: ignore[union-attr]
            objectives.append(value if ok else None)
            self.tracked |= j.cfg is not None and j.cfg.logger == "mlflow"
        if self.dirs:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        # the chunk's rows; without job dirs, a chunk a signal cut short is left out (it trains again)
        if written := self.dirs or all(j.result is None or j.result.status != "interrupted" for j in jobs):
            try:
                table.write_chunk(table.chunk_path(self.dir, jobs[0].idx), jobs, objectives)
                RECORD.clear()  # (results written: multirun.yaml stays, their record, whatever happens next)
            except OSError as e:  # (with job dirs, the table is a second copy: a note, not the sweep's end)
                if not self.dirs:
                    raise
                log.warning("the results table's chunk of jobs %d-%d not written: %s", jobs[0].idx, jobs[-1].idx, e)
        if self.tracked:  # (the sweep's run: its jobs written so far, and the best objective)
            self.best = min([self.best, *(v for v in objectives if isinstance(v, float))])
            tracking.progress(self.dir, sum(self.ended.values()), self.best if math.isfinite(self.best) else None)
        self.seconds["write"] += time.perf_counter() - t0
        if self.quiet_training and written:
            log.info("jobs %d-%d of %d written", jobs[0].idx, jobs[-1].idx, len(self.overrides))

    def ended_before(self) -> set[int]:
        """The chunks (by first job) that ended in an earlier launch of this sweep without job dirs, as its
        table says: their jobs' ends are taken from there, and they are not trained again. Checked before
        anything is written: a chunk that cannot be read (damaged, half-written) trains again; a chunk file
        of other jobs, settings or data refuses the sweep (SweepRefused), with job dirs or without."""
        n, ended = len(self.overrides), set()
        again = "run the sweep as it was (its overrides, config, data and max_batch), or choose another hydra.sweep.dir"
        artifacts.remove_stale(self.dir / table.RESULTS)  # (a writer killed mid-write)
        # (this launch's chunk files; another launch's, Optuna's batches, are not read)
        ours = [(p, first) for p in table.tables(self.dir) if 0 <= (first := int(p.stem[6:]) - self.first) < n]
        if off := [p for p, first in ours if first % self.chunk]:
            raise SweepRefused(f"{off[0]} is not a chunk of this sweep's (chunks of {self.chunk} jobs): {again}")
        for path, first in [] if self.dirs else ours:  # (with job dirs, each job's dir says where it starts)
            if (t := table.read_chunk(path, [*table.ROW, "meta"])) is None:
                log.warning("%s cannot be read: its jobs train again", path)
                continue
            rows, jobs = t.to_pylist(), range(first, min(first + self.chunk, n))
            if [(r["job"], r["overrides"]) for r in rows] != [(self.first + i, list(self.overrides[i])) for i in jobs]:
                raise SweepRefused(f"{path} holds other jobs than this sweep's {self.first + first} on: {again}")
            if any(r["status"] == "interrupted" for r in rows):  # (of a sweep with job dirs, stopped)
                continue
            for i, r in zip(jobs, rows, strict=True):
                if (job := self.job(i)).cfg is not None and r["meta"] is not None:
                    self.tracked |= job.cfg.logger == "mlflow"  # (a sweep stopped as it logged: logged at its end)
                    ck = {**json.loads(r["meta"]), "path": f"{self.dir}/{r['job']}"}
                    try:
                        checkpoint.resume_check(ck, job.cfg, job.data)
                        if (epochs := ck["config"]["epochs"]) != job.cfg.epochs:  # (no checkpoint to go on from)
                            raise ConfigError(f"job {r['job']} trained {epochs} epochs, not {job.cfg.epochs}")
                    except ConfigError as e:
                        raise SweepRefused(f"{path}: {e}; {again}") from None
                value = artifacts.summary_metric(r, job.cfg.objective) if job.cfg is not None else None
                self.returns.value[i] = math.inf if value is None else value  # (a failed job's: its error is read)
                if r["status"] == "failed":
                    self.returns.errors[i] = ConfigError(r["error"])
                self.ended[r["status"]] += 1
            self.counts["completed"] += len(rows)
            ended.add(first)
        return ended

    def _write_lean(self, job: Job, task: Callable[[Any], Any]) -> JobReturn:
        """A job the Composer made: task in its dir, logging to its log when it logs."""
        try:
            if job.error and (rundir.held(job.dir) or rundir.theirs(job.dir)):  # another's dir: not a byte goes there
                raise ConfigError(job.error)
            job.dir.mkdir(parents=True, exist_ok=True)
            with contextlib.ExitStack() as stack:
                if logging.getLogger("quadnet").isEnabledFor(logging.DEBUG if self.quiet else logging.INFO):
                    name = job.dir / f"{self.config.hydra.job.name}.log"
                    handler = stack.enter_context(contextlib.closing(logging.FileHandler(name)))
                    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
                    logging.getLogger().addHandler(handler)
                    stack.callback(logging.getLogger().removeHandler, handler)
                return JobReturn(status=JobStatus.COMPLETED, _return_value=task(None))
        except Exception as e:  # its dir cannot be made or written: this job fails, not the sweep
            if isinstance(e, OSError) and e.errno is not None:  # (in one line, naming the path)
                e = exits.unwritable(e, repr(str(e.filename or job.dir)))
            return JobReturn(status=JobStatus.FAILED, _return_value=e)

    def _write(self, job: Job, signum: int | None) -> Any:
        """A job's run dir from its result; its objective (or its error, raised)."""
        if job.result is None:
            rundir.write_failed(job.dir, job.error or "not trained", job.cfg and to_dict(job.cfg), job.overrides)
            raise ConfigError(job.error or "not trained")
        summary = job.kept and completed(job.dir)  # (a kept job's as it is; gone since it was read: written again)
        job.ran = job.ran or {k: summary.get(k) for k in ("train_seconds", "device", "engine")}  # (for the table)
        summary = summary or rundir.write(job.dir, job.result, job.data, job.ran, signum, self.dir, False)  # type: ignore
        return console.conclude(summary, single_run=False, exit=False, quiet=self.quiet)


def objective(j: Job) -> float:
    """A trained job's objective, as its summary would give it (+inf: not finished with finite values)."""
    figures = {"status": j.result.status, **artifacts.final_figures(j.result.history)}  # type: ignore[union-attr]
    value = artifacts.summary_metric(figures, j.cfg.objective)  # type: ignore[union-attr]
    return math.inf if value is None else value


def put_back() -> None:
    """Hydra's record of a refused sweep (multirun.yaml), which the sweeper has rewritten, as it was
    (see BatchedLauncher.setup); nothing else is touched."""
    for record, before in RECORD:
        if before is None:
            record.unlink(missing_ok=True)
        else:
            record.write_bytes(before[0])
            os.utime(record, ns=before[1])
        rundir.release(record.parent)  # (the dirs its lock made, if empty)
    RECORD.clear()


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    t_start, config = time.perf_counter(), launcher.config
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)

    def announce() -> None:  # (as Hydra's launchers do; quadnet's jobs once the first chunk is not refused)
        log.info("Launching %d jobs", len(job_overrides))
        for idx, overrides in enumerate(job_overrides if len(job_overrides) <= CHATTY else [], initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))

    sweep, n = Sweep(launcher, job_overrides, initial_job_idx), len(job_overrides)
    if not batchable(launcher.task_function):  # not quadnet's: each job as Hydra runs it
        announce()
        configs = (sweep.hydra_config(idx, list(o)) for idx, o in enumerate(job_overrides, initial_job_idx))
        returns = [sweep.run_job(launcher.task_function, c) for c in configs]
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        return returns

    with exits.listening() as stop, ThreadPoolExecutor(1) as trainer:
        training: Future[list[Job]] | None = None
        try:
            if sweep.dirs and not rundir.MADE.get(str(sweep.dir.resolve())):  # the dir was there: all checked first
                for i in itertools.takewhile(lambda _: not stop(), range(n)):  # (a signal: the check stops there)
                    sweep.job(i)  # (each dropped once checked: a list of every job would hold every checkpoint)
            t0, kept = time.perf_counter(), sweep.ended_before()
            sweep.seconds["compose"] += time.perf_counter() - t0
            # (a chunk trains in the helper thread as the last one is written)
            for first in sorted(set(range(0, n, sweep.chunk)) - kept):
                t0 = time.perf_counter()
                # (a signal: the chunk's other jobs are not composed, and it is not trained: its jobs not reached)
                jobs = [sweep.job(i) for i in range(first, min(first + sweep.chunk, n)) if not stop()]
                sweep.seconds["compose"] += time.perf_counter() - t0
                if stop():
                    break
                if training is None:  # (the first chunk composed)
                    announce()
                ahead, training = training, trainer.submit(sweep.train, jobs, stop)
                sweep.write(ahead, stop)
        except SweepRefused:  # (before anything is written, but where resume= is swept over)
            sweep.write(training, stop)
            put_back()
            raise
        sweep.write(training, stop)
    if sweep.tracked:  # (its results, and its best jobs as nested runs)
        tracking.log_sweep(sweep.dir, "FINISHED" if stop.signal is None else "KILLED", sweep.opts["mlflow_runs"])
    started = (sweep.counts[k] for k in ("new", "running", "completed", "refused"))
    log.info("%d jobs (%d new, %d resumed from their checkpoints, %d completed before, %d refused)", n, *started)
    log.info(TIMING_LINE, n, *(sweep.seconds[k] for k in ("compose", "train", "write")), time.perf_counter() - t_start)
    ENDED.update(sweep.ended)
    if stop.signal is not None:  # (the sweep ends here: Hydra's callbacks, which print this line, are not called)
        # (the jobs of this process's launches: Optuna's earlier launches too)
        console.closing_line(ENDED, sweep.dir, ENDED.total() - sweep.ended.total() + n)
        kept = "every job's dir written has its checkpoint" if sweep.dirs else "its table keeps every chunk that ended"
        again = f"{kept}. Resume the sweep with:\n  {console.resume_sweep(sweep.dir)}"
        late = "after every job had trained and is written"
        log.warning("interrupted: %s", again if sweep.ended["interrupted"] or sweep.ended.total() < n else late)
        sys.exit(128 + stop.signal)
    return sweep.returns
