from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.quadnet_batched_launcher.launcher.BatchedLauncher"
    # Write loss.png and decision_regions.png for every job (slow for big sweeps).
    plots: bool = False
    # Most jobs trained in one batched program; 0 picks a size that fits the device's memory.
    max_batch: int = 0
    # Processes that write the job dirs once training is done (Linux; jobs without callbacks).
    # null: one per core for sweeps of 64 jobs or more; 0: write them in this process.
    writers: int | None = None


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="quadnet")
