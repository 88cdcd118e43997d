"""``python -m quadnet.train [overrides]``: one training run, or a sweep with ``-m``.

:func:`train` is the plain function (a config in, a run dir and its summary out);
:func:`run` calls it from Python with the command line's keys; :func:`task` is what
Hydra runs for each job, and :func:`main` the entry point around it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

if __name__ == "__main__":  # python -m quadnet.train: a signal while torch and Hydra import is one line too
    from quadnet.cli import on_signals

    on_signals("interrupted while starting: nothing was written")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from quadnet import artifacts, checkpoint, engines, loop, rundir
from quadnet.cli import KEPT, closed_pipe_ok, fail, friendly_errors, on_signals
from quadnet.config import (
    ConfigError,
    TrainConfig,
    check_installed,
    compose,
    config_dir,
    one_line,
    out_of_memory,
    register_configs,
    validate,
    version_base,
)
from quadnet.data import make_dataset

log = logging.getLogger("quadnet")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    parts = [_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v} for k, v in d.items()]
    return {key: value for part in parts for key, value in part.items()}


def _explicit(cfg: Any, c: TrainConfig) -> dict[str, Any]:
    """The keys the user set, with their values: in Hydra the command line's, from a dict its
    own, else those not at their default."""
    flat = _flatten(dataclasses.asdict(c))
    if isinstance(cfg, DictConfig) and HydraConfig.initialized():
        keys = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
        keys = {"data.name" if k == "data" else k for k in keys}
    elif isinstance(cfg, dict):
        keys = set(_flatten(cfg))
    else:
        keys = {k for k, v in _flatten(dataclasses.asdict(TrainConfig())).items() if flat[k] != v}
    return {k: flat[k] for k in sorted(keys & set(flat))}


def start(cfg: Any, c: TrainConfig) -> loop.Job:
    """Where a run starts: afresh, or (resume=) from a checkpoint's state and config, with the keys
    the user set now on top; its shape, data and optimizer stay."""
    if not c.resume:
        return loop.Job(c, start_state(c))
    ck = checkpoint.load(c.resume)
    merged = OmegaConf.create(ck["config"])
    for key, value in _explicit(cfg, c).items():
        OmegaConf.update(merged, key, value)
    new = validate(OmegaConf.to_container(merged))  # type: ignore[arg-type]
    now, was = ({**vars(c), **{f"data.{k}": v for k, v in vars(c.data).items()}} for c in (new, ck["cfg"]))
    for key in ("hidden_dim", "optimizer", "seed", "init", *(k for k in now if k.startswith("data."))):
        if now[key] != was[key]:
            raise ConfigError(
                f"cannot resume {ck['path']!r} with {key}={now[key]!r}: it was trained with {key}={was[key]!r}, "
                "and a run cannot change its shape, data, optimizer or initial weights"
            )
    epoch = ck["epoch"]
    if epoch > new.epochs:
        raise ConfigError(f"epochs={new.epochs} is below the checkpoint's epoch {epoch}; resume goes on from there")
    return loop.Job(new, ck["state"], epoch, [r for r in ck["history"] if r["epoch"] <= epoch])


def start_state(c: TrainConfig) -> dict[str, Any]:
    """A fresh job's state: its initial weights, no optimizer buffers yet, step 0."""
    from quadnet.data import make_dataset
    from quadnet.model import initial_params

    classes = make_dataset(c.data).num_classes
    return {"params": initial_params(c.hidden_dim, c.seed, c.init, classes), "optimizer": {}, "step": 0}


def train(cfg: DictConfig | dict[str, Any] | TrainConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate ``cfg``, train, write the run dir, and return the summary.

    Raises :class:`~quadnet.config.ConfigError` or :class:`~quadnet.checkpoint.CheckpointError`
    for bad input before anything is trained.
    """
    from quadnet.device import describe, resolve_device

    job = start(cfg, validate(cfg))
    c, out = job.cfg, Path(run_dir) if run_dir is not None else _default_run_dir()
    check_installed(c)
    refuse_earlier_run(out, c.resume)
    device = resolve_device(c.device if c.engine in ("auto", "torch") else "cpu")
    classes = make_dataset(c.data).classes
    what = f"{c.data.name} data, hidden_dim={c.hidden_dim}, {c.epochs} epochs, "
    what += f"{engines.engine_name(c, device, len(classes))} engine, {c.optimizer}"
    resumed = f"; resuming at epoch {job.epoch}" if job.epoch else ""
    log.info("quadnet: %s on %s (%s)%s", what, describe(device), c.dtype, resumed)

    def save(jobs: list[loop.Job]) -> None:
        try:  # (training goes on without it, as a batch's does: the run dir is written at the end)
            checkpoint.save(out / checkpoint.CHECKPOINT, checkpoint.of(jobs[0], "running", classes))
        except OSError as e:
            log.warning("no checkpoint written at epoch %d: %s", jobs[0].epoch, one_line(e))

    with loop.catch_signals() as stop:  # up until the run dir is complete
        out.mkdir(parents=True, exist_ok=True)
        label, engine, _, seconds = loop.train_batch([job], device, stop, save)
        ran = {"train_seconds": seconds, "device": label, "engine": engine, "overrides": _overrides()}
        summary = rundir.write(out, job, ran, stop.signal, sweep=_sweep_dir())
    if stop.signal is not None and job.status != "interrupted":  # it came as the dir was written
        raise Interrupted(stop.signal, summary)
    return summary


def refuse_earlier_run(out: Path, resume: str | None) -> None:
    """An earlier run's training is never lost: a run into a dir that holds one is refused, unless
    resume= names that dir (or its very checkpoint)."""
    here = checkpoint.in_dir(out)
    if here is not None and not (resume and checkpoint.find(resume).resolve() == here.resolve()):
        raise ConfigError(
            f"{out} holds an earlier run (its {here.name}): {shlex.quote(f'resume={hydra_value(out)}')} "
            "goes on from it (a sweep: run it again with hydra/launcher=batched), or choose another dir"
        )


def refuse_before_hydra(overrides: list[str]) -> None:
    """A single run that will be refused is refused before Hydra makes its dir and writes its
    ``.hydra/`` record there (a dir left behind; an earlier run's record rewritten): a bad value,
    key or file, a resume= that cannot be read, or a dir that holds an earlier run. (~50 ms.)"""
    cfg = compose(overrides, with_hydra=True)
    c = validate(cfg)
    check_installed(c)
    if c.resume:
        checkpoint.load(c.resume)
    else:
        make_dataset(c.data)
    out = Path.cwd() / str(cfg.hydra.run.dir)
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        refuse_earlier_run(out, c.resume)
    record = (out / str(cfg.hydra.output_subdir), out / f"{cfg.hydra.job.name}.log")
    _existing.update(p for p in (*record, out, *out.parents) if p.exists())  # (what a refused run must not remove)


def _sweep_dir() -> Path | None:
    """The sweep dir of a job Hydra runs in a sweep; None for a single run."""
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().runtime.cwd, HydraConfig.get().sweep.dir)


def _overrides() -> list[str]:
    """The job's command-line overrides (summary.json keeps them beside the config), [] outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


class Interrupted(KeyboardInterrupt):
    """A signal that came as a run's dir was written: the run is complete, and what would come
    next (a basic sweep's next job, a notebook's next line) does not start."""

    def __init__(self, signum: int, summary: dict[str, Any]) -> None:
        super().__init__(f"{signal.Signals(signum).name} after {summary['run_dir']} was written")
        self.signum, self.summary = signum, summary


def _default_run_dir() -> Path:
    """Hydra's run dir for this job; outside Hydra, the one train.yaml names (outputs/<time>)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(compose([], with_hydra=True).hydra.run.dir)


def run(*overrides: str, run_dir: str | Path | None = None, **keys: Any) -> dict[str, Any]:
    """Train from Python with the command line's keys; returns the summary (its ``run_dir`` says where).

    ``quadnet.run("data=sampled", hidden_dim=10, epochs=500)``; dotted keys as ``**{"data.n_train": 64}``;
    ``hydra.run.dir=…`` or ``run_dir=`` picks the dir. Each call composes afresh, so it can be called
    again in the same process (a notebook). The run dir holds the run's files, without Hydra's
    ``.hydra/`` record and log, which only the command line writes."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    lines = [*overrides, *(f"{k}={_value(v)}" for k, v in keys.items())]
    try:
        cfg = compose(lines, with_hydra=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # in the command line's words
        raise ConfigError(one_line(e)) from None
    summary = train(cfg, run_dir=run_dir if run_dir is not None else cfg.hydra.run.dir)
    rundir.headline(summary)
    return summary


def _value(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def conclude(
    summary: dict[str, Any], single_run: bool = True, exit: bool = True, quiet: bool = False, sweep: Path | None = None
) -> float:
    """Report how a run ended, exit where it must, and return the objective.

    Interrupted: the resume command, and exit 128+signal (a sweep under Hydra's basic launcher
    stops there too; `sweep`, its dir: the command goes on with all of it). Diverged: an error
    line, exit 3 in a single run; in a sweep the other jobs carry on and this one scores +inf.
    `quiet`: the headline at debug level (big sweeps)."""
    rundir.headline(summary, table=single_run, level=logging.DEBUG if quiet else logging.INFO)
    status = summary["status"]
    if status == "interrupted":
        resume = "python -m quadnet.train " + shlex.quote(f"resume={hydra_value(summary['run_dir'])}")
        if sweep is not None and not summary["config"]["resume"]:  # (resume= is not for batched sweeps)
            resume = resume_sweep(sweep)
        message = "interrupted at epoch %d; checkpoint written. Resume with:\n  %s"
        # (a batched sweep, exit=False, prints one command for the whole sweep instead)
        log.log(logging.WARNING if exit and not quiet else logging.DEBUG, message, summary["epoch"], resume)
        if exit:
            sys.exit(128 + signal.Signals[summary["signal"] or "SIGINT"].value)
    if status == "diverged":
        message = "diverged: the loss became non-finite at epoch %d (lr=%g); try a smaller lr"
        log.log(logging.DEBUG if quiet else logging.ERROR, message, summary["epoch"], summary["config"]["lr"])
        if single_run and exit:
            sys.exit(3)
    value = artifacts.summary_metric(summary, summary["config"]["objective"])  # what a sweeper minimises
    return math.inf if value is None else value  # +inf: a run that did not finish with finite values


def hydra_value(path: str | Path) -> str:
    """An absolute path as a value in Hydra's override grammar: quoted unless it is plain."""
    where = os.path.abspath(path)
    if re.fullmatch(r"[\w/.:@+-]+", where):
        return where
    # in a quoted value a backslash escapes only before a quote (or the closing one): double those
    return "'" + re.sub(r"(\\*)('|$)", lambda m: 2 * m[1] + ("\\'" if m[2] else ""), where) + "'"


def resume_sweep(sweep_dir: Path) -> str:
    """The command that goes on with an interrupted sweep: this one, into its dir, under the batched
    launcher (it resumes each job from its checkpoint and keeps those that completed)."""
    again = [a for a in sys.argv[1:] if not a.startswith(("hydra.sweep.dir=", "hydra/launcher="))]
    again += ["hydra/launcher=batched", f"hydra.sweep.dir={hydra_value(sweep_dir)}"]
    return "python -m quadnet.train " + shlex.join(again)


def task(cfg: DictConfig) -> float:
    """One job, as Hydra runs it. A refused single run leaves no dir behind; a refused sweep
    job keeps its dir, with the reason in its summary.json."""
    from hydra.types import RunMode

    global _sweep
    hc = HydraConfig.get()
    single = hc.mode == RunMode.RUN
    basic = not single and str(hc.launcher._target_).endswith(".BasicLauncher")
    sweep = _sweep = Path(hc.runtime.cwd, hc.sweep.dir) if basic else None  # (hydra.job.chdir=true: in its dir)
    if single or basic:  # this process runs the jobs
        try:  # (the batched launcher takes the sweep's lock itself, before any job dir is made)
            rundir.lock(sweep or Path(hc.runtime.output_dir), "sweep" if sweep else "run")
        except ConfigError as e:
            fail(str(e))  # at once: nothing of this run is written into another's dir
    try:
        summary = train(cfg)
    except Interrupted as e:  # the job is complete and written; the sweep stops after it
        conclude(e.summary, single_run=single)
        again = (
            f" Resume the sweep with:\n  {resume_sweep(sweep)}" if sweep and not e.summary["config"]["resume"] else ""
        )
        log.warning("interrupted after %s was written.%s", e.summary["run_dir"], again)
        sys.exit(128 + e.signum)
    except (ConfigError, checkpoint.CheckpointError, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not out_of_memory(e):
            raise
        out = Path(hc.runtime.output_dir)
        if not single:
            if checkpoint.in_dir(out) is None:  # (an earlier run's dir stays as it was)
                rundir.write_failed(out, e, overrides=_overrides())
            raise
        drop_unused(hc)
        fail(one_line(e))
    return conclude(summary, single_run=single, sweep=sweep)


_sweep: Path | None = None  # the basic sweep this process runs, once a job of it has started
_run: Any = None  # Hydra's config of the single run this process starts
_multirun: Any = None  # the config of the sweep this process runs
_existing: set[Path] = set()  # the single run's dir and the dirs above it that were there before it


def drop_unused(hc: Any) -> None:
    """The dirs a refused single run made (its own, if it holds only Hydra's record and an empty
    log; outputs/ of a first run, if empty); none that was there before the command."""
    out = Path(hc.runtime.cwd) / (OmegaConf.select(hc, "runtime.output_dir") or hc.run.dir)  # (before run_job)
    if not _existing:  # (not known: a run not started by main)
        return
    record, log_file = out / str(hc.output_subdir), out / f"{hc.job.name}.log"
    with contextlib.suppress(OSError):  # (a dir that is not empty stops it)
        if out in _existing:  # the user's dir: only what Hydra wrote into it goes
            if record not in _existing:
                shutil.rmtree(record)
            if log_file not in _existing:
                log_file.unlink()
        elif {p.name for p in out.iterdir()} <= {record.name, log_file.name}:
            shutil.rmtree(out)
            for parent in out.parents:
                if parent in _existing:
                    break
                parent.rmdir()


def closing_line(ends: Counter[str], sweep_dir: Path, jobs: int | None = None) -> None:
    """A sweep's last line: how its jobs ended (of `jobs`, those written), and the command that reports on them."""
    outcome = ", ".join(f"{n} {s}" for s, n in sorted(ends.items()) if n) or "none written"
    where = shlex.quote(str(Path(sweep_dir).absolute()))
    log.info("%d jobs: %s; report: python -m quadnet.report %s", jobs or sum(ends.values()), outcome, where)


class Callbacks(Callback):
    """Hydra calls it (train.yaml's hydra.callbacks) as a single run starts: where it goes is kept,
    for when Hydra cannot write its record there (a full disk); as a sweep starts, for its closing
    line when a failed job ends it (Hydra raises that job's error once all have run); and when a
    sweep ends, once for all the launches of a sweeper (Optuna's batches of trials)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _run
        _run = config.hydra

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _multirun
        _multirun = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_closing_line(config)


def sweep_closing_line(config: DictConfig) -> None:
    """A sweep's closing line: from the batched launcher's count of its jobs, else from the summaries."""
    where = Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)
    batched = str(OmegaConf.select(config, "hydra.launcher._target_")).startswith("hydra_plugins.quadnet_batched")
    if batched:
        from quadnet.sweep import ENDED as ends  # (its launches counted their jobs)
    else:
        ends = Counter(_status(p) for p in where.glob("*/summary.json"))
    if ends:  # (none: the sweep ended before any job was written)
        closing_line(ends, where)


def _status(summary: Path) -> str:
    with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
        return str(json.loads(summary.read_text()).get("status", "damaged"))
    return "damaged"


def _stopped(signum: int) -> None:
    """Ctrl-C or SIGTERM outside a run's loop (between a basic sweep's jobs, say): one line, with the
    command that goes on with a basic sweep, and an exit at once. (Unwinding through Hydra's and
    OmegaConf's code from here could turn into a second error; quadnet writes its files atomically.)"""
    again = f"; go on with the sweep: {resume_sweep(_sweep)}" if _sweep else ""
    print(f"error: {KEPT}{again}", file=sys.stderr)
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os._exit(128 + signum)


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        from quadnet.config import help_text

        with closed_pipe_ok():
            print(help_text())
        return
    if not sys.stderr.isatty():  # no colour codes in logs and pipes (Optuna's colorlog honours this)
        os.environ.setdefault("NO_COLOR", "1")

    def bad_flag(_: Any, message: str) -> None:  # one line, not the usage block of the parser Hydra makes
        if version_base() and "=" in message:  # overrides after a flag
            message += " (Hydra 1.3 takes its flags, such as -m, before the overrides)"
        fail(f"{message}; see --help for quadnet's keys and --hydra-help for Hydra's options")

    register_configs()
    if not any(a.startswith("-") for a in sys.argv[1:]):  # a single run
        with friendly_errors():
            refuse_before_hydra(sys.argv[1:])
    # from here a signal outside a run's loop (between a basic sweep's jobs, say) ends in one line
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: _stopped(signum))
    logging.raiseExceptions = False  # a reader that stops reading (| head) does not stop the run
    # (hydra.main applied here: at import it would set Hydra's version base for every app)
    with friendly_errors(), closed_pipe_ok(), mock.patch.object(argparse.ArgumentParser, "error", bad_flag):
        # Hydra 1.4 asks which targets a config may instantiate: quadnet's own (its sweep-end callback)
        trusted = version_base() or {"execution_whitelist": ("quadnet.*",)}
        try:
            hydra.main(config_path=config_dir(), config_name="train", **trusted)(task)()
        except Exception as e:
            raw = isinstance(e, OSError) and e.errno is not None  # (Hydra's, writing a dir or its record: a full disk)
            if _multirun is not None:
                with contextlib.suppress(Exception):  # a failed job ends the sweep: its closing line first
                    sweep_closing_line(_multirun)
                if raw:  # (Hydra's, making the sweep dir or a job's; or a job's error, raised again by Hydra)
                    where = Path(os.path.abspath(Path(_multirun.hydra.runtime.cwd, _multirun.hydra.sweep.dir)))
                    name = e.filename  # type: ignore[attr-defined]
                    sweep = name is None or Path(os.path.abspath(name)) in (where, *where.parents)
                    what = f"the sweep dir {where} (hydra.sweep.dir)" if sweep else repr(str(name))
                    raise OSError(f"cannot write {what}: {e.strerror}") from None  # type: ignore[attr-defined]
            elif raw and _run is not None:
                drop_unused(_run)
                raise OSError(f"cannot write the run dir {_run.run.dir} (hydra.run.dir): {e.strerror}") from None  # type: ignore[attr-defined]
            raise


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: the batched launcher knows
    # quadnet's jobs by their task function, quadnet.train.task.
    from quadnet import train as _module

    _module.main()
