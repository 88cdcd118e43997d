"""The batched launcher's work: quadnet's jobs of a sweep trained as a few batched programs.

Reading order: :func:`launch` composes every job as Hydra's basic launcher does, groups
quadnet's jobs (:func:`group_key`), trains each group with the one training loop
(:func:`train_groups`, here or through submitit), and then hands every job to Hydra's own
``run_job`` with a task that writes its dir from its result, so each job gets exactly
Hydra's dir, ``.hydra/`` files, log, callbacks and ``JobReturn``. A task function that is
not quadnet's runs through ``run_job`` as it is. A job that fails (a bad value, memory, any
exception) fails alone; Ctrl-C or SIGTERM ends every job as ``interrupted``, writes every
dir and exits 130/143; the same command with ``hydra.sweep.dir=<that dir>`` resumes the
unfinished jobs, again as one batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import shlex
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from quadnet import checkpoint, loop, rundir
from quadnet.config import ConfigError, TrainConfig, to_dict, validate
from quadnet.data import make_dataset
from quadnet.device import describe, resolve_device
from quadnet.engine import build

log = logging.getLogger(__name__)

# one line per launch; `python -m quadnet.bench sweep` reads it back
TIMING_LINE = "composed %d jobs in %.2f s, trained in %.2f s, wrote their dirs in %.2f s"
EXECUTORS = ("local", "slurm", "debug")  # submitit's clusters ("debug": in this process)
CHATTY = 16  # sweeps up to this size log a line per job; bigger ones a summary
BATCHES = ".batches"  # in the sweep dir: one checkpoint per batch while it trains


@dataclasses.dataclass
class Job:
    """One job of a batched sweep, from its composed config to its result."""

    idx: int
    overrides: list[str]
    config: DictConfig  # as Hydra composed it, with its id and num set
    cfg: TrainConfig | None = None
    start: loop.Job | None = None  # where it starts (a fresh job, or an unfinished one resumed)
    result: loop.Job | None = None
    error: str | None = None
    device: str = "cpu"  # as the summary records it
    batch: dict[str, Any] = dataclasses.field(default_factory=dict)  # jobs, seconds (and submitit_job) of its batch

    @property
    def dir(self) -> Path:
        h = self.config.hydra
        return Path(str(h.sweep.dir)) / str(h.sweep.subdir)


def group_key(job: Job) -> tuple[Any, ...]:
    """Jobs that can train as one batch: same data, precision, device, log and checkpoint
    points and start epoch. The NumPy engine and step=autograd (shared hyperparameters) train alone."""
    c, alone = job.cfg, job.cfg.engine == "numpy" or job.cfg.step == "autograd"  # type: ignore[union-attr]
    return (
        repr(c.data),
        c.dtype,
        c.device,
        c.optimizer,
        c.log_every,
        c.checkpoint_every,
        job.start.epoch,
        job.idx if alone else -1,
    )  # type: ignore[union-attr]


def _resumable(job: Job, batches: dict[str, Any]) -> loop.Job:
    """Where a job starts: its unfinished checkpoint (its dir's, or its entry in a batch
    checkpoint) when the config is the same but for epochs; else afresh."""
    from quadnet.train import start_state

    c = job.cfg
    assert c is not None
    found = [job.dir / checkpoint.CHECKPOINT] if (job.dir / checkpoint.CHECKPOINT).is_file() else []
    for ck in [checkpoint.load(p) for p in found] + ([batches[job.dir.name]] if job.dir.name in batches else []):
        same = {**ck["config"], "epochs": c.epochs, "progress": c.progress, "plots": c.plots} == to_dict(c)
        if same and ck["status"] in ("running", "interrupted") and ck["epoch"] <= c.epochs:
            return loop.Job(c, ck["state"], ck["epoch"], ck["history"])
    return loop.Job(c, start_state(c))


def _batch_checkpoints(sweep_dir: Path) -> dict[str, Any]:
    """The job states in the sweep's batch checkpoints (written while batches train), by job dir name."""
    out = {}
    for path in sorted((sweep_dir / BATCHES).glob("*.pt")):
        with contextlib.suppress(checkpoint.CheckpointError):
            obj = checkpoint.read(path)
            if isinstance(obj, dict) and obj.get("format") == checkpoint.BATCH:
                out.update({str(k): checkpoint.check(v, f"{path} [{k}]") for k, v in obj["jobs"].items()})
    return out


def train_chunk(
    jobs: list[loop.Job], device: str, stop: Callable[[], bool] = lambda: False, save_dir: Path | None = None
) -> Any:
    """One batch through the loop; returns the device as summaries record it, the jobs, the seconds.
    (Also what a submitit job runs where it lands: a device that is not there there comes back as
    the ConfigError, whole.) A batch checkpoint goes to save_dir/.batches."""
    try:
        dev = resolve_device(device)
    except ConfigError as e:
        return e
    data = make_dataset(jobs[0].cfg.data)
    engine, dev = build([j.cfg for j in jobs], data, [j.state for j in jobs], dev)
    save = None
    if save_dir is not None:

        def save(js: list[loop.Job]) -> None:  # one file for the batch: {job dir name: its state}
            states = {
                j.name: checkpoint.payload(
                    j.state, epoch=j.epoch, config=to_dict(j.cfg), status="running", history=j.history
                )
                for j in js
            }
            (save_dir / BATCHES).mkdir(exist_ok=True)
            checkpoint.save(save_dir / BATCHES / f"{js[0].name}.pt", {"format": checkpoint.BATCH, "jobs": states})

    t0 = time.perf_counter()
    with loop.threads(jobs[0].cfg.threads):
        loop.fit(engine, jobs, stop, save)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return describe(dev), jobs, time.perf_counter() - t0


def _fits(jobs: list[Job], device: torch.device) -> int:
    """Jobs per batch: up to 4,096 on the CPU; on CUDA, what half the free memory holds."""
    if device.type != "cuda":
        return 4096
    data = make_dataset(jobs[0].cfg.data)  # type: ignore[union-attr]
    n, h = max(len(data.x_train), len(data.x_test)), max(j.cfg.hidden_dim for j in jobs)  # type: ignore[union-attr]
    per_job = 8 * (16 * n * (h + 4) + 16 * h * 8)  # activations and temporaries, generously
    return max(1, int(torch.cuda.mem_get_info(device)[0] * 0.5) // per_job)


def train_groups(groups: list[list[Job]], max_batch: int, stop: Callable[[], bool], sweep_dir: Path) -> None:
    """Train each group here, in chunks; a chunk that fails is split until the failing job fails alone."""
    todo = []
    for g in groups:
        size = max_batch or _fits(g, resolve_device(g[0].cfg.device))  # type: ignore[union-attr]
        todo += [g[i : i + size] for i in range(0, len(g), size)]
    while todo:
        chunk = todo.pop(0)
        starts = [dataclasses.replace(j.start, history=list(j.start.history), name=j.dir.name) for j in chunk]  # type: ignore[type-var]
        try:
            out = train_chunk(starts, chunk[0].cfg.device, stop, sweep_dir)  # type: ignore[union-attr]
            if isinstance(out, Exception):
                raise out
        except Exception as e:
            if len(chunk) > 1 and not isinstance(e, ConfigError):
                todo[:0] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
                continue
            for j in chunk:
                j.error = one_line(e)
            continue
        _done(chunk, out)


def _done(chunk: list[Job], out: tuple[str, list[loop.Job], float], **extra: Any) -> None:
    label, done, seconds = out
    for j, r in zip(chunk, done, strict=True):
        j.result, j.device, j.batch = r, label, {"jobs": len(chunk), "seconds": seconds, **extra}


def train_submitit(
    groups: list[list[Job]], max_batch: int, executor: str, params: dict[str, Any], folder: Path
) -> None:
    """Each chunk of at most max_batch jobs as one submitit job (a SLURM job array on a cluster);
    its device is resolved where it lands. A chunk that fails fails each of its jobs."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    ex.update_parameters(**params)
    chunks = [g[i : i + (max_batch or len(g))] for g in groups for i in range(0, len(g), max_batch or len(g))]
    with ex.batch():
        futures = [ex.submit(train_chunk, [j.start for j in c], c[0].cfg.device) for c in chunks]  # type: ignore[union-attr]
    log.info("Submitted %d batched program(s) to submitit (%s) in %s", len(chunks), executor, folder)
    for chunk, future in zip(chunks, futures, strict=True):
        try:
            out = future.result()
        except Exception as e:
            out = RuntimeError(f"submitit job {future.job_id} failed: {one_line(e)} (log: {future.paths.stderr})")
        if isinstance(out, Exception):
            for j in chunk:
                j.error = str(out)
            continue
        _done(chunk, out, submitit_job=future.job_id)


def one_line(e: BaseException) -> str:
    from quadnet.cli import one_line as cli_one_line

    if isinstance(e, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in str(e):
        return (
            f"out of memory: {type(e).__name__}; try fewer jobs per batch (hydra.launcher.max_batch) or a narrower net"
        )
    return cli_one_line(e)


# ---------------------------------------------------------------------- writing each job through run_job


def _writer(job: Job, stop_signal: int | None, n_jobs: int) -> Callable[[DictConfig], Any]:
    """The task run_job runs for a batched job: write its dir from its result."""

    def task(_: DictConfig) -> Any:
        from quadnet.train import conclude

        out = Path(str(job.config.hydra.runtime.output_dir))
        if job.error is not None or job.result is None:
            rundir.write_failed(out, job.error or "not trained", None if job.cfg is None else to_dict(job.cfg))
            raise ConfigError(job.error or "not trained")
        data = make_dataset(job.cfg.data)  # type: ignore[union-attr]
        # train_seconds: the job's share of its batch's wall time (batch.seconds / batch.jobs)
        seconds = job.batch["seconds"] / job.batch["jobs"]
        summary = rundir.write(out, job.result, data, job.device, seconds, stop_signal, {"batch": job.batch})
        return conclude(summary, single_run=False, exit=False, quiet=n_jobs > CHATTY)

    return task


def _run(ctx: Any, task: Callable[[DictConfig], Any], config: DictConfig) -> JobReturn:
    try:
        return run_job(
            hydra_context=ctx,
            task_function=task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except OSError as e:  # its dir cannot be made: this job fails, not the sweep
        return JobReturn(
            overrides=list(config.hydra.overrides.task), hydra_cfg=config, status=JobStatus.FAILED, _return_value=e
        )


_FORKED: tuple[Any, list[Job], int | None, int] | None = None  # what the forked writers inherit


def _write_some(positions: list[int]) -> list[tuple[JobStatus, Any]]:
    assert _FORKED is not None
    ctx, jobs, sig, n = _FORKED
    out = []
    for i in positions:
        r = _run(ctx, _writer(jobs[i], sig, n), jobs[i].config)
        value = r._return_value
        try:
            pickle.dumps(value)  # it goes back to the launcher's process
        except Exception:
            value = RuntimeError(str(value))
        out.append((r.status, value))
    return out


def write_all(ctx: Any, jobs: list[Job], writers: int, stop_signal: int | None) -> list[JobReturn]:
    """Every job's dir through Hydra's run_job: here, or by forked writers (Linux, no callbacks).

    run_job costs ~22 ms a job on 2 cores, more than training it in a batch: forked writers share
    that work; each sends back only the job's status and value (a JobReturn without `cfg`)."""
    global _FORKED
    if not writers:
        return [_run(ctx, _writer(j, stop_signal, len(jobs)), j.config) for j in jobs]
    chunk = max(1, min(256, len(jobs) // (4 * writers)))
    parts = [list(range(i, min(i + chunk, len(jobs)))) for i in range(0, len(jobs), chunk)]
    _FORKED, outcomes = (ctx, jobs, stop_signal, len(jobs)), []
    try:
        with ProcessPoolExecutor(
            writers, mp_context=multiprocessing.get_context("fork"), initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            for part, future in zip(parts, [pool.submit(_write_some, p) for p in parts], strict=True):
                try:
                    outcomes += future.result()
                except Exception as e:
                    outcomes += [(JobStatus.FAILED, e)] * len(part)
    finally:
        _FORKED = None
    name = str(jobs[0].config.hydra.job.name)
    return [
        JobReturn(
            overrides=list(j.config.hydra.overrides.task),
            hydra_cfg=j.config,
            working_dir=os.getcwd(),
            task_name=name,
            status=s,
            _return_value=v,
        )
        for j, (s, v) in zip(jobs, outcomes, strict=True)
    ]


# ---------------------------------------------------------------------- the launcher


def launch(launcher: Any, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
    from quadnet.train import task as quadnet_task

    ctx, config, opts = launcher.hydra_context, launcher.config, launcher.options
    check_options(opts)
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    rundir.lock(sweep_dir)
    chatty = len(job_overrides) <= CHATTY
    log.info("Launching %d jobs%s", len(job_overrides), " batched" if launcher.task_function is quadnet_task else "")

    # 1. compose every job, as Hydra's basic launcher does
    t0 = time.perf_counter()
    jobs = []
    for i, overrides in enumerate(job_overrides):
        config_i = ctx.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(config_i):
            config_i.hydra.job.id = config_i.hydra.job.num = initial_job_idx + i
        jobs.append(Job(initial_job_idx + i, list(overrides), config_i))
        (log.info if chatty else log.debug)("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
    if launcher.task_function is not quadnet_task:  # not quadnet's: each job as Hydra runs it
        return [_ran(ctx, launcher.task_function, j.config, config) for j in jobs]
    batches = _batch_checkpoints(sweep_dir)
    for j in jobs:
        try:
            j.cfg = validate(j.config)
            j.cfg = dataclasses.replace(j.cfg, plots=j.cfg.plots and opts["plots"])
            j.start = _resumable(j, batches)
        except (ConfigError, checkpoint.CheckpointError) as e:
            j.error = str(e)
    groups: dict[tuple[Any, ...], list[Job]] = defaultdict(list)
    for j in jobs:
        if j.error is None:
            groups[group_key(j)].append(j)
    log.info(
        "%d jobs in %d batch group(s), %d refused",
        sum(map(len, groups.values())),
        len(groups),
        sum(j.error is not None for j in jobs),
    )

    # 2. train each group as one program, here or through submitit
    t1 = time.perf_counter()
    with loop.catch_signals() as stop:
        if opts["executor"] is None:
            train_groups(list(groups.values()), opts["max_batch"], stop, sweep_dir)
        else:
            params = (
                OmegaConf.to_container(opts["executor_params"])
                if isinstance(opts["executor_params"], DictConfig)
                else dict(opts["executor_params"] or {})
            )
            train_submitit(list(groups.values()), opts["max_batch"], opts["executor"], params, sweep_dir / ".submitit")  # type: ignore[arg-type]

        # 3. every job's dir, through Hydra's run_job (the signal handlers stay up until all are written)
        t2 = time.perf_counter()
        writers = 0 if ctx.callbacks.callbacks or sys.platform != "linux" else opts["writers"]
        if writers is None:
            writers = 0 if len(jobs) < 64 else min(loop.usable_cpus(), len(jobs) // 32)
        returns = write_all(ctx, jobs, min(writers, len(jobs)), stop.signal)
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    if all(r.status == JobStatus.COMPLETED for r in returns):  # every job's dir has its own checkpoint now
        shutil.rmtree(sweep_dir / BATCHES, ignore_errors=True)
    log.info(TIMING_LINE, len(jobs), t1 - t0, t2 - t1, time.perf_counter() - t2)
    _summarise(jobs, sweep_dir, stop.signal)
    return returns


def _ran(ctx: Any, task: Callable[[DictConfig], Any], config_i: DictConfig, config: DictConfig) -> JobReturn:
    ret = _run(ctx, task, config_i)
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return ret


def _summarise(jobs: list[Job], sweep_dir: Path, stop_signal: int | None) -> None:
    """One line for the whole sweep; on a signal, how to resume it, and the exit."""
    counts: dict[str, int] = defaultdict(int)
    for j in jobs:
        counts["failed" if j.result is None else j.result.status] += 1
    log.info(
        "%d jobs: %s; report: python -m quadnet.report %s",
        len(jobs),
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        shlex.quote(str(sweep_dir)),
    )
    if stop_signal is None:
        return
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
    log.warning(
        "interrupted: every job's dir has its checkpoint. Resume the sweep with:\n  python -m quadnet.train %s\n"
        "or one job with: python -m quadnet.train resume=<job dir>",
        shlex.join([*args, f"hydra.sweep.dir={sweep_dir}"]),
    )
    sys.exit(128 + stop_signal)


def check_options(opts: dict[str, Any]) -> None:
    if opts["max_batch"] < 0:
        raise ConfigError(f"hydra.launcher.max_batch={opts['max_batch']} is not allowed: must be >= 0 (0: what fits)")
    if opts["writers"] is not None and opts["writers"] < 0:
        raise ConfigError(
            f"hydra.launcher.writers={opts['writers']} is not allowed: must be >= 0, or null for one per core"
        )
    if opts["executor"] is not None:
        if opts["executor"] not in EXECUTORS:
            raise ConfigError(
                f"hydra.launcher.executor={opts['executor']!r} is not allowed: choose one of {', '.join(EXECUTORS)}, or null"
            )
        import importlib.util

        if importlib.util.find_spec("submitit") is None:
            raise ConfigError(f"hydra.launcher.executor={opts['executor']} needs submitit: pip install -e '.[sweep]'")
