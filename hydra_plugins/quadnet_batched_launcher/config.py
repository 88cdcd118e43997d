from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.quadnet_batched_launcher.launcher.BatchedLauncher"
    # Write loss.png and decision_regions.png for every job (slow for big sweeps).
    plots: bool = False
    # Most jobs trained in one batched program; 0 picks a size that fits the device's memory.
    max_batch: int = 0


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="quadnet")
