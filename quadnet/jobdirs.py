"""A batched job's dir and JobReturn, written as Hydra's run_job would write them.

The batched launcher (:mod:`quadnet.sweep`) trains many jobs as one program; this module
then gives each job what Hydra's basic launcher gives it: its own dir, ``.hydra/``, a log
file, its run's artifacts (through the ordinary Trainer), the callbacks and a ``JobReturn``.
With callbacks configured, jobs are written one by one in this process, in Hydra's order;
without, forked writers share the work (it is pure Python, ~10 ms a job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from quadnet.batched import JobResult
from quadnet.config import TrainConfig
from quadnet.train import conclude
from quadnet.trainer import Trainer

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclasses.dataclass
class Job:
    """One job of a batched sweep, from its composed config to its result."""

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


@dataclasses.dataclass(frozen=True)
class SweepFacts:
    """What every job of a sweep shares, read once from the sweep's config."""

    sweep_dir: Path
    output_subdir: str | None  # where .hydra/ goes; None: not written
    job_name: str  # names the log file, as Hydra's job logging does
    has_callbacks: bool
    subdir_is_job_num: bool  # hydra.sweep.subdir is Hydra's default, ${hydra.job.num}

    @classmethod
    def of(cls, config: DictConfig) -> SweepFacts:
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


def set_job_fields(config: DictConfig, idx: int, facts: SweepFacts) -> None:
    """What Hydra's launchers set in a job's config: its id, num and output dir."""
    h = config.hydra
    with read_write(h), open_dict(h):
        h.job.id = h.job.num = idx
        # resolving ${hydra.job.num} costs ~0.6 ms a job: skip it for Hydra's default subdir
        subdir = str(idx) if facts.subdir_is_job_num else str(h.sweep.subdir)
        h.runtime.output_dir = str(facts.sweep_dir / subdir)


def _save_yaml(data: Any, path: Path) -> None:
    with open(path, "w") as f:
        yaml.dump(data, f, Dumper=_Dumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


_LOG_FORMAT = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra's file format


def _write(job: Job, run_dir: Path) -> float:
    """Write a batched job's run dir from the batch's result, as its own run would have."""
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


@contextlib.contextmanager
def _job_files(job: Job, facts: SweepFacts) -> Iterator[Path]:
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


def _outcome(job: Job, output_dir: Path) -> tuple[JobStatus, Any]:
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


def _job_return(job: Job, facts: SweepFacts, status: JobStatus, value: Any) -> JobReturn:
    """The JobReturn Hydra's run_job would give: the job's overrides, configs and outcome."""
    config = job.sweep_config  # hydra_cfg: the job's own config, not changed again
    ret = _WrittenJobReturn(overrides=list(config.hydra.overrides.task), hydra_cfg=config, working_dir=os.getcwd())
    ret._composed = job.composed
    ret.status, ret.return_value, ret.task_name = status, value, facts.job_name
    return ret


def write_job(hydra_context: Any, task_function: Callable[[DictConfig], Any], job: Job, facts: SweepFacts) -> JobReturn:
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

_WRITING: tuple[list[Job], SweepFacts] | None = None  # read by the forked writers


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


def writers_for(n_jobs: int, asked: int | None) -> int:
    """Forked writers for n_jobs dirs: as asked, else one per core for big sweeps; none where fork is unsafe."""
    if sys.platform != "linux" or n_jobs == 0:
        return 0
    if asked is not None:
        return min(asked, n_jobs)
    return 0 if n_jobs < 64 else min(os.cpu_count() or 1, n_jobs // 32)


def write_forked(jobs: list[Job], facts: SweepFacts, workers: int) -> list[JobReturn]:
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
