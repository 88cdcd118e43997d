"""The batched launcher's work: compose every job, train the batchable ones together, write each job's dir.

Called from ``hydra_plugins/quadnet_batched_launcher`` (kept thin so that Hydra's plugin
discovery does not import torch). Each job still goes through Hydra's ``run_job``, so it
gets its own dir, ``.hydra/``, log file, callbacks and a proper ``JobReturn``; for a batched
job the task that ``run_job`` calls writes the precomputed result instead of training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from quadnet.batched import JobResult, batchable, group_key, train_many
from quadnet.checkpoint import CheckpointError
from quadnet.config import ConfigError, TrainConfig, validate
from quadnet.device import describe, resolve_device

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    idx: int
    overrides: list[str]
    sweep_config: DictConfig
    cfg: TrainConfig | None = None
    device: torch.device | None = None
    error: Exception | None = None
    alone: str | None = None  # why it is not batched
    result: JobResult | None = None


def _raise(error: Exception) -> Callable[[DictConfig], Any]:
    def task(_: DictConfig) -> Any:
        raise error

    return task


def _writer(job: _Job) -> Callable[[DictConfig], float]:
    """The task for a batched job: write its run dir from the batch's result."""

    def task(_: DictConfig) -> float:
        from quadnet.train import _default_run_dir, conclude
        from quadnet.trainer import Trainer

        r, cfg = job.result, job.cfg
        assert r is not None and cfg is not None and job.device is not None
        state = {"params": r.params, "momentum_params": r.momentum_params, "epoch": r.epoch, "history": r.history}
        trainer = Trainer(cfg, _default_run_dir(), resume=state, device=torch.device("cpu"))
        trainer.device_label = describe(job.device)
        trainer.extra = {"batch": r.batch}
        return conclude(trainer.finish(r.status, r.train_seconds))

    return task


def launch_batched(
    *,
    hydra_context: Any,
    task_function: Callable[[DictConfig], Any],
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    plots: bool,
    max_batch: int,
) -> list[JobReturn]:
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    # 1. compose and validate every job, as Hydra's basic launcher would
    jobs: list[_Job] = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        job = _Job(idx, list(overrides), sweep_config)
        try:
            job.cfg = dataclasses.replace(validate(sweep_config), plots=plots)
            job.alone = batchable(job.cfg)
            if job.alone is None:
                job.device = resolve_device(job.cfg.device)
        except (ConfigError, CheckpointError) as e:
            job.error = e
        jobs.append(job)

    # 2. train each group of batchable jobs as one program
    groups: dict[tuple[Any, ...], list[_Job]] = defaultdict(list)
    for job in jobs:
        if job.error is None and job.alone is None:
            assert job.cfg is not None and job.device is not None
            groups[group_key(job.cfg, job.device)].append(job)
    alone = sum(1 for j in jobs if j.alone is not None and j.error is None)
    log.info(
        "Launching %d jobs: %d batched in %d group(s), %d on their own, %d invalid",
        len(jobs),
        sum(len(g) for g in groups.values()),
        len(groups),
        alone,
        sum(1 for j in jobs if j.error is not None),
    )
    for members in groups.values():
        device = members[0].device
        assert device is not None
        try:
            results = train_many([m.cfg for m in members], device, max_batch)  # type: ignore[misc]
        except Exception as e:  # the whole group fails, each job keeps the error
            log.exception("batch of %d jobs failed", len(members))
            for m in members:
                m.error = e
            continue
        for m, r in zip(members, results, strict=True):
            m.result = r

    # 3. each job through Hydra's run_job: its dir, .hydra/, logging, callbacks, JobReturn
    returns = []
    for job in jobs:
        log.info("\t#%d : %s%s", job.idx, " ".join(filter_overrides(job.overrides)),
                 f"  ({job.alone})" if job.alone else "")
        if job.error is not None:
            task = _raise(job.error)
        elif job.result is not None:
            task = _writer(job)
        else:
            task = task_function
        returns.append(
            run_job(
                hydra_context=hydra_context,
                task_function=task,
                config=job.sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        )
    return returns
