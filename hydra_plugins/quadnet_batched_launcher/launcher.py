"""A Hydra launcher that trains every batchable job of a sweep as one batched program.

Discovery imports this module, so it imports nothing heavy: torch and quadnet's training
code load only when a sweep is launched.
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
    def __init__(
        self,
        plots: bool = False,
        max_batch: int = 0,
        writers: int | None = None,
        executor: str | None = None,
        executor_params: Any = None,
    ) -> None:
        self.options: dict[str, Any] = {
            "plots": plots,
            "max_batch": max_batch,
            "writers": writers,
            "executor": executor,
            "executor_params": executor_params,
        }
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from quadnet.fastcompose import FastSweepLoader

        # The sweeper shares this context: its batch validation gets the fast loader too.
        if not isinstance(hydra_context.config_loader, FastSweepLoader):
            hydra_context.config_loader = FastSweepLoader(hydra_context.config_loader)  # type: ignore[assignment]
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from quadnet.sweep import launch_batched

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return launch_batched(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=self.config,
            job_overrides=job_overrides,
            initial_job_idx=initial_job_idx,
            **self.options,
        )
