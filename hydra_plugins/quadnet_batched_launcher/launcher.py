"""A Hydra launcher that trains quadnet's jobs of a sweep as a few batched programs.

Discovery imports this module, so it imports nothing heavy: torch and quadnet's training
code load only when a sweep is launched (:func:`quadnet.sweep.launch` does the work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.quadnet_batched_launcher.config import BatchedLauncherConf  # (importing it registers it)


class BatchedLauncher(Launcher):
    def __init__(self, **options: Any) -> None:
        self.options = options  # BatchedLauncherConf's fields
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        # multirun.yaml as it was (bytes, mtime), and the dirs made: what a refused sweep puts back
        self.record: tuple[Path, tuple[bytes, int] | None, list[Path]] | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from quadnet.compose import SweepLoader
        from quadnet.rundir import lock
        from quadnet.sweep import batchable

        # before the sweeper writes into the sweep dir: a bad option, or a dir another sweep holds,
        # is refused (in one line) without touching it; and what the sweeper will overwrite is kept,
        # for a sweep that the launcher refuses (quadnet.sweep._refused)
        check_options(self.options)
        folder = Path(str(config.hydra.sweep.dir))
        record = folder / "multirun.yaml"
        made = [p for p in (folder, *folder.absolute().parents) if not p.exists()]
        before = (record.read_bytes(), record.stat().st_mtime_ns) if record.is_file() else None
        self.record = (record, before, made)
        lock(folder)

        # The sweeper shares this context: its check of each of quadnet's jobs gets the Composer too.
        if batchable(task_function) and not isinstance(hydra_context.config_loader, SweepLoader):
            hydra_context.config_loader = SweepLoader(hydra_context.config_loader)  # type: ignore[assignment]
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from quadnet.sweep import launch

        return launch(self, [list(o) for o in job_overrides], initial_job_idx)


EXECUTORS = ("local", "slurm", "debug")  # submitit's clusters ("debug": in this process)


def check_options(opts: dict[str, Any]) -> None:
    import importlib.util

    from quadnet.config import ConfigError, unknown_key

    known = [f.name for f in fields(BatchedLauncherConf) if f.name != "_target_"]
    if unknown := sorted(set(opts) - set(known)):
        raise ConfigError(unknown_key(f"hydra.launcher.{unknown[0]}", known, "the batched launcher's keys"))
    rules = {  # key: (whether its value is allowed, what is)
        "max_batch": (opts["max_batch"] >= 0, "must be >= 0 (0: what fits)"),
        "executor": (opts["executor"] in (None, *EXECUTORS), f"choose one of {', '.join(EXECUTORS)}, or null"),
    }
    for key, (ok, allowed) in rules.items():
        if not ok:
            raise ConfigError(f"hydra.launcher.{key}={opts[key]!r} is not allowed: {allowed}")
    if opts["executor"] is not None and importlib.util.find_spec("submitit") is None:
        raise ConfigError(f"hydra.launcher.executor={opts['executor']} needs submitit: pip install -e '.[sweep]'")
