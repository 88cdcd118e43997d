"""The batched launcher's work: compose every job, train the batchable ones together, write each job's dir.

Called from ``hydra_plugins/quadnet_batched_launcher`` (kept thin so that Hydra's plugin
discovery does not import torch). Reading order: :func:`launch_batched` composes the jobs
(:func:`_compose`), groups and trains them here (:func:`_train`) or through submitit
(:func:`_train_submitit`), then finishes every job (:func:`_finish_jobs`): batched jobs get
their dir written from the batch's result by :mod:`quadnet.jobdirs`; jobs that run on their
own (or failed validation) go through Hydra's ``run_job``.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf

from quadnet.batched import batchable, group_key, train_chunk, train_many
from quadnet.checkpoint import CheckpointError
from quadnet.config import ConfigError, validate
from quadnet.device import describe, resolve_device
from quadnet.jobdirs import Job, SweepFacts, set_job_fields, write_forked, write_job, writers_for

log = logging.getLogger(__name__)

# one line per launch; `python -m quadnet.bench sweep` reads it back
TIMING_LINE = "composed %d jobs in %.2f s, trained in %.2f s, wrote their dirs in %.2f s"
EXECUTORS = ("local", "slurm", "debug")  # submitit's clusters ("debug" runs the chunks in this process)


def _raise(error: Exception) -> Callable[[DictConfig], Any]:
    def task(_: DictConfig) -> Any:
        raise error

    return task


def _train(groups: dict[tuple[Any, ...], list[Job]], max_batch: int) -> None:
    """Train each group as one program here; a group that fails fails each of its jobs."""
    for members in groups.values():
        device = members[0].device
        assert device is not None
        try:
            results = train_many([m.cfg for m in members], device, max_batch)  # type: ignore[misc]
        except Exception as e:
            log.exception("batch of %d jobs failed", len(members))
            for m in members:
                m.error = e
            continue
        for m, r in zip(members, results, strict=True):
            m.result = r


def _train_submitit(
    groups: dict[tuple[Any, ...], list[Job]], max_batch: int, executor: str, params: dict[str, Any], folder: Path
) -> None:
    """Hand each group to submitit in chunks of at most max_batch jobs, one batched program per
    submitit job (a SLURM job array with cluster=slurm), and collect what they return. The
    device is resolved where a chunk runs. A chunk that fails fails each of its jobs."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    ex.update_parameters(**params)
    chunks: list[list[Job]] = []
    for members in groups.values():
        size = max_batch or len(members)
        chunks += [members[i : i + size] for i in range(0, len(members), size)]
    with ex.batch():
        futures = [ex.submit(train_chunk, [m.cfg for m in c], c[0].cfg.device, max_batch) for c in chunks]  # type: ignore[union-attr]
    log.info("Submitted %d batched program(s) to submitit (%s) in %s", len(chunks), executor, folder)
    for chunk, future in zip(chunks, futures, strict=True):
        try:
            out = future.result()
        except Exception as e:  # it crashed, timed out or was cancelled: its log says why
            out = RuntimeError(
                f"submitit job {future.job_id} ({len(chunk)} jobs) failed: {str(e).strip().splitlines()[-1]} "
                f"(log: {future.paths.stderr})"
            )
        if isinstance(out, Exception):
            for m in chunk:
                m.error = out
            continue
        label, results = out
        for m, r in zip(chunk, results, strict=True):
            r.batch["submitit_job"] = future.job_id
            m.result, m.device_label = r, label


def _run_alone(hydra_context: Any, task_function: Callable[[DictConfig], Any], job: Job) -> JobReturn:
    """A job that is not batched (or failed validation), through Hydra's own run_job."""
    task = _raise(job.error) if job.error is not None else task_function
    return run_job(
        hydra_context=hydra_context,
        task_function=task,
        config=job.sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _finish_jobs(
    hydra_context: Any,
    task_function: Callable[[DictConfig], Any],
    jobs: list[Job],
    facts: SweepFacts,
    writers: int | None,
) -> list[JobReturn]:
    """Every job's dir and JobReturn, in job order: batched ones written from their result, the rest run."""
    for job in jobs:
        log.info(
            "\t#%d : %s%s", job.idx, " ".join(filter_overrides(job.overrides)), f"  ({job.alone})" if job.alone else ""
        )
    written = [j for j in jobs if j.result is not None]
    workers = 0 if facts.has_callbacks else writers_for(len(written), writers)
    returns: dict[int, JobReturn] = {}
    if workers:
        returns.update(zip([j.idx for j in written], write_forked(written, facts, workers), strict=True))
    for job in jobs:
        if job.idx not in returns:
            if job.result is not None:
                returns[job.idx] = write_job(hydra_context, task_function, job, facts)
            else:
                returns[job.idx] = _run_alone(hydra_context, task_function, job)
    return [returns[j.idx] for j in jobs]


def _compose(
    hydra_context: Any,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    plots: bool,
    resolve: bool,
    facts: SweepFacts,
) -> list[Job]:
    jobs: list[Job] = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        set_job_fields(sweep_config, idx, facts)
        job = Job(idx, list(overrides), sweep_config)
        try:
            job.composed = validate(sweep_config)
            job.cfg = dataclasses.replace(job.composed, plots=plots)
            job.alone = batchable(job.cfg)
            if job.alone is None and resolve:  # else where its batch runs
                job.device = resolve_device(job.cfg.device)
                job.device_label = describe(job.device)
        except (ConfigError, CheckpointError) as e:
            job.error = e
        jobs.append(job)
        if i % 64 == 63:
            gc.freeze()
    return jobs


def launch_batched(
    *,
    hydra_context: Any,
    task_function: Callable[[DictConfig], Any],
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    plots: bool,
    max_batch: int,
    writers: int | None = None,
    executor: str | None = None,
    executor_params: dict[str, Any] | None = None,
) -> list[JobReturn]:
    if max_batch < 0:
        raise ConfigError(f"hydra.launcher.max_batch={max_batch} is not allowed: must be >= 0 (0: what fits)")
    if writers is not None and writers < 0:
        raise ConfigError(f"hydra.launcher.writers={writers} is not allowed: must be >= 0, or null for one per core")
    if executor is not None:
        if executor not in EXECUTORS:
            raise ConfigError(
                f"hydra.launcher.executor={executor!r} is not allowed: choose one of {', '.join(EXECUTORS)}, or null"
            )
        if importlib.util.find_spec("submitit") is None:
            raise ConfigError(f"hydra.launcher.executor={executor} needs submitit: pip install -e '.[sweep]'")
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    # Thousands of composed configs stay alive through the launch: keep the cyclic GC from
    # rescanning them on every full pass (it doubled training time, and made composing 2,000
    # jobs take longer than writing them). FastSweepLoader freezes the ones it made, too.
    gc.freeze()
    try:
        # 1. compose and validate every job, as Hydra's basic launcher would
        t0 = time.perf_counter()
        facts = SweepFacts.of(config)
        jobs = _compose(hydra_context, config, job_overrides, initial_job_idx, plots, executor is None, facts)
        gc.freeze()

        # 2. train each group of batchable jobs as one program
        groups: dict[tuple[Any, ...], list[Job]] = defaultdict(list)
        for job in jobs:
            if job.error is None and job.alone is None:
                assert job.cfg is not None
                groups[group_key(job.cfg, job.device or job.cfg.device)].append(job)
        log.info(
            "Launching %d jobs: %d batched in %d group(s), %d on their own, %d invalid",
            len(jobs),
            sum(len(g) for g in groups.values()),
            len(groups),
            sum(1 for j in jobs if j.alone is not None and j.error is None),
            sum(1 for j in jobs if j.error is not None),
        )
        t1 = time.perf_counter()
        if executor is None:
            _train(groups, max_batch)
        else:
            folder = Path(str(config.hydra.sweep.dir)) / ".submitit"
            params = executor_params or {}
            if isinstance(params, DictConfig):
                params = OmegaConf.to_container(params, resolve=True)
            _train_submitit(groups, max_batch, executor, dict(params), folder)  # type: ignore[arg-type]

        # 3. write every job's dir (or run it, if it is not batched)
        t2 = time.perf_counter()
        returns = _finish_jobs(hydra_context, task_function, jobs, facts, writers)
    finally:
        gc.unfreeze()
    log.info(
        TIMING_LINE,
        len(jobs),
        t1 - t0,
        t2 - t1,
        time.perf_counter() - t2,
    )
    return returns
