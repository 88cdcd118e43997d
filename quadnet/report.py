"""``python -m quadnet.report [SWEEP_DIR] [--metric M]``: one table and a few plots for a sweep.

SWEEP_DIR defaults to the newest sweep under ``outputs/multirun``. Every job dir is read
(its ``.hydra/overrides.yaml`` and ``summary.json``); jobs that failed, diverged or never
finished are listed, never fatal. Writes ``report.csv`` and, for each swept parameter,
``report_<param>.png`` (the metric and the test accuracy against it: every job, the mean,
and the 16th–84th percentile band over the other parameters, seeds included), plus
``report_heatmap.png`` when two parameters besides the seed are swept.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from quadnet.cli import closed_pipe_ok

METRICS = {  # metric: whether lower is better
    "test_loss": True,
    "test_error": True,
    "final_loss": True,
    "test_accuracy": False,
    "train_accuracy": False,
}
COLUMNS = ["job", "overrides", "status", "final_loss", "test_loss", "train_accuracy", "test_accuracy", "train_seconds"]


class ReportError(ValueError):
    pass


def newest_sweep(root: Path) -> Path:
    base = root / "multirun"
    sweeps = [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
    if not sweeps:
        raise ReportError(
            f"no sweep under {str(base)!r}; run one with python -m quadnet.train -m …, or name a sweep dir"
        )
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_jobs(sweep: Path) -> list[dict[str, Any]]:
    """One row per job dir: its overrides, status and figures (None where there are none)."""
    rows = []
    for d in sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        ov_file = d / ".hydra" / "overrides.yaml"
        if not ov_file.is_file():
            continue
        try:
            overrides = yaml.safe_load(ov_file.read_text()) or []
        except yaml.YAMLError:
            overrides = []
        params = {}
        for o in overrides:
            if "=" in str(o) and not str(o).startswith("hydra"):
                k, v = str(o).split("=", 1)
                params[k.lstrip("+~")] = _parse_value(v)
        row: dict[str, Any] = {"job": d.name, "overrides": " ".join(map(str, overrides)), "params": params}
        summary_file = d / "summary.json"
        try:
            s = json.loads(summary_file.read_text())
            row["status"] = s.get("status", "unknown")
            for key in COLUMNS[3:]:
                row[key] = s.get(key)
        except FileNotFoundError:
            row["status"] = "failed or unfinished (no summary.json)"
        except (json.JSONDecodeError, OSError):
            row["status"] = "unreadable summary.json"
        rows.append(row)
    return rows


def metric_of(row: dict[str, Any], metric: str) -> float | None:
    from quadnet.artifacts import summary_metric

    return summary_metric(row, metric)


def sort_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    lower = METRICS[metric]

    def key(r: dict[str, Any]) -> tuple[int, float]:
        v = metric_of(r, metric)
        return (1, 0.0) if v is None else (0, v if lower else -v)

    return sorted(rows, key=key)


def write_csv(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    from quadnet.artifacts import write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*COLUMNS, metric])
    for r in rows:
        w.writerow([*(r.get(c) for c in COLUMNS), metric_of(r, metric)])
    write_text(path, buf.getvalue())


def swept_params(rows: list[dict[str, Any]]) -> list[str]:
    values: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        for k, v in r["params"].items():
            values[k].add(repr(v))
    return [k for k, vs in values.items() if len(vs) > 1]


def _axis(values: list[Any]) -> tuple[list[Any], bool]:
    """Sorted distinct values, and whether a log scale suits them."""
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    log = numeric and min(distinct) > 0 and max(distinct) / min(distinct) >= 100
    return distinct, log


def plot_param(path: Path, rows: list[dict[str, Any]], param: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in rows if r["status"] == "completed" and param in r["params"]]
    xs, log = _axis([r["params"][param] for r in done])
    numeric = all(isinstance(v, int | float) for v in xs)
    pos = xs if numeric else list(range(len(xs)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    first = "test_loss" if metric == "test_accuracy" else metric
    for ax, name in zip(axes, (first, "test_accuracy"), strict=True):
        means, lows, highs, every = [], [], [], []
        for x, p in zip(xs, pos, strict=True):
            vals = [v for r in done if r["params"][param] == x and (v := metric_of(r, name)) is not None]
            ax.scatter([p] * len(vals), vals, s=10, alpha=0.3, color="tab:blue")
            means.append(statistics.fmean(vals) if vals else math.nan)
            # the spread as the 16th–84th percentiles (± 1 sd for a normal spread), never below 0
            low, high = np.percentile(vals, [16, 84]) if vals else (math.nan, math.nan)
            lows.append(low)
            highs.append(high)
            every += vals
        ax.plot(pos, means, marker="o", color="tab:red", label="mean")
        ax.fill_between(pos, lows, highs, color="tab:red", alpha=0.15, label="16th–84th percentile")
        # losses span orders of magnitude: a log axis keeps the small ones apart
        if name != "test_accuracy" and every and min(every) > 0 and max(every) / min(every) >= 100:
            ax.set_yscale("log")
        if name == "test_accuracy":
            allright = [
                statistics.fmean(
                    [1.0 if metric_of(r, name) == 1.0 else 0.0 for r in done if r["params"][param] == x] or [math.nan]
                )
                for x in xs
            ]
            ax.plot(pos, allright, marker="s", color="tab:green", label="fraction with all test points right")
        ax.set(xlabel=param, ylabel=name, xscale="log" if log else "linear")
        if not numeric:
            ax.set_xticks(pos, [str(x) for x in xs])
        ax.legend(fontsize="small")
    fig.suptitle(f"{first} and test accuracy against {param} ({len(done)} completed jobs)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmap(path: Path, rows: list[dict[str, Any]], a: str, b: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    done = [r for r in rows if r["status"] == "completed" and a in r["params"] and b in r["params"]]
    xa, _ = _axis([r["params"][a] for r in done])
    xb, _ = _axis([r["params"][b] for r in done])
    grid = np.full((len(xb), len(xa)), np.nan)
    for i, vb in enumerate(xb):
        for j, va in enumerate(xa):
            vals = [
                v
                for r in done
                if r["params"][a] == va and r["params"][b] == vb and (v := metric_of(r, metric)) is not None
            ]
            if vals:
                grid[i, j] = statistics.fmean(vals)
    fig, ax = plt.subplots(figsize=(1.2 * len(xa) + 3, 0.8 * len(xb) + 2.5), constrained_layout=True)
    finite = grid[np.isfinite(grid)]
    # losses span orders of magnitude: a log colour scale keeps the small ones apart
    log_scale = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() >= 100
    norm = LogNorm() if log_scale else None
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(xa)), [str(v) for v in xa])
    ax.set_yticks(range(len(xb)), [str(v) for v in xb])
    ax.set(xlabel=a, ylabel=b, title=f"mean {metric} over the other parameters")
    for i in range(len(xb)):
        for j in range(len(xa)):
            if np.isfinite(grid[i, j]):
                bright = sum(im.cmap(im.norm(grid[i, j]))[:3]) > 1.8  # light cell: dark text
                ax.text(
                    j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="k" if bright else "w", fontsize="small"
                )
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep: Path, metric: str, plots: bool = True) -> list[dict[str, Any]]:
    rows = sort_rows(read_jobs(sweep), metric)
    if not rows:
        raise ReportError(f"{str(sweep)!r} holds no job dirs (no */.hydra/overrides.yaml)")
    write_csv(sweep / "report.csv", rows, metric)
    params = swept_params(rows)
    if plots and any(r["status"] == "completed" for r in rows):
        for p in params:
            plot_param(sweep / f"report_{p.replace('/', '_')}.png", rows, p, metric)
        others = [p for p in params if p != "seed"]
        if len(others) == 2:
            plot_heatmap(sweep / "report_heatmap.png", rows, others[0], others[1], metric)
    return rows


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4g}"


@closed_pipe_ok()
def main(argv: list[str] | None = None) -> None:
    from quadnet.cli import fail

    parser = argparse.ArgumentParser(prog="python -m quadnet.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a sweep dir (default: the newest under outputs/multirun)")
    parser.add_argument("--metric", default="test_loss", help=f"sort by: {', '.join(METRICS)} (default test_loss)")
    parser.add_argument("--outputs", default="outputs", help="where to look for the newest sweep")
    parser.add_argument("--no-plots", action="store_true", help="only the table and report.csv")
    parser.add_argument("--top", type=int, default=30, help="rows of the table to print (default 30)")
    args = parser.parse_args(argv)
    if args.metric not in METRICS:
        fail(f"--metric {args.metric!r} is not allowed: choose one of {', '.join(METRICS)}")
    try:
        sweep = Path(args.sweep_dir) if args.sweep_dir else newest_sweep(Path(args.outputs))
        if not sweep.is_dir():
            raise ReportError(f"{str(sweep)!r} is not a directory")
        rows = report(sweep, args.metric, plots=not args.no_plots)
    except ReportError as e:
        fail(str(e))
    width = min(60, max(len(r["overrides"]) for r in rows))
    print(f"sweep {sweep}: {len(rows)} jobs, sorted by {args.metric}")
    print(
        f"{'job':>5}  {'overrides':<{width}}  {'status':<10} {'loss':>9} {'train acc':>9} {'test acc':>8} "
        f"{args.metric:>11} {'seconds':>8}"
    )
    for r in rows[: args.top]:
        status = r["status"] if len(r["status"]) <= 10 else r["status"][:9] + "…"
        print(
            f"{r['job']:>5}  {r['overrides'][:width]:<{width}}  {status:<10} {_fmt(r.get('final_loss')):>9} "
            f"{_fmt(r.get('train_accuracy'), True):>9} {_fmt(r.get('test_accuracy'), True):>8} "
            f"{_fmt(metric_of(r, args.metric)):>11} {_fmt(r.get('train_seconds')):>8}"
        )
    if len(rows) > args.top:
        print(f"… {len(rows) - args.top} more rows in report.csv")
    bad = [r for r in rows if r["status"] != "completed"]
    if bad:
        print(f"not completed ({len(bad)}):")
        for r in bad:
            print(f"  job {r['job']}: {r['status']}  [{r['overrides']}]")
    print(f"wrote {sweep / 'report.csv'}" + ("" if args.no_plots else " and the report_*.png plots"))


if __name__ == "__main__":
    main()
