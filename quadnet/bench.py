"""``python -m quadnet.bench {step,sweep,sklearn} [--json]``: speed, measured side by side.

step     one batch of J default jobs, one thread, in ms per job per 10,000 steps: the numba engine,
         the torch fused step and autograd (one backward of the summed losses, torch.optim.SGD), the
         NumPy engine (one job), the torch engine on CUDA where there is one; and each against the
         arithmetic limit, the FLOPs of a step at this machine's float64 GEMM rate (2048² matmul,
         one thread), measured in the same run.
sweep    the same sweep under Hydra's basic launcher and the batched launcher, end to end, with
         the peak memory (resident set) of each; ``--busy N`` runs N CPU-bound processes
         beside both, as on a shared machine; ``--mlflow`` runs the batched sweep again with
         logger=mlflow (a SQLite store) and prints what the logging costs; ``--table-only``: the batched
         sweep writes its results table alone (hydra.launcher.job_dirs=false); ``--seconds N`` stops the
         batched sweep after N s and prints the jobs it completed, their rate once launched and the
         time all would take: the sweep's start-up, then every job at that rate (projected_s).
sklearn  a GridSearchCV-sized grid (hidden_dim × lr × ``--seeds``) on one of scikit-learn's tables, as one
         batched quadnet sweep (the command, as a user runs it) and as ``GridSearchCV`` over ``MLPClassifier``
         on the same standardized splits (fit on the training rows, selected on the validation rows by
         accuracy, scored on the test rows), one thread each: their times, the ratio and the best config's
         test accuracy. Needs scikit-learn (``pip install scikit-learn``), which quadnet does not.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from quadnet import table
from quadnet.artifacts import versions
from quadnet.config import DataConfig, TrainConfig, validate
from quadnet.data import make_dataset
from quadnet.device import resolve_device
from quadnet.engines import build, usable_cpus
from quadnet.exits import ArgumentParser, command, fail


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = found[1].strip() if (found := re.search(r"^model name\s*:(.*)$", info, re.M)) else platform.machine()
    return {"cpu": cpu, "cpus": usable_cpus(), **{k: versions()[k] for k in ("python", "torch", "numpy")}}


def bench_step(sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    import torch

    from quadnet.engines.torch import torch_threads
    from quadnet.loop import start_state

    data = make_dataset(TrainConfig().data)
    n, h, c = len(data.x_train), TrainConfig().hidden_dim, data.num_classes
    # the arithmetic limit: the FLOPs of a step of one job (the forward; the backward: dW2 and dA, dW1, through ReLU;
    # the update: L2 on the weights, the SGD step; the softmax's gradient) at this machine's float64 GEMM rate on one
    # thread (the best of four 2048² matmuls)
    flops = 2 * n * (2 * h + h * c) + 4 * n * h * c + 5 * n * h + 2 * (5 * h + 2 * h * c + c) + 6 * n * c
    a = torch.rand(2048, 2048, dtype=torch.float64)
    with torch_threads(1):
        rate = 2 * 2048**3 / min(timeit.repeat(lambda: torch.mm(a, a), number=1, repeat=4))
    limit = flops * 10000 / rate * 1000
    variants = {e: (e, "fused", "cpu") for e in ("numba", "torch", "numpy")}
    variants |= {"autograd": ("torch", "autograd", "cpu"), "cuda": ("torch", "fused", "cuda")}

    def ms_per_job(jobs: int, engine: str, step: str, device: str) -> float:
        cfgs = [TrainConfig(seed=s, engine=engine, step=step, threads=1, device=device) for s in range(jobs)]
        e = build(cfgs, data, [start_state(c) for c in cfgs], "cuda:0" if device == "cuda" else "cpu")
        steps = max(20, min(2000, 400_000 // jobs)) * (5 if engine == "numba" else 1)
        e.run(2, lambda: False)  # (buffers, caches, a CUDA graph)
        return timeit.timeit(lambda: e.run(steps, lambda: False), number=1) / steps * 10000 / jobs * 1000

    rows: list[dict[str, Any]] = [{"jobs": j, "limit_ms": limit} for j in sizes]
    for row, j in zip(rows, sizes, strict=True):
        for name, (engine, step, device) in variants.items():
            if {"numpy": j == 1, "numba": find_spec("numba"), "cuda": torch.cuda.is_available()}.get(name, True):
                ms = min(ms_per_job(j, engine, step, device) for _ in range(repeat))
                row |= {f"{name}_ms": ms, f"{name}_x_limit": ms / limit}
    return rows


_PHASES = re.compile(r"composed \d+ jobs in (\S+) s, trained in (\S+) s, wrote their results in (\S+) s; (\S+) s")


Timing = tuple[float, str, int, int]  # a sweep's seconds, output, peak memory and completed jobs


def _sweep(n: int, launcher: str, out: Path, extra: list[str], limit: float = 0, grid: int = 1, **env: str) -> Timing:
    """A sweep of n seeds times `grid` settings of the keys extra sweeps, into out, as a subprocess (env: variables
    added to its environment), stopped by SIGTERM after `limit` seconds if not 0: its seconds, its output, its peak
    memory (bytes: the largest resident set of the process and every process it waited for, as the kernel counts
    it) and its completed jobs (all of them unless stopped)."""
    overrides = [f"seed=range({n})", f"hydra/launcher={launcher}", *extra]
    cmd = [sys.executable, "-m", "quadnet.train", "-m", *overrides, f"hydra.sweep.dir={out}"]
    env, t0 = os.environ | env, time.perf_counter()
    with tempfile.NamedTemporaryFile("w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent, env=env)
        stopper = threading.Timer(limit or threading.TIMEOUT_MAX, p.terminate)  # (0: no limit)
        stopper.start()
        _, status, usage = os.wait4(p.pid, 0)
        stopper.cancel()
        seconds, p.returncode = time.perf_counter() - t0, os.waitstatus_to_exitcode(status)
        output = Path(log.name).read_text()  # (what the sweep wrote, through its own file descriptor)
    # (a batched sweep's table; the basic launcher's job dirs)
    t = table.rows(out)[0] if table.tables(out) else None
    statuses = (
        t["status"].to_pylist() if t else [json.loads(s.read_text())["status"] for s in out.glob("*/summary.json")]
    )
    done = statuses.count("completed")
    if not (limit and seconds >= limit) and (p.returncode != 0 or done != n * grid):
        fail(f"the {launcher} sweep completed {done} of {n * grid} jobs: {output.strip().splitlines()[-1:]}", 1)
    return seconds, output, usage.ru_maxrss * 1024, done


def bench_sweep(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The basic launcher timed on 1 and `sample` jobs (its cost per job extrapolated); the batched on all,
    or on as many as it completes in `seconds` if not 0 (its time for all projected from their rate).
    `busy` CPU-bound processes run beside them, as other users' work on a shared machine."""
    sample, extra = max(2, min(a.sample, a.jobs)), [f"device={a.device}", f"epochs={a.epochs}"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as busy:
        for _ in range(a.busy):  # killed, then waited for (Popen's exit), when the block ends
            proc = busy.enter_context(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
            busy.callback(proc.kill)
        d = Path(tmp)
        _sweep(1, "batched", d / "warm", extra)  # (caches warm: numba's kernels, the OS's files)
        t1 = _sweep(1, "basic", d / "basic1", extra)[0]
        tk, _, basic_peak, _ = _sweep(sample, "basic", d / "basick", extra)
        alone = ["hydra.launcher.job_dirs=false"] * a.table_only
        tb, output, peak, done = _sweep(a.jobs, "batched", d / "batched", [*extra, "plots=false", *alone], a.seconds)
        if a.mlflow:
            store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}  # (its tables made first, not timed)
            _sweep(1, "batched", d / "store", ["epochs=1", "logger=mlflow"], **store)
            tm = _sweep(a.jobs, "batched", d / "logged", [*extra, "plots=false", "logger=mlflow", *alone], **store)[0]
    # (noise larger than a job: no figure rather than a negative one)
    basic, found = max((tk - t1) / (sample - 1), 0.0) or math.nan, _PHASES.findall(output)
    if not found and done == a.jobs:
        fail("the batched launcher's timing line was not in its output (quadnet.sweep.TIMING_LINE)", 1)
    # (no timing line from a sweep stopped before it launched)
    compose, train, write, launch = map(float, found[-1]) if found else (math.nan, math.nan, math.nan, 0.0)
    startup, until = tb - launch, min(tb, a.seconds or tb)  # (its start-up; its end, or when it was stopped)
    rate = done / (until - startup) if done else 0.0  # (jobs a second once launched)
    row = dict(jobs=a.jobs, done=done, epochs=a.epochs, busy=a.busy, basic_per_job_s=basic, batched_s=tb)
    row |= dict(startup_s=startup, compose_s=compose, train_s=train, write_s=write, jobs_per_s=rate)
    row |= dict(projected_s=startup + a.jobs / rate if rate else math.inf, peak_mb=peak / 2**20)
    row |= dict(basic_peak_mb=basic_peak / 2**20, batched_faster_per_job=basic * done / until)
    return [row | ({"mlflow_s": tm, "mlflow_cost": tm / tb} if a.mlflow else {})]


GRID = {"hidden_dim": (10, 50, 100), "lr": (0.001, 0.01)}  # bench sklearn's, with --seeds seeds


def bench_sklearn(a: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        from sklearn import datasets, model_selection, neural_network
        from threadpoolctl import threadpool_limits
    except ImportError:
        fail("bench sklearn needs scikit-learn, which quadnet does not install: pip install scikit-learn")
    x, y = getattr(datasets, f"load_{a.table}")(return_X_y=True)
    with tempfile.TemporaryDirectory() as tmp:
        table, sweep_dir, columns = Path(tmp, "table.csv"), Path(tmp, "sweep"), [f"x{i}" for i in range(x.shape[1])]
        np.savetxt(table, np.column_stack([x, y]), "%.17g", ",", header=",".join([*columns, "label"]), comments="")
        extra = [f"{k}={','.join(map(str, v))}" for k, v in GRID.items()] + ["data=csv", f"data.path={table}"]
        extra += ["optimizer=adam", f"epochs={a.epochs}", "threads=1", "plots=false"]
        tq, output, _, n = _sweep(a.seeds, "batched", sweep_dir, extra, grid=6)
        jobs = [json.loads(s.read_text()) for s in sweep_dir.glob("*/summary.json")]
        d = make_dataset(DataConfig(name="csv", path=str(table)))  # (the splits the sweep's jobs had)
    best = max(jobs, key=lambda s: (s["val_accuracy"], -s["val_loss"]))  # (as GridSearchCV ranks; ties: by loss)
    mlp = neural_network.MLPClassifier(max_iter=a.epochs)
    values = {"hidden_layer_sizes": [(h,) for h in GRID["hidden_dim"]], "learning_rate_init": GRID["lr"]}
    cv = model_selection.PredefinedSplit([-1] * len(d.x_train) + [0] * len(d.x_val))  # (-1: fit on; 0: selected on)
    search = model_selection.GridSearchCV(mlp, values | {"random_state": range(a.seeds)}, cv=cv, refit=False)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (MLPClassifier's ConvergenceWarning: max_iter is what was asked for)
        ts = timeit.timeit(lambda: search.fit(np.r_[d.x_train, d.x_val], np.r_[d.y_train, d.y_val]), number=1)
        refit = mlp.set_params(**search.best_params_).fit(d.x_train, d.y_train)  # (on the training rows alone)
    p, found = search.best_params_, _PHASES.findall(output)
    ours = " ".join(f"{k}={best['config'][k]}" for k in ["seed", *GRID])
    theirs = f"seed={p['random_state']} hidden_dim={p['hidden_layer_sizes'][0]} lr={p['learning_rate_init']}"
    keys = ["search", "configs", "seconds", "train_s", "best", "epochs", "val_acc", "test_acc"]
    train, accuracy = float(found[-1][1]) if found else math.nan, refit.score(d.x_test, d.y_test)
    rows = [["quadnet batched sweep", n, tq, train, ours, a.epochs, best["val_accuracy"], best["test_accuracy"]]]
    # (sklearn's epochs: it stops when its loss stalls)
    rows += [["sklearn GridSearchCV", n, ts, ts, theirs, refit.n_iter_, search.best_score_, accuracy]]
    return [dict(zip(keys, r, strict=True)) | {"time_vs_quadnet": r[2] / tq} for r in rows]  # (its seconds / ours)


@command()
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m quadnet.bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="what", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    step = sub.add_parser("step", help="the engines against the arithmetic limit, by batch size", parents=[common])
    step.add_argument("--repeat", type=int, default=3, help="runs of each variant; the best counts (default 3)")
    step.add_argument("--jobs", default="1,64,256,1024", help="batch sizes, comma-separated (default 1,64,256,1024)")
    sweep = sub.add_parser("sweep", help="basic launcher against batched", parents=[common])
    sweep.add_argument("--jobs", type=int, default=256, help="jobs in the sweep (default 256)")
    sweep.add_argument("--epochs", type=int, default=10000, help="epochs= of every job (default 10000)")
    sweep.add_argument("--sample", type=int, default=4, help="basic-launcher jobs run, the rest estimated (default 4)")
    sweep.add_argument("--device", default="auto", help="device= of every job (default auto)")
    sweep.add_argument("--busy", type=int, default=0, help="CPU-bound processes to run beside it")
    sweep.add_argument("--mlflow", action="store_true", help="also the batched sweep with logger=mlflow")
    sweep.add_argument("--table-only", action="store_true", help="the batched sweep without job dirs (its table)")
    sweep.add_argument("--seconds", type=int, default=0, help="stop the batched sweep after this: its rate, projected")
    sk = sub.add_parser("sklearn", help="a batched sweep against scikit-learn's GridSearchCV", parents=[common])
    sk.add_argument("--table", default="breast_cancer", choices=["iris", "wine", "breast_cancer", "digits"])
    sk.add_argument("--seeds", type=int, default=4, help="seeds of each hidden_dim and lr (default 4: 24 configs)")
    sk.add_argument("--epochs", type=int, default=2000, help="epochs= and max_iter= of every config (default 2000)")
    # (what the other subcommands do not take)
    parser.set_defaults(repeat=1, epochs=1, sample=1, busy=0, seconds=0, jobs="1", seeds=1, table="")
    args = parser.parse_args(argv)
    sizes = [int(j) if j.strip().isdigit() else 0 for j in str(args.jobs).split(",")]  # sweep: one
    if min(*sizes, args.repeat, args.epochs, args.sample, args.seeds) < 1 or min(args.busy, args.seconds) < 0:
        parser.error("--repeat, --epochs, --jobs, --sample, --seeds must be whole numbers >= 1; --busy, --seconds >= 0")
    if args.what == "step" and max(sizes) > 16384:  # (sweep.CUDA_CHUNK: the most jobs a sweep composes at once)
        parser.error(f"--jobs {max(sizes)} is not allowed: bench step takes batches of up to 16384 jobs")
    if args.what == "sweep":  # (its jobs' values, checked before any job runs: a ConfigError in one line)
        validate({"epochs": args.epochs, "device": args.device})
        resolve_device(args.device)  # (one that is not here: cuda without a GPU)
    bench = {"step": lambda a: bench_step(sizes, a.repeat), "sweep": bench_sweep, "sklearn": bench_sklearn}
    rows = bench[args.what](args)
    if args.json:
        print(json.dumps({"benchmark": args.what, "machine": machine(), "rows": rows}, indent=2))
        return
    units = {"step": "ms per job per 10,000 steps; _x_limit: times the arithmetic limit", "sweep": "s, jobs/s, MB"}
    units["sklearn"] = f"s (quadnet: its command, train_s its training; one thread each), {args.table}'s test accuracy"
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), f"units: {units[args.what]}", sep="\n")
    # the rows as an aligned table, a column a key ("-" where a row has none), numbers right-aligned
    keys = list(dict.fromkeys(k for r in rows for k in r))
    text = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.get(k, "-") for k in keys)] for r in rows]
    widths = [max(map(len, column)) for column in zip(keys, *text, strict=True)]
    print(*("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [keys, *text]), sep="\n")


if __name__ == "__main__":
    main()
