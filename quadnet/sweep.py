"""The batched launcher's work: compose every job, train the batchable ones together, write each job's dir.

Called from ``hydra_plugins/quadnet_batched_launcher`` (kept thin so that Hydra's plugin
discovery does not import torch). Every job gets what Hydra's basic launcher gives it: its
own dir, ``.hydra/``, a log file, the callbacks and a proper ``JobReturn``. Jobs that run on
their own (or failed validation) go through Hydra's ``run_job``; batched jobs through
:func:`run_written_job`, which writes the same dir from the batch's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import logging
import multiprocessing
import os
import pickle
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from quadnet.batched import JobResult, batchable, group_key, train_chunk, train_many
from quadnet.checkpoint import CheckpointError
from quadnet.config import ConfigError, TrainConfig, validate
from quadnet.device import describe, resolve_device

log = logging.getLogger(__name__)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclasses.dataclass
class _Job:
    idx: int
    overrides: list[str]
    sweep_config: DictConfig
    composed: TrainConfig | None = None  # as Hydra composed it
    cfg: TrainConfig | None = None  # as it is trained (the launcher decides on plots)
    device: torch.device | None = None
    device_label: str | None = None  # as summaries record it, e.g. 'cuda:0 (NVIDIA H200)'
    error: Exception | None = None
    alone: str | None = None  # why it is not batched
    result: JobResult | None = None


def _raise(error: Exception) -> Callable[[DictConfig], Any]:
    def task(_: DictConfig) -> Any:
        raise error

    return task


def _write(job: _Job, run_dir: Path) -> float:
    """Write a batched job's run dir from the batch's result, as its own run would have."""
    from quadnet.train import conclude
    from quadnet.trainer import Trainer

    r, cfg = job.result, job.cfg
    assert r is not None and cfg is not None and job.device_label is not None
    state = {"params": r.params, "momentum_params": r.momentum_params, "epoch": r.epoch, "history": r.history}
    trainer = Trainer(
        cfg,
        run_dir,
        resume=state,
        device=torch.device("cpu"),
        device_label=job.device_label,
        summary_extra={"batch": r.batch},
    )
    return conclude(trainer.finish(r.status, r.train_seconds), single_run=False)


def _save_yaml(obj: Any, path: Path) -> None:
    data = obj
    if isinstance(obj, DictConfig | ListConfig):
        data = OmegaConf.to_container(obj, resolve=False, enum_to_str=True)
    with open(path, "w") as f:
        yaml.dump(data, f, Dumper=_Dumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


@dataclasses.dataclass(frozen=True)
class _SweepFacts:
    """What every job of a sweep shares, read once from the sweep's config."""

    sweep_dir: Path
    output_subdir: str | None  # where .hydra/ goes; None: not written
    job_name: str  # names the log file, as Hydra's job logging does
    has_callbacks: bool
    subdir_is_job_num: bool  # hydra.sweep.subdir is Hydra's default, ${hydra.job.num}

    @classmethod
    def of(cls, config: DictConfig) -> _SweepFacts:
        h = config.hydra
        subdir = h.output_subdir
        raw_subdir = OmegaConf.to_container(h.sweep, resolve=False)["subdir"]  # type: ignore[index]
        return cls(
            Path(str(h.sweep.dir)).resolve(),
            None if subdir is None else str(subdir),
            str(h.job.name),
            bool(h.callbacks),
            raw_subdir == "${hydra.job.num}",
        )


EXECUTORS = ("local", "slurm", "debug")  # submitit's clusters ("debug" runs the chunks in this process)

_LOG_FORMAT = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra's file format


def _set_job_fields(config: DictConfig, idx: int, facts: _SweepFacts) -> None:
    """What Hydra's launchers set in a job's config: its id, num and output dir."""
    h = config.hydra
    with read_write(h), open_dict(h):
        h.job.id = h.job.num = idx
        # resolving ${hydra.job.num} costs ~0.6 ms a job: skip it for Hydra's default subdir
        subdir = str(idx) if facts.subdir_is_job_num else str(h.sweep.subdir)
        h.runtime.output_dir = str(facts.sweep_dir / subdir)


@contextlib.contextmanager
def _job_files(job: _Job, facts: _SweepFacts) -> Iterator[Path]:
    """The job's dir with ``.hydra/`` written, and its log file attached while inside.

    The same files as Hydra's run_job, which deep-copies the config several times and dumps
    YAML in pure Python (more than training the job in a batch costs); this uses libyaml when
    present and copies no configs.
    """
    config = job.sweep_config
    output_dir = Path(str(config.hydra.runtime.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    if facts.output_subdir is not None:
        assert job.composed is not None
        hydra_dir = output_dir / facts.output_subdir
        hydra_dir.mkdir(exist_ok=True)
        _save_yaml(dataclasses.asdict(job.composed), hydra_dir / "config.yaml")
        _save_yaml({"hydra": OmegaConf.to_container(config.hydra, enum_to_str=True)}, hydra_dir / "hydra.yaml")
        _save_yaml(list(config.hydra.overrides.task), hydra_dir / "overrides.yaml")
    handler = logging.FileHandler(output_dir / f"{facts.job_name}.log")
    handler.setFormatter(_LOG_FORMAT)
    logging.getLogger().addHandler(handler)
    try:
        yield output_dir
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _outcome(job: _Job, output_dir: Path) -> tuple[JobStatus, Any]:
    try:
        return JobStatus.COMPLETED, _write(job, output_dir)
    except Exception as e:
        return JobStatus.FAILED, e


class _WrittenJobReturn(JobReturn):
    """A JobReturn whose ``cfg`` (the app's config as a DictConfig) is built when first read.

    Building it costs more than writing the job's dir, and sweepers read only the overrides
    and the return value; callbacks and other readers get the same config Hydra would give.
    """

    _composed: TrainConfig | None = None
    _cfg: Any = None

    @property  # type: ignore[override]
    def cfg(self) -> Any:
        if self._cfg is None and self._composed is not None:
            # the app's part as composed (it has no interpolations), without copying the Hydra node
            self._cfg = OmegaConf.create(dataclasses.asdict(self._composed))
        return self._cfg

    @cfg.setter
    def cfg(self, value: Any) -> None:
        self._cfg = value


def _job_return(job: _Job, facts: _SweepFacts, status: JobStatus, value: Any) -> JobReturn:
    """The JobReturn Hydra's run_job would give: the job's overrides, configs and outcome."""
    config = job.sweep_config  # hydra_cfg: the job's own config, not changed again
    ret = _WrittenJobReturn(overrides=list(config.hydra.overrides.task), hydra_cfg=config, working_dir=os.getcwd())
    ret._composed = job.composed
    ret.status, ret.return_value, ret.task_name = status, value, facts.job_name
    return ret


def run_written_job(
    hydra_context: Any, task_function: Callable[[DictConfig], Any], job: _Job, facts: _SweepFacts
) -> JobReturn:
    """What Hydra's run_job does for a job, lean: its dir, ``.hydra/``, log file, callbacks, JobReturn."""
    config = job.sweep_config
    callbacks = hydra_context.callbacks
    if facts.has_callbacks:  # what callbacks may read; setting it costs a copy of the config
        HydraConfig.instance().set_config(config)
    try:
        with _job_files(job, facts) as output_dir:
            callbacks.on_job_start(config=config, task_function=task_function)
            ret = _job_return(job, facts, *_outcome(job, output_dir))
            callbacks.on_job_end(config=config, job_return=ret)
    except OSError as e:  # its dir could not be written: this job fails, not the sweep
        ret = _job_return(job, facts, JobStatus.FAILED, e)
    return ret


# ---------------------------------------------------------------- writing in forked processes
# Writing a job's dir is pure-Python work of ~10-20 ms; thousands of them are the slowest part
# of a batched sweep. Without callbacks (whose order must be Hydra's), forked writers share it:
# they inherit the jobs (copy-on-write, nothing pickled), write their dirs and send back only
# each outcome.

_WRITING: tuple[list[_Job], _SweepFacts] | None = None  # read by the forked writers


def _writer_init() -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: an inherited OpenMP pool can hang after fork


def _write_chunk(positions: list[int]) -> list[tuple[JobStatus, Any]]:
    assert _WRITING is not None
    jobs, facts = _WRITING
    out = []
    for i in positions:
        try:
            with _job_files(jobs[i], facts) as output_dir:
                status, value = _outcome(jobs[i], output_dir)
        except OSError as e:  # its dir could not be written: this job fails, not the others
            status, value = JobStatus.FAILED, e
        if status == JobStatus.FAILED:  # send back what pickles
            try:
                pickle.dumps(value)
            except Exception:
                value = RuntimeError(f"{type(value).__name__}: {value}")
        out.append((status, value))
    return out


def _writers(n_jobs: int, asked: int | None) -> int:
    """Forked writers for n_jobs dirs: as asked, else one per core for big sweeps; none where fork is unsafe."""
    if sys.platform != "linux" or n_jobs == 0:
        return 0
    if asked is not None:
        return min(asked, n_jobs)
    return 0 if n_jobs < 64 else min(os.cpu_count() or 1, n_jobs // 32)


def _write_forked(jobs: list[_Job], facts: _SweepFacts, workers: int) -> list[JobReturn]:
    global _WRITING
    chunk = max(1, min(256, len(jobs) // (4 * workers)))
    positions = [list(range(i, min(i + chunk, len(jobs)))) for i in range(0, len(jobs), chunk)]
    outcomes: list[tuple[JobStatus, Any]] = []
    _WRITING = (jobs, facts)
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_writer_init) as pool:
            futures = [pool.submit(_write_chunk, p) for p in positions]
            for part, future in zip(positions, futures, strict=True):
                try:
                    outcomes += future.result()
                except Exception as e:  # a writer died (killed, out of memory): its jobs fail, not the sweep
                    outcomes += [(JobStatus.FAILED, e)] * len(part)
    finally:
        _WRITING = None
    return [_job_return(job, facts, *o) for job, o in zip(jobs, outcomes, strict=True)]


def _train(groups: dict[tuple[Any, ...], list[_Job]], max_batch: int) -> None:
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
    groups: dict[tuple[Any, ...], list[_Job]], max_batch: int, executor: str, params: dict[str, Any], folder: Path
) -> None:
    """Hand each group to submitit in chunks of at most max_batch jobs, one batched program per
    submitit job (a SLURM job array with cluster=slurm), and collect what they return. The
    device is resolved where a chunk runs. A chunk that fails fails each of its jobs."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    ex.update_parameters(**params)
    chunks: list[list[_Job]] = []
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


def _run_alone(hydra_context: Any, task_function: Callable[[DictConfig], Any], job: _Job) -> JobReturn:
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
    jobs: list[_Job],
    facts: _SweepFacts,
    writers: int | None,
) -> list[JobReturn]:
    """Every job's dir and JobReturn, in job order: batched ones written from their result, the rest run."""
    for job in jobs:
        log.info(
            "\t#%d : %s%s", job.idx, " ".join(filter_overrides(job.overrides)), f"  ({job.alone})" if job.alone else ""
        )
    written = [j for j in jobs if j.result is not None]
    workers = 0 if facts.has_callbacks else _writers(len(written), writers)
    returns: dict[int, JobReturn] = {}
    if workers:
        returns.update(zip([j.idx for j in written], _write_forked(written, facts, workers), strict=True))
    for job in jobs:
        if job.idx not in returns:
            if job.result is not None:
                returns[job.idx] = run_written_job(hydra_context, task_function, job, facts)
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
    facts: _SweepFacts,
) -> list[_Job]:
    jobs: list[_Job] = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        _set_job_fields(sweep_config, idx, facts)
        job = _Job(idx, list(overrides), sweep_config)
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
        facts = _SweepFacts.of(config)
        jobs = _compose(hydra_context, config, job_overrides, initial_job_idx, plots, executor is None, facts)
        gc.freeze()

        # 2. train each group of batchable jobs as one program
        groups: dict[tuple[Any, ...], list[_Job]] = defaultdict(list)
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
        "composed %d jobs in %.2f s, trained in %.2f s, wrote their dirs in %.2f s",
        len(jobs),
        t1 - t0,
        t2 - t1,
        time.perf_counter() - t2,
    )
    return returns
