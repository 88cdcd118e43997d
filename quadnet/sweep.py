"""The batched launcher's work: compose every job, train the batchable ones together, write each job's dir.

Called from ``hydra_plugins/quadnet_batched_launcher`` (kept thin so that Hydra's plugin
discovery does not import torch). Every job gets what Hydra's basic launcher gives it: its
own dir, ``.hydra/``, a log file, the callbacks and a proper ``JobReturn``. Jobs that run on
their own (or failed validation) go through Hydra's ``run_job``; batched jobs through
:func:`run_written_job`, which writes the same dir from the batch's result.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from quadnet.batched import JobResult, batchable, group_key, train_many
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
    assert r is not None and cfg is not None and job.device is not None
    state = {"params": r.params, "momentum_params": r.momentum_params, "epoch": r.epoch, "history": r.history}
    trainer = Trainer(
        cfg,
        run_dir,
        resume=state,
        device=torch.device("cpu"),
        device_label=describe(job.device),
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

    @classmethod
    def of(cls, config: DictConfig) -> _SweepFacts:
        h = config.hydra
        subdir = h.output_subdir
        return cls(
            Path(str(h.sweep.dir)).resolve(),
            None if subdir is None else str(subdir),
            str(h.job.name),
            bool(h.callbacks),
        )


_LOG_FORMAT = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra's file format


def run_written_job(
    hydra_context: Any, task_function: Callable[[DictConfig], Any], config: DictConfig, job: _Job, facts: _SweepFacts
) -> JobReturn:
    """What Hydra's run_job does for a job, lean: its dir, ``.hydra/``, log file, callbacks, JobReturn.

    run_job deep-copies the config several times and dumps YAML in pure Python, which costs
    more than training the job in a batch; this writes the same files with libyaml when
    present. Jobs that train on their own still go through run_job itself.
    """
    output_dir = facts.sweep_dir / str(config.hydra.sweep.subdir)
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = str(output_dir)
    assert job.composed is not None
    # The app's part of the config as composed (it has no interpolations), built without copying
    # the Hydra node; hydra_cfg is the job's own config, which holds that node and is not changed again.
    task_cfg = OmegaConf.create(dataclasses.asdict(job.composed))
    task_overrides = list(config.hydra.overrides.task)
    ret = JobReturn(overrides=task_overrides, cfg=task_cfg, hydra_cfg=config, working_dir=os.getcwd())
    output_dir.mkdir(parents=True, exist_ok=True)
    if facts.output_subdir is not None:
        hydra_dir = output_dir / facts.output_subdir
        hydra_dir.mkdir(exist_ok=True)
        _save_yaml(task_cfg, hydra_dir / "config.yaml")
        hydra_node = OmegaConf.to_container(config.hydra, resolve=False, enum_to_str=True)
        _save_yaml({"hydra": hydra_node}, hydra_dir / "hydra.yaml")
        _save_yaml(task_overrides, hydra_dir / "overrides.yaml")
    handler = logging.FileHandler(output_dir / f"{facts.job_name}.log")
    handler.setFormatter(_LOG_FORMAT)
    logging.getLogger().addHandler(handler)
    callbacks = hydra_context.callbacks
    if facts.has_callbacks:  # what callbacks may read; setting it costs a copy of the config
        HydraConfig.instance().set_config(config)
    try:
        callbacks.on_job_start(config=config, task_function=task_function)
        try:
            ret.return_value = _write(job, output_dir)
            ret.status = JobStatus.COMPLETED
        except Exception as e:
            ret.return_value = e
            ret.status = JobStatus.FAILED
        ret.task_name = facts.job_name
        callbacks.on_job_end(config=config, job_return=ret)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return ret


def _train(groups: dict[tuple[Any, ...], list[_Job]], max_batch: int) -> None:
    """Train each group as one program; a group that fails fails each of its jobs."""
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


def _run(hydra_context: Any, task_function: Callable[[DictConfig], Any], job: _Job, facts: _SweepFacts) -> JobReturn:
    """One job's dir and JobReturn: written from the batch, or run by Hydra's run_job."""
    log.info(
        "\t#%d : %s%s", job.idx, " ".join(filter_overrides(job.overrides)), f"  ({job.alone})" if job.alone else ""
    )
    if job.result is not None:
        return run_written_job(hydra_context, task_function, job.sweep_config, job, facts)
    task = _raise(job.error) if job.error is not None else task_function
    return run_job(
        hydra_context=hydra_context,
        task_function=task,
        config=job.sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


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
    t0 = time.perf_counter()
    jobs: list[_Job] = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        job = _Job(idx, list(overrides), sweep_config)
        try:
            job.composed = validate(sweep_config)
            job.cfg = dataclasses.replace(job.composed, plots=plots)
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
    # Thousands of composed configs are alive now; keep the cyclic GC from rescanning them
    # on every collection the training loop's tensors trigger (it doubled training time).
    gc.collect()
    gc.freeze()
    try:
        t1 = time.perf_counter()
        _train(groups, max_batch)
        t2 = time.perf_counter()
        facts = _SweepFacts.of(config)
        returns = [_run(hydra_context, task_function, job, facts) for job in jobs]
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
