"""A Hydra launcher that trains quadnet's jobs of a sweep as a few batched programs.

Discovery imports this module, so it imports nothing heavy: torch and quadnet's training
code load only when a sweep is launched (:func:`quadnet.sweep.launch` does the work).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class BatchedLauncher(Launcher):
    def __init__(self, **options: Any) -> None:
        self.options = options  # BatchedLauncherConf's fields (the rest is set by setup, which Hydra calls first)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from quadnet import compose, rundir, sweep

        # before the sweeper writes into the sweep dir (quadnet's callback has taken the dir
        # already; another task's sweep has not): a bad option, resume= in quadnet's sweep, or a
        # dir another sweep holds, is refused in one line; what the sweeper will overwrite is
        # kept, for a sweep refused after the sweeper wrote it (quadnet.sweep.put_back)
        sweep.check_options(self.options)
        if not self.options["job_dirs"]:
            sweep.check_table_only(task_function, config, hydra_context.callbacks.callbacks)
        if sweep.batchable(task_function):
            sweep.refuse_resume(config.resume)
        record = Path(str(config.hydra.sweep.dir), "multirun.yaml")
        rundir.lock(record.parent)
        info = record.stat() if record.is_file() else None
        # multirun.yaml as it was (its bytes and times; None: not there): what a refused sweep puts back
        sweep.RECORD[:] = [(record, info and (record.read_bytes(), (info.st_atime_ns, info.st_mtime_ns)))]

        # The sweeper shares this context: its check of each of quadnet's jobs gets the Composer too.
        if sweep.batchable(task_function) and not isinstance(hydra_context.config_loader, compose.SweepLoader):
            hydra_context.config_loader = compose.SweepLoader(hydra_context.config_loader)  # type: ignore[assignment]
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from quadnet.sweep import launch

        return launch(self, [list(o) for o in job_overrides], initial_job_idx)
