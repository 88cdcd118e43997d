"""A Hydra launcher that trains quadnet's jobs of a sweep as a few batched programs.

Discovery imports this module, so it imports nothing heavy: torch and quadnet's training
code load only when a sweep is launched (:func:`quadnet.sweep.launch` does the work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.quadnet_batched_launcher.config import BatchedLauncherConf  # noqa: F401  (registers it)


class BatchedLauncher(Launcher):
    def __init__(self, **options: Any) -> None:
        self.options = options  # BatchedLauncherConf's fields
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from quadnet.fastcompose import FastSweepLoader

        # The sweeper shares this context: its check of each batch gets the fast loader too.
        if not isinstance(hydra_context.config_loader, FastSweepLoader):
            hydra_context.config_loader = FastSweepLoader(hydra_context.config_loader)  # type: ignore[assignment]
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from quadnet.sweep import launch

        return launch(self, [list(o) for o in job_overrides], initial_job_idx)
