"""``python -m quadnet.bench {single,step,startup,sweep} [--json]``: speed, measured side by side.

single   the default job (10,000 full-batch steps) on every engine and dtype available here,
         interleaved and repeated; the best train_seconds of each and its ratio to NumPy's.
step     one batch of J default jobs: the fused step against autograd over the same stacked
         (J, …) parameters (one backward of the summed losses, torch.optim.SGD), ms per job.
startup  ``python -m quadnet.train epochs=0`` against a bare ``import torch``, as subprocesses.
sweep    the same sweep under Hydra's basic launcher and the batched launcher, end to end;
         ``--busy N`` runs N CPU-bound processes beside both, as on a shared machine.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m quadnet.bench: a signal while it imports is one line too
    from quadnet.cli import STOPPED, on_signals

    on_signals(STOPPED)

import contextlib
import json
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quadnet.cli import STOPPED, ArgumentParser, command, fail

VARIANTS = {  # bench single: name and overrides
    "numpy engine (float64)": ["engine=numpy"],
    "torch fused, cpu float64 (the default)": ["device=cpu"],
    "torch fused, cpu float32": ["device=cpu", "dtype=float32"],
    "torch fused, cpu float64, 2 threads": ["device=cpu", "threads=2"],
    "torch autograd, cpu float64": ["device=cpu", "step=autograd"],
    "torch fused, cuda float64, graph": ["device=cuda"],
    "torch fused, cuda float32, graph": ["device=cuda", "dtype=float32"],
    "torch fused, cuda float64, eager": ["device=cuda", "cuda_graph=false"],
}


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(the seconds that fn(*args, **kwargs) took, what it returned)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def machine() -> dict[str, Any]:
    import numpy as np
    import torch

    from quadnet.loop import usable_cpus

    cpuinfo: list[str] = []
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.machine())
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__, cuda=cuda)
    return {"cpu": cpu, "cpus": usable_cpus(), **versions}


def bench_single(epochs: int, repeat: int) -> list[dict[str, Any]]:
    import torch

    from quadnet.config import compose
    from quadnet.train import train

    times: dict[str, list[float]] = {k: [] for k in VARIANTS if "cuda" not in k or torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):  # interleaved, so that drift in the machine's load hits every variant alike
            for i, name in enumerate(times):
                cfg = compose([*VARIANTS[name], f"epochs={epochs}", "plots=false", "progress=false"])
                s = train(cfg, run_dir=Path(tmp) / f"{r}-{i}")
                if s["signal"]:  # (the run's own handlers caught it: its time is not a figure)
                    fail(STOPPED, 128 + signal.Signals[s["signal"]])
                times[name].append(s["train_seconds"] * 10000 / max(epochs, 1))
    base = min(times["numpy engine (float64)"])
    return [{"variant": k, "best_s_per_10k": min(t), "ratio_to_numpy": min(t) / base} for k, t in times.items()]


def bench_step(sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    import torch

    from quadnet import engine, loop
    from quadnet.config import TrainConfig
    from quadnet.data import make_dataset
    from quadnet.train import start_state

    def ms_per_job(jobs: int, step: str, steps: int) -> float:
        cfgs = [TrainConfig(seed=s, step=step) for s in range(jobs)]
        e, _ = engine.build(cfgs, make_dataset(cfgs[0].data), [start_state(c) for c in cfgs], torch.device("cpu"))
        return _timed(e.run, steps, lambda: False)[0] / steps * 10000 / jobs * 1000

    rows = []
    with loop.threads(1):
        for j in sizes:
            steps = max(20, min(2000, 400_000 // j))
            f, a = (min(ms_per_job(j, step, steps) for _ in range(repeat)) for step in ("fused", "autograd"))
            row = dict(jobs=j, steps_timed=steps, fused_ms_per_job=f, autograd_ms_per_job=a)
            rows.append({**row, "autograd_over_fused": a / f})
    return rows


def bench_startup(repeat: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:

        def timed(*args: str) -> float:
            return _timed(subprocess.run, [sys.executable, *args], cwd=tmp, check=True, capture_output=True)[0]

        bare = min(timed("-c", "import torch") for _ in range(repeat))
        run = min(timed("-m", "quadnet.train", "epochs=0") for _ in range(repeat))
    return [{"import_torch_s": bare, "train_epochs0_s": run, "overhead_s": run - bare}]


_PHASES = re.compile(r"composed (\d+) jobs in ([\d.]+) s, trained in ([\d.]+) s, wrote their dirs in ([\d.]+) s")


def _sweep(n: int, launcher: str, sweep_dir: Path, device: str) -> tuple[float, str]:
    overrides = [f"seed=range({n})", f"device={device}", f"hydra/launcher={launcher}"]
    cmd = [sys.executable, "-m", "quadnet.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    seconds, r = _timed(subprocess.run, cmd, capture_output=True, text=True, cwd=sweep_dir.parent)
    done = sum(json.loads(p.read_text())["status"] == "completed" for p in sweep_dir.glob("*/summary.json"))
    if r.returncode != 0 or done != n:
        last = r.stderr.strip().splitlines()[-1:]
        raise SystemExit(f"error: the {launcher} sweep completed {done} of {n} jobs: {last}")
    return seconds, r.stdout + r.stderr


def bench_sweep(jobs: int, sample: int, device: str, n_busy: int) -> list[dict[str, Any]]:
    """The basic launcher timed on 1 and `sample` jobs (its cost per job extrapolated); the batched on all.
    n_busy CPU-bound processes run beside them, as other users' work on a shared machine."""
    sample = max(2, min(sample, jobs))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as busy:
        for _ in range(n_busy):  # killed, then waited for (Popen's exit), when the block ends
            proc = busy.enter_context(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
            busy.callback(proc.kill)
        t1, _ = _sweep(1, "basic", Path(tmp) / "basic1", device)
        tk, _ = _sweep(sample, "basic", Path(tmp) / "basick", device)
        tb, output = _sweep(jobs, "batched", Path(tmp) / "batched", device)
    found = _PHASES.findall(output)
    if not found:
        raise SystemExit("error: the batched launcher's timing line was not in its output (quadnet.sweep.TIMING_LINE)")
    compose, train, write = (sum(float(m[i]) for m in found) for i in (1, 2, 3))
    basic = (tk - t1) / (sample - 1)
    head = dict(jobs=jobs, busy=n_busy, device=device, basic_per_job_s=basic, batched_s=tb, batched_per_job_s=tb / jobs)
    phases = dict(startup_and_sweeper_s=tb - compose - train - write, compose_s=compose, train_s=train, write_s=write)
    return [{**head, **phases, "batched_faster_per_job": basic / (tb / jobs)}]


@command()
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m quadnet.bench", description=(__doc__ or "").split("\n\n")[0].replace("``", "")
    )
    sub = parser.add_subparsers(dest="what", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    repeated = ArgumentParser(add_help=False, parents=[common])
    repeated.add_argument("--repeat", type=int, default=3, help="runs of each variant; the best counts")
    single = sub.add_parser("single", help="the default job on every engine", parents=[repeated])
    single.add_argument("--epochs", type=int, default=10000)
    step = sub.add_parser("step", help="fused against autograd, by batch size", parents=[repeated])
    step.add_argument("--jobs", default="1,64,256,4096", help="batch sizes, comma-separated")
    sub.add_parser("startup", help="start-up cost", parents=[repeated])
    sweep = sub.add_parser("sweep", help="basic launcher against batched", parents=[common])
    sweep.add_argument("--jobs", type=int, default=256, help="jobs in the sweep (default 256)")
    sweep.add_argument("--sample", type=int, default=4, help="basic-launcher jobs run (the rest extrapolated)")
    sweep.add_argument("--device", default="auto", help="device= of every job (default auto)")
    sweep.add_argument("--busy", type=int, default=0, help="CPU-bound processes to run beside it")
    args = parser.parse_args(argv)
    given = vars(args)
    sizes = [int(j) if j.strip().isdigit() else 0 for j in str(given.get("jobs", 1)).split(",")]  # sweep: one
    if min(sizes + [given.get(k, 1) for k in ("repeat", "epochs", "sample")]) < 1 or given.get("busy", 0) < 0:
        parser.error("--repeat, --epochs, --jobs (each size) and --sample must be whole numbers >= 1, --busy >= 0")
    rows = {
        "single": lambda: bench_single(args.epochs, args.repeat),
        "step": lambda: bench_step(sizes, args.repeat),
        "startup": lambda: bench_startup(args.repeat),
        "sweep": lambda: bench_sweep(args.jobs, args.sample, args.device, args.busy),
    }[args.what]()
    if args.json:
        print(json.dumps({"benchmark": args.what, "machine": machine(), "rows": rows}, indent=2))
        return
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    # the rows as an aligned table, one column per key
    cells = [list(rows[0])] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    names = isinstance(next(iter(rows[0].values())), str)  # a first column of names reads left-aligned
    for line in cells:
        justified = [
            c.ljust(w) if names and not i else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(justified))


if __name__ == "__main__":
    main()
