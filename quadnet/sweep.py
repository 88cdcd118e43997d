"""The batched launcher's work: quadnet's jobs of a sweep trained as a few batched programs.

Reading order: :func:`launch` composes every job as Hydra's basic launcher does, groups
quadnet's jobs (:func:`group_key`), trains each group with the one training loop
(:func:`train_here`, or :func:`train_submitit` on a cluster), and then hands every job to
Hydra's own ``run_job`` with a task that writes its dir from its result, so each job gets
Hydra's dir, ``.hydra/`` files, log, callbacks and ``JobReturn``. A task function that is
not quadnet's runs through ``run_job`` as it is. A job that fails (a bad value, memory, any
exception) fails alone; Ctrl-C or SIGTERM ends every job as ``interrupted``, writes every
dir and exits 130/143; the same command with ``hydra.sweep.dir=<that dir>`` resumes the
unfinished jobs, again as one batch.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from quadnet import checkpoint, loop, rundir
from quadnet.cli import one_line
from quadnet.config import ConfigError, TrainConfig, check_installed, to_dict, validate
from quadnet.data import make_dataset

log = logging.getLogger(__name__)

# one line per launch; `python -m quadnet.bench sweep` reads it back
TIMING_LINE = "composed %d jobs in %.2f s, trained in %.2f s, wrote their dirs in %.2f s"
CHATTY = 16  # sweeps up to this size log a line per job; bigger ones a summary
CPU_BATCH = 1024  # most jobs in one CPU batch by default (see _chunks)
BATCHES = ".batches"  # in the sweep dir: one checkpoint per batch while it trains
BATCH_SAVE_SECONDS = 10.0  # ~0.1 ms a job each time: 256 jobs saved every 1,000 epochs cost 20% of their training


@dataclasses.dataclass
class Job:
    """One job of a batched sweep, from its composed config to its result."""

    idx: int
    config: DictConfig  # as Hydra composed it, with its id and num set
    dir: Path  # its output dir (hydra.runtime.output_dir), read off its config once
    key: str = ""  # its dir within the sweep dir: its name in batch checkpoints
    kept: bool = False  # completed in an earlier launch of this sweep: its dir is kept as it is
    cfg: TrainConfig | None = None
    start: loop.Job | None = None  # where it starts: afresh, or an unfinished job resumed
    result: loop.Job | None = None
    error: str | None = None  # why it failed, in one line
    device: str = "cpu"  # as its summary records it
    batch: dict[str, Any] = dataclasses.field(default_factory=dict)  # its batch's jobs and seconds


def group_key(j: Job) -> tuple[Any, ...]:
    """Jobs that train as one batch share data, precision, device, optimizer, log and checkpoint
    points and start epoch. The NumPy engine and step=autograd (shared hyperparameters) train alone."""
    c, s = j.start.cfg, j.start  # type: ignore[union-attr]
    alone = c.engine == "numpy" or c.step == "autograd"  # type: ignore[union-attr]
    return (repr(c.data), c.dtype, c.device, c.optimizer, c.log_every, c.checkpoint_every, s.epoch, alone and j.idx)  # type: ignore


class SweepRefused(ConfigError):
    """The sweep dir holds runs that this sweep cannot continue: it is refused before anything is written."""


FREE = ("epochs", "progress", "plots", "threads", "checkpoint_every")  # what resuming a job may change


def _resumable(job: Job, c: TrainConfig, batches: dict[str, Any]) -> loop.Job:
    """Where a job (config c, as trained) starts: afresh, or from the furthest of its checkpoints
    (its dir's, or its entry in a batch checkpoint; a diverged one aside). One that reached c.epochs
    (completed) is done already. A checkpoint of other settings, or beyond c.epochs, refuses the
    sweep (:class:`SweepRefused`): going on would throw its training away."""
    from quadnet.train import start_state

    path, name = job.dir / checkpoint.CHECKPOINT, job.key
    found = ([checkpoint.load(path)] if path.is_file() else []) + ([batches[name]] if name in batches else [])
    found = [ck for ck in found if ck["status"] != "diverged"]
    if not found:
        return loop.Job(c, start_state(c))
    ck = max(found, key=lambda ck: ck["epoch"])
    was, now = ck["config"], to_dict(c)
    changed = ", ".join(f"{k}={was.get(k)!r} (now {v!r})" for k, v in now.items() if k not in FREE and was.get(k) != v)
    if changed or ck["epoch"] > c.epochs:
        why = f"it was trained with {changed}" if changed else f"epochs={c.epochs} is below its epoch"
        raise SweepRefused(
            f"{job.dir} holds a run at epoch {ck['epoch']} and {why}; resume with the settings it had and epochs >= "
            f"{ck['epoch']}, or choose another hydra.sweep.dir"
        )
    done = ck["status"] == "completed" and ck["epoch"] == c.epochs and _summary(job.dir).get("epoch") == ck["epoch"]
    return loop.Job(c, ck["state"], ck["epoch"], ck["history"], status="completed" if done else "running")


def _refused(launcher: Any, why: str) -> None:
    """Refuse a sweep run again into its dir: Hydra's record of it (multirun.yaml), which the sweeper
    has just rewritten, is put back as it was (see BatchedLauncher.setup), and nothing else is touched."""
    record, before, existed = launcher.record
    if before is None:
        record.unlink(missing_ok=True)
        if not existed:  # this sweep made the dir
            with contextlib.suppress(OSError):
                record.parent.rmdir()
    else:
        record.write_bytes(before)
    raise SweepRefused(why)


def _summary(folder: Path) -> dict[str, Any]:
    """A completed run's summary.json; {} when it is missing, damaged, incomplete or of another status."""
    keys = ("status", "epoch", "epochs", "final_loss", "train_accuracy", "test_accuracy", "train_seconds", "run_dir")
    with contextlib.suppress(OSError, ValueError):
        s = json.loads((folder / "summary.json").read_text())
        complete = isinstance(s, dict) and all(k in s for k in keys) and isinstance(s.get("config"), dict)
        return s if complete and s["status"] == "completed" and "objective" in s["config"] else {}
    return {}


def _batch_checkpoints(sweep_dir: Path) -> dict[str, Any]:
    """The job states in the sweep's batch checkpoints, by job dir name."""
    out = {}
    for path in sorted((sweep_dir / BATCHES).glob("*.pt")):
        try:
            jobs = checkpoint.read(path)["jobs"]
            out.update({str(k): checkpoint.check(v, f"{path} [{k}]") for k, v in jobs.items()})
        except (checkpoint.CheckpointError, KeyError, TypeError, AttributeError) as e:
            log.warning("a damaged batch checkpoint is not used: %s", one_line(e))
    return out


def _saver(sweep_dir: Path) -> Callable[[list[loop.Job]], None]:
    """While a batch trains, its checkpoints go to one file: {job key: its state}, at its checkpoint
    points but at most once every BATCH_SAVE_SECONDS, and never more than a tenth of the time
    (the file holds every job and its metrics so far)."""
    last, cost = -math.inf, 0.0

    def save(jobs: list[loop.Job]) -> None:
        nonlocal last, cost
        if time.monotonic() - last < max(BATCH_SAVE_SECONDS, 10 * cost):
            return
        last = time.monotonic()
        states = {j.name: checkpoint.of(j, "running") for j in jobs}
        name = jobs[0].name.replace("/", "_")
        try:  # (a convenience: training goes on without it, and each job's dir is written at the end)
            (sweep_dir / BATCHES).mkdir(exist_ok=True)
            checkpoint.save(sweep_dir / BATCHES / f"{name}.pt", {"format": checkpoint.BATCH, "jobs": states})
        except OSError as e:
            log.warning("no batch checkpoint written: %s", one_line(e))
        cost = time.monotonic() - last

    return save


def _chunks(groups: list[list[Job]], max_batch: int) -> list[list[Job]]:
    """Each group in chunks of at most max_batch jobs; 0: up to 1,024 on the CPU (bigger batches cost
    more per job: bench step, and the README's figures), and on CUDA what
    half the free memory holds (activations and temporaries, counted generously)."""
    out = []
    for g in groups:
        size = max_batch
        if not size and g[0].cfg.device.startswith(("cuda", "auto")) and torch.cuda.is_available():  # type: ignore[union-attr]
            d, h = make_dataset(g[0].cfg.data), max(j.cfg.hidden_dim for j in g)  # type: ignore[union-attr]
            n = max(len(d.x_train), len(d.x_test))
            size = max(1, int(torch.cuda.mem_get_info()[0] * 0.5) // (8 * (16 * n * (h + 4) + 128 * h)))
        out += [g[i : i + (size or CPU_BATCH)] for i in range(0, len(g), size or CPU_BATCH)]
    return out


def _done(chunk: list[Job], out: Any, **extra: Any) -> None:
    if isinstance(out, Exception):
        for j in chunk:
            j.error = str(out)
        return
    label, done, seconds = out
    for j, r in zip(chunk, done, strict=True):
        j.result, j.device, j.batch = r, label, {"jobs": len(chunk), "seconds": seconds, **extra}


def train_here(groups: list[list[Job]], max_batch: int, stop: Callable[[], bool], sweep_dir: Path) -> None:
    """Each chunk in this process; a chunk that fails is split until the failing job fails alone."""
    todo = _chunks(groups, max_batch)
    while todo:
        chunk = todo.pop(0)
        starts = [dataclasses.replace(j.start, history=list(j.start.history), name=j.key) for j in chunk]  # type: ignore
        try:
            _done(chunk, loop.train_batch(starts, chunk[0].cfg.device, stop, _saver(sweep_dir)))  # type: ignore
        except Exception as e:
            if len(chunk) > 1:
                todo[:0] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
            else:
                _done(chunk, RuntimeError(one_line(e)))


def train_submitit(
    groups: list[list[Job]], max_batch: int, executor: str, params: dict[str, Any], folder: Path
) -> None:
    """Each chunk as one submitit job (all of them a SLURM job array on a cluster); a chunk that
    fails (a crash, a timeout, a device not there) fails each of its jobs, naming its log."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    try:
        ex.update_parameters(**params)
    except Exception as e:  # submitit's words for an unknown or bad parameter
        raise ConfigError(f"hydra.launcher.executor_params={params!r} is not allowed: {one_line(e)}") from None
    chunks = _chunks(groups, max_batch)
    with ex.batch():
        futures = [ex.submit(loop.train_batch, [j.start for j in c], c[0].cfg.device) for c in chunks]  # type: ignore
    log.info("Submitted %d batched program(s) to submitit (%s) in %s", len(chunks), executor, folder)
    for chunk, future in zip(chunks, futures, strict=True):
        try:
            _done(chunk, future.result(), submitit_job=future.job_id)
        except Exception as e:
            _done(
                chunk, RuntimeError(f"submitit job {future.job_id} failed: {one_line(e)} (log: {future.paths.stderr})")
            )


# ---------------------------------------------------------------------- every job's dir, through run_job


def _write(job: Job, stop_signal: int | None, n_jobs: int) -> Any:
    """A batched job's run dir from its result; its objective (or its error, raised)."""
    from quadnet.train import conclude

    out = Path(str(job.config.hydra.runtime.output_dir))
    if job.result is None:
        rundir.write_failed(out, job.error or "not trained", job.cfg and to_dict(job.cfg))
        raise ConfigError(job.error or "not trained")
    if job.kept:  # completed in an earlier launch of this sweep: its dir is kept
        summary = _summary(out)
    else:
        seconds = job.batch["seconds"] / job.batch["jobs"]  # train_seconds: its share of its batch's time
        summary = rundir.write(out, job.result, job.device, seconds, stop_signal, {"batch": job.batch})
    return conclude(summary, single_run=False, exit=False, quiet=n_jobs > CHATTY)


_YAML = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_LOG_FORMAT = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra's job log's


def write_job(ctx: Any, job: Job, stop_signal: int | None, n_jobs: int) -> JobReturn:
    """What Hydra's run_job does for a job, lean: its dir, ``.hydra/`` files, log file, callbacks
    and JobReturn, around :func:`_write`. run_job deep-copies the config four times and dumps
    YAML in pure Python: ~40 ms a job on 2 cores, twice what training it in a batch costs; this
    takes ~8 ms. The tests check its files against the basic launcher's."""
    config, name, ret = job.config, str(job.config.hydra.job.name), _job_return(job)
    handler = None
    try:
        job.dir.mkdir(parents=True, exist_ok=True)
        if config.hydra.output_subdir is not None:
            record = job.dir / str(config.hydra.output_subdir)
            record.mkdir(exist_ok=True)
            everything = OmegaConf.to_container(config, enum_to_str=True)
            app = to_dict(job.cfg) if job.cfg else {k: v for k, v in everything.items() if k != "hydra"}  # type: ignore
            for file, obj in (("config", app), ("hydra", {"hydra": everything["hydra"]}), ("overrides", ret.overrides)):
                (record / f"{file}.yaml").write_text(
                    yaml.dump(obj, Dumper=_YAML, default_flow_style=False, allow_unicode=True, sort_keys=False)
                )
        handler = logging.FileHandler(job.dir / f"{name}.log")
        handler.setFormatter(_LOG_FORMAT)
        logging.getLogger().addHandler(handler)
        if ctx.callbacks.callbacks:  # what callbacks may read
            HydraConfig.instance().set_config(config)
            ret.cfg = OmegaConf.create(to_dict(job.cfg) if job.cfg else {})
        ctx.callbacks.on_job_start(config=config, task_function=lambda _: None)
        try:
            ret.return_value, ret.status = _write(job, stop_signal, n_jobs), JobStatus.COMPLETED
        except Exception as e:
            ret.return_value, ret.status = e, JobStatus.FAILED
        ctx.callbacks.on_job_end(config=config, job_return=ret)
    except OSError as e:  # its dir cannot be made: this job fails, not the sweep
        ret.return_value, ret.status = e, JobStatus.FAILED
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return ret


_FORKED: tuple[Any, list[Job], int | None] | None = None  # what the forked writers inherit


def _write_some(positions: list[int]) -> list[tuple[JobStatus, Any]]:
    ctx, jobs, sig = _FORKED  # type: ignore[misc]
    out = []
    for i in positions:
        r = write_job(ctx, jobs[i], sig, len(jobs))
        out.append((r.status, r._return_value))  # a float, or an exception of quadnet's, Hydra's or the OS's
    return out


def _writer() -> None:
    """A forked writer (Linux): one thread, killed with its parent (a Ctrl-C it goes on through,
    as its parent does), and the sweep dir's lock left to its parent alone."""
    torch.set_num_threads(1)
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan writer outlives a kill -9
    for fd in rundir.LOCKS.values():
        os.close(fd)


def write_all(ctx: Any, jobs: list[Job], writers: int, stop_signal: int | None) -> list[JobReturn]:
    """Every job's dir: here, or by forked writers (Linux, no callbacks), which share the work
    and send back each job's status and value (its JobReturn is made here)."""
    global _FORKED
    if not writers:
        return [write_job(ctx, j, stop_signal, len(jobs)) for j in jobs]
    size = max(1, min(256, len(jobs) // (4 * writers)))
    parts = [list(range(i, min(i + size, len(jobs)))) for i in range(0, len(jobs), size)]
    _FORKED, outcomes, args = (ctx, jobs, stop_signal), [], (stop_signal, len(jobs))
    fork = multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(writers, mp_context=fork, initializer=_writer) as pool:
            for part, future in zip(parts, [pool.submit(_write_some, p) for p in parts], strict=True):
                try:
                    outcomes += future.result()
                except Exception:  # a writer died (killed, out of memory): its jobs are written here
                    outcomes += [(r.status, r._return_value) for r in (write_job(ctx, jobs[i], *args) for i in part)]
    finally:
        _FORKED = None
    return [_job_return(j, status=s, _return_value=v) for j, (s, v) in zip(jobs, outcomes, strict=True)]


def _job_return(job: Job, **fields: Any) -> JobReturn:
    c = job.config
    return JobReturn(
        overrides=list(c.hydra.overrides.task),
        hydra_cfg=c,
        working_dir=os.getcwd(),
        task_name=c.hydra.job.name,
        **fields,
    )


# ---------------------------------------------------------------------- the launcher


def launch(launcher: Any, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
    from quadnet.train import task as quadnet_task

    ctx, config, opts = launcher.hydra_context, launcher.config, launcher.options
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))  # (held since BatchedLauncher.setup: rundir.lock)
    log.info("Launching %d jobs", len(job_overrides))

    # 1. compose every job, as Hydra's basic launcher does
    t0 = time.perf_counter()
    jobs, level, seen = [], logging.INFO if len(job_overrides) <= CHATTY else logging.DEBUG, set()
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        job_config = ctx.config_loader.load_sweep_config(config, list(overrides))
        if id(job_config) in seen:  # the same overrides twice (seed=1,1): the loader's config, shared
            job_config = copy.deepcopy(job_config)
        seen.add(id(job_config))
        with open_dict(job_config):  # what Hydra's launchers set: id, num, and the dir they make of them
            job_config.hydra.job.id, job_config.hydra.job.num = str(idx), idx
            # Hydra's default subdir is the job's number: known without resolving it (~0.5 ms a job)
            numbered = OmegaConf.to_container(job_config.hydra.sweep)["subdir"] == "${hydra.job.num}"  # type: ignore
            out = Path(os.path.abspath(sweep_dir / (str(idx) if numbered else str(job_config.hydra.sweep.subdir))))
            job_config.hydra.runtime.output_dir = str(out)  # (as Hydra's run_job makes it)
        jobs.append(Job(idx, job_config, out, key=os.path.relpath(out, os.path.abspath(sweep_dir))))
        log.log(level, "\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    if launcher.task_function is not quadnet_task:  # not quadnet's: each job as Hydra runs it
        keys = {"job_dir_key": "hydra.sweep.dir", "job_subdir_key": "hydra.sweep.subdir"}
        task = launcher.task_function
        returns = [run_job(hydra_context=ctx, task_function=task, config=j.config, **keys) for j in jobs]
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        gc.unfreeze()  # (the fast loader froze the configs)
        return returns
    batches = _batch_checkpoints(sweep_dir)
    groups: dict[tuple[Any, ...], list[Job]] = defaultdict(list)
    for j in jobs:
        try:
            j.cfg = validate(j.config)
            check_installed(j.cfg)
            if j.cfg.resume:
                _refused(
                    launcher,
                    f"resume={j.cfg.resume!r} is not for batched sweeps: to go on with a sweep, run it again with "
                    "hydra.sweep.dir=<its dir>; to go on with one of its jobs, run that job alone (without -m)",
                )
            j.start = _resumable(j, dataclasses.replace(j.cfg, plots=j.cfg.plots and opts["plots"]), batches)
        except (ConfigError, checkpoint.CheckpointError) as e:
            if isinstance(e, SweepRefused) or (j.dir / checkpoint.CHECKPOINT).exists():  # (an earlier run's dir)
                _refused(launcher, f"{e} ({j.dir} holds an earlier run)" if not isinstance(e, SweepRefused) else str(e))
            j.error = str(e)
            continue
        if j.start.status == "completed":  # done in an earlier launch: its dir stays as it is
            j.result, j.kept = j.start, True
        else:
            groups[group_key(j)].append(j)
    counts = Counter("refused" if j.error else j.start.status if j.start.epoch else "new" for j in jobs)  # type: ignore
    resumed = f"{counts['running']} resumed from their checkpoints, {counts['completed']} completed before, "
    log.info("%d jobs in %d batch group(s): %s%d refused", len(jobs), len(groups), resumed, counts["refused"])

    # 2. train each group as one program, here or through submitit. The thousands of live configs are
    # moved out of the cyclic GC's reach meanwhile: its full passes over them doubled training time.
    t1 = time.perf_counter()
    gc.freeze()
    with loop.catch_signals() as stop:
        todo, size = list(groups.values()), opts["max_batch"]
        if opts["executor"] is None:
            train_here(todo, size, stop, sweep_dir)
        else:
            params = OmegaConf.to_container(OmegaConf.create(opts["executor_params"] or {}))
            train_submitit(todo, size, opts["executor"], params, sweep_dir / ".submitit")  # type: ignore[arg-type]

        # 3. every job's dir (the signal handlers stay up until all are written)
        t2 = time.perf_counter()
        writers = 0 if ctx.callbacks.callbacks or sys.platform != "linux" else opts["writers"]
        if writers is None:
            writers = 0 if len(jobs) < 64 else min(loop.usable_cpus(), len(jobs) // 32)
        returns = write_all(ctx, jobs, min(writers, len(jobs)), stop.signal)
    gc.unfreeze()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    if all(r.status == JobStatus.COMPLETED for r in returns):  # each job's dir has its own checkpoint now
        shutil.rmtree(sweep_dir / BATCHES, ignore_errors=True)
    log.info(TIMING_LINE, len(jobs), t1 - t0, t2 - t1, time.perf_counter() - t2)
    done = [r.status == JobStatus.COMPLETED for r in returns]
    ends = Counter(j.result.status if ok else "failed" for j, ok in zip(jobs, done, strict=True))  # type: ignore
    outcome = ", ".join(f"{n} {s}" for s, n in sorted(ends.items()))
    log.info("%d jobs: %s; report: python -m quadnet.report %s", len(jobs), outcome, shlex.quote(str(sweep_dir)))
    if stop.signal is not None:
        from quadnet.train import resume_sweep

        again = f"every job's dir has its checkpoint. Resume the sweep with:\n  {resume_sweep(sweep_dir)}"
        log.warning("interrupted: %s", again if ends["interrupted"] else "after every job had trained and is written")
        sys.exit(128 + stop.signal)
    return returns
