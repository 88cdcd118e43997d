"""``python -m quadnet.bench {single,startup,sweep} [--json]``: speed, measured side by side.

single   the default job (10,000 full-batch steps) through the real Trainer on every
         engine and dtype available here, interleaved and repeated; prints the best
         train_seconds of each and its ratio to the NumPy engine.
startup  ``python -m quadnet.train epochs=0`` against a bare ``import torch``, as subprocesses.
sweep    the same sweep under Hydra's basic launcher and under the batched launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quadnet.cli import closed_pipe_ok


def machine() -> dict[str, Any]:
    import numpy as np
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _variants() -> dict[str, list[str]]:
    import torch

    v = {
        "numpy engine (float64)": ["engine=numpy"],
        "torch fused, cpu float64": ["device=cpu"],
        "torch fused, cpu float32": ["device=cpu", "dtype=float32"],
        "torch fused, cpu float64, 2 threads": ["device=cpu", "threads=2"],
        "torch autograd, cpu float64": ["device=cpu", "step=autograd"],
    }
    if torch.cuda.is_available():
        v["torch fused, cuda float64, graph"] = ["device=cuda"]
        v["torch fused, cuda float32, graph"] = ["device=cuda", "dtype=float32"]
        v["torch fused, cuda float64, eager"] = ["device=cuda", "cuda_graph=false"]
    return v


def bench_single(epochs: int, repeat: int) -> dict[str, Any]:
    from quadnet.config import compose, validate
    from quadnet.train import train

    variants = _variants()
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):  # interleaved, so drift in machine load hits every variant alike
            for i, (name, ov) in enumerate(variants.items()):
                cfg = validate(compose([*ov, f"epochs={epochs}", "plots=false", "progress=false"]))
                s = train(cfg, run_dir=Path(tmp) / f"{r}-{i}")
                assert s["status"] == "completed"
                times[name].append(s["train_seconds"] * 10000 / max(epochs, 1))
    base = min(times["numpy engine (float64)"])
    rows = [
        {
            "variant": k,
            "best_s_per_10k": min(t),
            "median_s_per_10k": statistics.median(t),
            "ratio_to_numpy": min(t) / base,
        }
        for k, t in times.items()
    ]
    return {"benchmark": "single", "epochs": epochs, "repeat": repeat, "machine": machine(), "rows": rows}


def bench_startup(repeat: int) -> dict[str, Any]:
    def timed(cmd: list[str], cwd: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        return time.perf_counter() - t0

    torch_t, run_t = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            torch_t.append(timed([sys.executable, "-c", "import torch"], tmp))
            run_t.append(timed([sys.executable, "-m", "quadnet.train", "epochs=0"], tmp))
    return {
        "benchmark": "startup",
        "repeat": repeat,
        "machine": machine(),
        "import_torch_s": min(torch_t),
        "train_epochs0_s": min(run_t),
        "overhead_s": min(run_t) - min(torch_t),
    }


def _print(result: dict[str, Any]) -> None:
    m = result["machine"]
    if result["benchmark"] == "sweep":
        from quadnet.sweepbench import print_sweep

        print_sweep(result)
        return
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}, torch {m['torch']}, "
        f"numpy {m['numpy']}, cuda: {m['cuda'] or 'none'}"
    )
    if result["benchmark"] == "single":
        print(f"default job, {result['epochs']} epochs, best of {result['repeat']} (seconds per 10,000 steps)")
        print(f"{'variant':<40} {'best s':>8} {'median s':>9} {'× numpy':>8}")
        for r in result["rows"]:
            print(
                f"{r['variant']:<40} {r['best_s_per_10k']:>8.3f} {r['median_s_per_10k']:>9.3f} "
                f"{r['ratio_to_numpy']:>8.2f}"
            )
    else:
        print(
            f"import torch: {result['import_torch_s']:.2f} s   python -m quadnet.train epochs=0: "
            f"{result['train_epochs0_s']:.2f} s   overhead: {result['overhead_s']:.2f} s "
            f"(best of {result['repeat']})"
        )


@closed_pipe_ok()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quadnet.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("single", help="the default job on every engine")
    p.add_argument("--epochs", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=3)
    p = sub.add_parser("startup", help="start-up cost of python -m quadnet.train")
    p.add_argument("--repeat", type=int, default=3)
    p = sub.add_parser("sweep", help="basic launcher against batched launcher")
    p.add_argument("--jobs", type=int, default=256)
    p.add_argument("--sample", type=int, default=4, help="basic-launcher jobs actually run (the rest extrapolated)")
    p.add_argument("--device", default="auto")
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    for name in ("epochs", "repeat", "jobs", "sample"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.what == "single":
        result = bench_single(args.epochs, args.repeat)
    elif args.what == "startup":
        result = bench_startup(args.repeat)
    else:
        from quadnet.sweepbench import bench_sweep

        result = bench_sweep(args.jobs, args.sample, args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)


if __name__ == "__main__":
    main()
