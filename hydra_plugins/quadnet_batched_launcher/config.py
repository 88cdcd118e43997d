from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.quadnet_batched_launcher.launcher.BatchedLauncher"
    # Write loss.png and decision_regions.png for every job (slow for big sweeps).
    plots: bool = False
    # Most jobs trained in one batched program, and composed at once; 0: 1,024 on the CPU, on CUDA
    # what fits half the free memory. The sweep goes through its jobs in chunks of this size.
    max_batch: int = 0
    # Write each job's dir (Hydra's layout; its checkpoint, metrics, summary), as well as the sweep's
    # results table (SWEEP/results/*.parquet). false: the table alone, for sweeps of a million jobs.
    job_dirs: bool = True
    # Train the batches through submitit instead of in this process: null, local, slurm or
    # debug (the [sweep] extra). Each batch of at most max_batch jobs becomes one submitit job
    # (a SLURM job array), and this process writes the job dirs from what they return.
    executor: str | None = None
    # submitit's AutoExecutor.update_parameters, e.g. {timeout_min: 60, slurm_partition: gpu, gpus_per_node: 1}
    executor_params: dict[str, Any] = field(default_factory=dict)
    # logger=mlflow: a nested MLflow run for each of the sweep's best jobs by objective, this many at
    # most (each costs ~15 ms in a SQLite store; 0: none); the sweep's run holds every job's results.
    mlflow_runs: int = 1000


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="quadnet")
