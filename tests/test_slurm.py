"""Sweeps on a real SLURM cluster, through the CLI: the batched launcher's slurm executor and
the ``hydra/launcher=slurm`` preset. Each job's probabilities must equal a local sequential
run of the same overrides.

Skipped without ``sbatch`` on PATH or without a cluster that answers ``sinfo`` with a live
node (with QUADNET_REQUIRE_SLURM=1, as in CI, they fail instead); ``scripts/slurm-up.sh``
starts a one-node cluster on this machine (as root), then ``python -m pytest -m slurm``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import probs_of, run_cli

pytestmark = pytest.mark.slurm

SWEEP = ["seed=0,1", "hidden_dim=3,5", "epochs=200", "plots=false"]
N_JOBS = 4
LIVE_STATES = {"idle", "mixed", "allocated", "completing"}  # a trailing '*' would mean "not responding"
SLURM_TIMEOUT = 150  # seconds for one sweep on the cluster, start-up included


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster answers with a live node."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (scripts/slurm-up.sh starts a one-node cluster)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo did not answer: {e}"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return f"no SLURM cluster answers sinfo: {lines[-1] if lines else f'exit {r.returncode}'}"
    states = r.stdout.split()
    if not LIVE_STATES & set(states):
        return f"no SLURM node is up (sinfo: {', '.join(states) or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = cluster_problem()
    if problem and os.environ.get("QUADNET_REQUIRE_SLURM"):  # CI, right after scripts/slurm-up.sh
        pytest.fail(f"QUADNET_REQUIRE_SLURM is set, but {problem}")
    if problem:
        pytest.skip(problem)
    pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def local_probs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], np.ndarray]:
    """The same sweep with Hydra's basic launcher, in this machine's process: (seed, hidden_dim) -> probs."""
    tmp = tmp_path_factory.mktemp("local")
    return _probs_by_job(_sweep(tmp, "local", *SWEEP))


def _sweep(cwd: Path, name: str, *overrides: str, timeout: float = 300) -> Path:
    sweep_dir = cwd / name
    r = run_cli("-m", *overrides, f"hydra.sweep.dir={sweep_dir}", cwd=cwd, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = r.stdout + r.stderr
    # submitit polls sacct for job states; on a cluster without accounting each poll warns. A user's
    # SLURM may run without it: only the project's own cluster (scripts/slurm-up.sh, CI) must have it.
    if os.environ.get("QUADNET_REQUIRE_SLURM"):
        assert "Bypassing sacct error" not in log, log[-3000:]
    return sweep_dir


def _summaries(sweep_dir: Path) -> list[dict[str, Any]]:
    found = sorted(sweep_dir.glob("*/summary.json"), key=lambda p: int(p.parent.name))
    assert [int(p.parent.name) for p in found] == list(range(N_JOBS)), found
    return [json.loads(p.read_text()) for p in found]


def _probs_by_job(sweep_dir: Path) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for s in _summaries(sweep_dir):
        assert s["status"] == "completed", s["status"]
        out[(s["config"]["seed"], s["config"]["hidden_dim"])] = probs_of(s)
    assert len(out) == N_JOBS
    return out


def _assert_equal_to_local(sweep_dir: Path, local: dict[tuple[int, int], np.ndarray]) -> None:
    remote = _probs_by_job(sweep_dir)
    assert remote.keys() == local.keys()
    for key, probs in remote.items():
        np.testing.assert_allclose(probs, local[key], rtol=0, atol=1e-9, err_msg=f"seed, hidden_dim = {key}")


def _sacct_states(job_ids: set[str], wait_s: float = 30) -> dict[str, str]:
    """SLURM's own record of these jobs (array tasks as 12_0, 12_1, …): job id -> state.

    slurmctld sends its records to slurmdbd asynchronously, so a job that has just ended may
    still show as RUNNING, or an array as one line: ask again until every job has a final state.
    """
    base = sorted({j.split("_")[0] for j in job_ids})
    deadline = time.monotonic() + wait_s
    while True:
        r = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State", *[a for b in base for a in ("-j", b)]],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        states = dict(line.split("|", 1) for line in r.stdout.splitlines() if line.strip())
        if all(states.get(j, "PENDING") not in ("PENDING", "RUNNING", "COMPLETING") for j in job_ids):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_batched_sweep_on_slurm_equals_local_runs(slurm: None, local_probs: dict, tmp_path: Path) -> None:
    sweep_dir = _sweep(
        tmp_path,
        "slurm",
        "hydra/launcher=batched",
        "hydra.launcher.executor=slurm",
        "hydra.launcher.max_batch=2",  # two batched programs: one SLURM job array of two tasks
        "+hydra.launcher.executor_params={timeout_min: 5, cpus_per_task: 1, mem_gb: 1}",
        *SWEEP,
        timeout=SLURM_TIMEOUT,
    )
    _assert_equal_to_local(sweep_dir, local_probs)
    jobs = {s["batch"]["submitit_job"] for s in _summaries(sweep_dir)}
    assert len(jobs) == 2 and all(re.fullmatch(r"\d+_\d+", j) for j in jobs), jobs  # array tasks
    states = _sacct_states(jobs)
    assert all(states.get(j) == "COMPLETED" for j in jobs), states
    assert (sweep_dir / ".submitit").is_dir()


def test_slurm_preset_sweep_equals_local_runs(slurm: None, local_probs: dict, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = _sweep(
        tmp_path,
        "slurm",
        "hydra/launcher=slurm",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",  # the preset's 2 would run one job at a time on 2 cores
        "hydra.launcher.mem_gb=1",
        *SWEEP,
        timeout=SLURM_TIMEOUT,
    )
    _assert_equal_to_local(sweep_dir, local_probs)
    jobs = {p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}
    assert len(jobs) == N_JOBS, jobs  # one SLURM array task per job
    states = _sacct_states(jobs)
    assert all(states.get(j) == "COMPLETED" for j in jobs), states
