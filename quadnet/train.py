"""``python -m quadnet.train [overrides]``: one training run, or a sweep with ``-m``.

Reading order. :func:`main` hands the command line to Hydra. Before Hydra writes a byte,
:class:`Callbacks` prepares the run (:func:`prepare`: the config validated, its data made, where it
starts found, its dir checked and held) or refuses it in one line; a sweep's dir is held the same
way. :func:`task` trains what was prepared (:func:`train`) and reports how it ended
(:func:`quadnet.console.conclude`). :func:`run` does the same from Python.
"""

import dataclasses
import logging
import os
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.main import get_args_parser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quadnet import checkpoint, config, console, engines, exits, loop, rundir, sweep, tracking
from quadnet.config import ConfigError, TrainConfig, one_line
from quadnet.data import Dataset, make_dataset
from quadnet.device import describe, resolve_device

log = logging.getLogger("quadnet")
HYDRA_ERRORS = (HydraException, OmegaConfBaseException, OverflowError)  # (Overflow: a huge int for a float key)


class Prepared(NamedTuple):
    """A run that passed every check and may be written: its start, data, device and dir."""

    job: loop.Job
    data: Dataset
    device: str  # as torch names it: cpu, cuda:0, mps
    out: Path
    overrides: list[str]


def prepare(cfg: Any, out: Path, overrides: list[str] | None = None) -> Prepared:
    """Everything that can refuse a run, before anything is written: the config, the installs it
    needs, its data, the checkpoint it resumes (the keys the user set go on top of its config,
    under :func:`quadnet.checkpoint.resume_check`), and the dir. Raises ConfigError or CheckpointError."""
    c = config.validate(cfg)
    ck = checkpoint.load(c.resume) if c.resume else None
    if ck is not None:  # the keys the user set: the command line's, a dict's own, else those not at their default
        flat, merged = config.flatten(dataclasses.asdict(c)), OmegaConf.create(ck["config"])
        keys = {k for k, v in config.flatten(dataclasses.asdict(TrainConfig())).items() if flat[k] != v}
        if overrides is not None and isinstance(cfg, DictConfig):
            keys = {"data.name" if k == "data" else k for k in (o.split("=", 1)[0].lstrip("+~") for o in overrides)}
        elif isinstance(cfg, dict):
            keys = set(config.flatten(cfg))
        for key in sorted(keys & set(flat)):
            OmegaConf.update(merged, key, flat[key])
        c = config.validate(OmegaConf.to_container(merged))
    config.check_installed(c)  # (resumed: with the checkpoint's logger and engine, where the user set none)
    if c.engine == "numba" and (why := engines.numba_error()):
        raise ConfigError(f"engine=numba: numba is installed but does not import ({why}); use engine=torch")
    data = make_dataset(c.data)
    c = dataclasses.replace(c, data=data.config)
    loop.check_memory(c, data)
    device = resolve_device(c.device if c.engine in ("auto", "torch") else "cpu")
    # an earlier run's training is never lost: a dir that holds one is refused, unless resume= names it
    here = checkpoint.in_dir(out)
    if here is not None and not (c.resume and checkpoint.find(c.resume).resolve() == here.resolve()):
        resume = shlex.quote(f"resume={console.hydra_value(out)}")
        again = f"{resume} goes on from it (a sweep: run it again with hydra/launcher=batched)"
        raise ConfigError(f"{out} holds an earlier run (its {here.name}): {again}, or choose another dir")
    if here is None and (theirs := rundir.theirs(out)):  # nor is what another program left there
        raise ConfigError(f"{out} holds {theirs[0]}, which the run would write over: choose another dir")
    if ck is not None:
        checkpoint.resume_check(ck, c, data)
    job = loop.Job(c, ck["state"], ck["epoch"], ck["history"]) if ck else loop.Job(c, loop.start_state(c, data))
    return Prepared(job, data, device, Path(out), list(overrides or []))


def train(cfg: Prepared | DictConfig | dict[str, Any] | TrainConfig,
          run_dir: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train a prepared run (or prepare ``cfg`` first), write its dir, and return the summary.

    Raises ConfigError or CheckpointError for bad input before anything is written, and
    :class:`quadnet.exits.Stopped` after the dir is written when a signal came as it was."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None  # (a job Hydra runs: its dirs)
    if not isinstance(cfg, Prepared):  # outside Hydra, the run dir is the one train.yaml names (outputs/<time>)
        run_dir = run_dir or (hc.runtime.output_dir if hc else config.compose([], with_hydra=True).hydra.run.dir)
    p = cfg if isinstance(cfg, Prepared) else prepare(cfg, Path(run_dir))  # type: ignore[arg-type]
    rundir.lock(p.out, "run")
    job, c, device, d = p.job, p.job.cfg, p.device, p.data
    sizes = f"{len(d.x_train)}/{len(d.x_val)}/{len(d.x_test)} train/val/test"
    what = f"{c.data.name} data ({d.x_train.shape[1]} features{', standardized' * (d.shift is not None)}, {sizes})"
    what += f", hidden_dim={c.hidden_dim}, {c.epochs} epochs, {engines.engine_name(c, device, d)} engine, {c.optimizer}"
    resumed = f"; resuming at epoch {job.epoch}" if job.epoch else ""
    log.info("quadnet: %s on %s (%s)%s", what, describe(device), c.dtype, resumed)

    def save(jobs: list[loop.Job]) -> None:
        try:  # training goes on without it: the run dir is written at the end
            checkpoint.save(p.out / checkpoint.CHECKPOINT, checkpoint.of(jobs[0], "running", p.data))
        except OSError as e:
            log.warning("no checkpoint written at epoch %d: %s", jobs[0].epoch, one_line(e))

    in_sweep = Path(hc.runtime.cwd, hc.sweep.dir) if hc and hc.mode == RunMode.MULTIRUN else None
    with exits.listening() as stop:  # up until the run dir is complete
        p.out.mkdir(parents=True, exist_ok=True)
        if c.logger == "mlflow":  # (live: its params now, its metrics as it trains)
            tracking.start(config.to_dict(c), p.out, in_sweep, job.history)
            job.on_log = tracking.point
        try:
            label, engine, _, seconds = loop.train_batch([job], p.data, device, stop, save)
            ran = {"train_seconds": seconds, "device": label, "engine": engine, "overrides": p.overrides}
            summary = rundir.write(p.out, job, p.data, ran, stop.signal, sweep=in_sweep)
        finally:
            tracking.abort()  # (a run whose training or dir raised: its MLflow run ends as FAILED, not RUNNING)
    if stop.signal is not None and job.status != "interrupted":  # it came as the dir was written
        raise exits.Stopped(stop.signal, f"{exits.KEPT}: {summary['run_dir']} was written")
    return summary


def run(*overrides: str, run_dir: str | Path | None = None, **keys: Any) -> dict[str, Any]:
    """Train from Python with the command line's keys; returns the summary (its ``run_dir`` says where).

    ``quadnet.run("data=sampled", hidden_dim=10, epochs=500)``; dotted keys as ``**{"data.n_train": 64}``;
    ``hydra.run.dir=…`` or ``run_dir=`` picks the dir. Each call composes afresh, so it can be called
    again in the same process (a notebook). The run dir holds the run's files, without Hydra's
    ``.hydra/`` record and log, which only the command line writes."""
    values = {k: "null" if v is None else str(v).lower() if isinstance(v, bool) else v for k, v in keys.items()}
    lines = [*overrides, *(f"{k}={v}" for k, v in values.items())]
    try:
        cfg = config.compose(lines, with_hydra=True)
    except (*HYDRA_ERRORS, ValueError) as e:  # in the command line's words
        raise ConfigError(one_line(e)) from None
    if not str(out := run_dir if run_dir is not None else cfg.hydra.run.dir).strip():  # (not the dir Python runs in)
        raise ConfigError("the run dir is empty: name one, e.g. run_dir='runs/a'")
    summary = train(prepare(cfg, Path(out), lines))
    console.headline(summary)
    return summary


# ---------------------------------------------------------------------- under Hydra

_prepared: Prepared | None = None  # the single run Callbacks.on_run_start prepared
_sweep: Path | None = None  # the sweep this process runs (its closing line, its resume command)
_multirun: Any = None  # and its config


class Callbacks(Callback):
    """Hydra calls these (train.yaml's hydra.callbacks) before it writes anything: a single run
    is prepared and its dir held, a sweep's dir held, or the command refused in one line (Hydra
    turns an exception here into a warning, so a refusal exits). When a sweep ends, once for all
    the launches of a sweeper, it prints the sweep's closing line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _prepared
        out = Path(config.hydra.runtime.cwd, config.hydra.run.dir)
        try:
            if rundir.held(out):  # (before it is asked whether the dir holds an earlier run)
                raise ConfigError(f"another run or sweep is writing into {out}; wait for it or choose another dir")
            if not str(config.hydra.run.dir).strip():  # (the dir the command runs in, among the user's files)
                raise ConfigError("hydra.run.dir= is empty: name a dir for the run, e.g. hydra.run.dir=runs/a")
            _prepared = prepare(config, out, list(config.hydra.overrides.task))
            rundir.lock(out, "run", outer=True, shown=str(config.hydra.run.dir))
        except (ValueError, OSError, *HYDRA_ERRORS) as e:
            exits.fail(one_line(e))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep, _multirun
        _sweep, _multirun = Path(config.hydra.runtime.cwd, config.hydra.sweep.dir), config
        try:  # (the batched launcher's options and resume= are checked in its setup, before any write)
            rundir.lock(_sweep, "sweep", outer=True, shown=str(config.hydra.sweep.dir))
        except (ValueError, OSError, *HYDRA_ERRORS) as e:
            exits.fail(one_line(e))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if ends := sweep_ends(config):  # none: the sweep ended before any job was written
            console.closing_line(ends, Path(config.hydra.runtime.cwd, config.hydra.sweep.dir))
        if ends and not ends["completed"] and ends["diverged"]:
            exits.fail("no job of the sweep completed: every job that trained diverged; try a smaller lr", 3)


def sweep_ends(config: DictConfig) -> Counter[str]:
    """How a sweep's jobs ended: the batched launcher's count, else its jobs' summaries."""
    if str(OmegaConf.select(config, "hydra.launcher._target_")).startswith("hydra_plugins.quadnet_batched"):
        return sweep.ENDED
    where = Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)
    return Counter(console.status_of(p) for p in where.glob("*/summary.json"))


def task(cfg: DictConfig) -> float:
    """One job, as Hydra runs it: the run prepared before Hydra wrote anything, or (a job of a
    sweep under another launcher) prepared now; a refused sweep job keeps its dir, with the
    reason in its summary.json. A single run's errors end it here, in one line (Hydra would add
    its own line); a sweep job's go to Hydra, which fails that job."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.RUN:
        with exits.command(exits.KEPT, one_line, HYDRA_ERRORS):
            return console.conclude(train(_prepared or prepare(cfg, Path(hc.runtime.output_dir), [])))
    out, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    try:
        p = prepare(cfg, out, overrides)
    except (ConfigError, checkpoint.CheckpointError) as e:
        if checkpoint.in_dir(out) is None:  # an earlier run's dir stays as it was (and another program's: write_failed)
            rundir.write_failed(out, e, overrides=overrides)
        raise
    # one line a job on the console: how it ended, and warnings (the command that goes on after an interruption);
    # its header, progress lines, run dir and divergence advice go to its train.log only (Hydra configures each
    # job's logging afresh: this lasts the job)
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler:  # (not train.log's FileHandler)
            h.addFilter(lambda record: record.funcName == "headline" or record.levelno == logging.WARNING)
            h.setFormatter(_FirstLine())
    try:  # (train holds the dir)
        return console.conclude(train(p), single_run=False, sweep=_sweep)
    finally:
        rundir.unlock(out)


class _FirstLine(logging.Formatter):
    """A sweep job's console: the first line of console.headline's record (how the job ended) and warnings."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).split("\n")[0] if record.funcName == "headline" else super().format(record)


def main() -> None:
    """``python -m quadnet.train``: Hydra's command line around :func:`task`."""
    with exits.command(exits.KEPT, one_line, HYDRA_ERRORS):
        if any(a in ("-h", "--help") for a in sys.argv[1:]):
            print(config.help_text())
            return
        if not sys.stderr.isatty():  # no colour codes in logs and pipes (Optuna's colorlog honours this)
            os.environ.setdefault("NO_COLOR", "1")
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors raised, to be put in one line
        _check_flags(sys.argv[1:], bool(config.version_base()))
        config.register_configs()
        logging.raiseExceptions = False  # a reader that stops reading (| head) does not stop the run
        # Hydra 1.4 asks which targets a config may instantiate: quadnet's own (its callbacks)
        trusted = config.version_base() or {"execution_whitelist": ("quadnet.*",)}
        try:
            hydra.main(config_path=config.config_dir(), config_name="train", **trusted)(task)()
        except (exits.Stopped, Exception) as e:
            # Hydra raises a failed job's error once every job has run: the closing line first
            if not isinstance(e, exits.Stopped) and _sweep is not None and (ends := sweep_ends(_multirun)):
                console.closing_line(ends, _sweep)
            elif not isinstance(e, exits.Stopped):  # a sweep refused before any job ended: its record as it was
                sweep.put_back()
            # a run stopped before it trained, or jobs Hydra refused or could not write: the dir it made goes
            for made in filter(None, (_prepared and _prepared.out, _sweep)):
                rundir.discard(made)
            if isinstance(e, exits.Stopped) and _sweep is not None:  # a sweep's jobs stopped: the command that goes on
                again = f"go on with the sweep: {console.resume_sweep(_sweep)}"
                raise exits.Stopped(e.signum, f"{e.message or exits.KEPT}; {again}") from None
            if isinstance(e, OSError) and e.errno is not None and not isinstance(e, BrokenPipeError):  # Hydra's writes
                where = e.filename or (f"the run dir {_prepared.out} (hydra.run.dir)" if _prepared else "the sweep dir")
                raise exits.unwritable(e, where) from None
            raise


def _check_flags(argv: list[str], hydra_13: bool) -> None:
    """Hydra's own flags parsed as Hydra parses them, with one-line errors instead of its usage block."""

    def bad(message: str) -> None:  # ("=": overrides after a flag)
        hint = " (Hydra 1.3 takes its flags, such as -m, before the overrides)" if hydra_13 and "=" in message else ""
        exits.fail(f"{message}{hint}; see --help for quadnet's keys and --hydra-help for Hydra's options")

    parser = get_args_parser()
    parser.error = bad  # type: ignore[method-assign]
    with exits.deferred():
        (parser.parse_args if hydra_13 else parser.parse_intermixed_args)(argv)


if __name__ == "__main__":
    # The imported module's main, not this __main__ copy's: Hydra's callbacks and the batched
    # launcher know quadnet by quadnet.train (its task function, its prepared run).
    from quadnet import train as _module

    _module.main()
