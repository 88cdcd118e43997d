"""``python -m quadnet.bench sweep``: one sweep of N default jobs, basic launcher against batched.

Both run as the user would run them (``python -m quadnet.train -m 'seed=range(N)' …``), end to
end, every job dir written. The basic launcher is timed on 1 job and on ``sample`` jobs, and
its cost per job ((T_sample − T_1)/(sample − 1)) is extrapolated to N; the batched launcher
runs all N.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_PHASES = re.compile(r"composed (\d+) jobs in ([\d.]+) s, trained in ([\d.]+) s, wrote their dirs in ([\d.]+) s")


def _phases(output: str, total: float) -> dict[str, float]:
    """The batched launcher's own account of where its time went (it logs one line per launch)."""
    compose = train = write = 0.0
    found = list(_PHASES.finditer(output))
    if not found:
        raise SystemExit("error: the batched launcher's timing line was not in its output; update sweepbench._PHASES")
    for m in found:
        compose, train, write = compose + float(m[2]), train + float(m[3]), write + float(m[4])
    rest = total - compose - train - write
    return {"startup_and_sweeper_s": rest, "compose_s": compose, "train_s": train, "write_s": write}


def _sweep(n: int, launcher: str, sweep_dir: Path, device: str) -> tuple[float, str]:
    cmd = [
        sys.executable,
        "-m",
        "quadnet.train",
        "-m",
        f"seed=range({n})",
        f"device={device}",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=sweep_dir.parent)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: the {launcher} sweep failed: {r.stderr.strip().splitlines()[-1:]}")
    done = sum(1 for p in sweep_dir.glob("*/summary.json") if json.loads(p.read_text())["status"] == "completed")
    if done != n:
        raise SystemExit(f"error: the {launcher} sweep completed {done} of {n} jobs")
    return seconds, r.stdout + r.stderr


def bench_sweep(jobs: int, sample: int, device: str) -> dict[str, Any]:
    from quadnet.bench import machine

    sample = max(2, min(sample, jobs))
    with tempfile.TemporaryDirectory() as tmp:
        t1, _ = _sweep(1, "basic", Path(tmp) / "basic1", device)
        tk, _ = _sweep(sample, "basic", Path(tmp) / "basick", device)
        tb, output = _sweep(jobs, "batched", Path(tmp) / "batched", device)
    per_job_basic = (tk - t1) / (sample - 1)
    basic_total = t1 + (jobs - 1) * per_job_basic
    return {
        "benchmark": "sweep",
        "jobs": jobs,
        "basic_sample": sample,
        "device": device,
        "machine": machine(),
        "basic_seconds_1_job": t1,
        f"basic_seconds_{sample}_jobs": tk,
        "basic_per_job_s": per_job_basic,
        "basic_total_s_extrapolated": basic_total,
        "batched_total_s": tb,
        "batched_per_job_s": tb / jobs,
        "batched_phases": _phases(output, tb),
        "ratio_total": basic_total / tb,
        "ratio_per_job_marginal": per_job_basic / (tb / jobs),
    }


def print_sweep(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, cuda: {m['cuda'] or 'none'}")
    print(f"sweep of {r['jobs']} default jobs (seed=range({r['jobs']}), 10,000 epochs each), device={r['device']}")
    print(
        f"  basic launcher:   {r['basic_per_job_s']:.3f} s per job (timed on 1 and {r['basic_sample']} jobs), "
        f"{r['basic_total_s_extrapolated']:.1f} s for {r['jobs']} (extrapolated)"
    )
    print(
        f"  batched launcher: {r['batched_per_job_s']:.4f} s per job, {r['batched_total_s']:.1f} s for "
        f"{r['jobs']} (measured end to end, start-up and every job dir included)"
    )
    p = r["batched_phases"]
    print(
        f"    of which: start-up and the sweeper's checks {p['startup_and_sweeper_s']:.1f} s, composing "
        f"{p['compose_s']:.1f} s, training {p['train_s']:.1f} s, writing job dirs {p['write_s']:.1f} s"
    )
    print(
        f"  speed-up: {r['ratio_total']:.1f}× end to end; {r['ratio_per_job_marginal']:.1f}× per job "
        "(basic's marginal cost per job against batched's whole cost per job)"
    )
