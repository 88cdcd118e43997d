"""``python -m quadnet.report [SWEEP_DIR] [--metric M]``: one table and a few plots for a sweep.

SWEEP_DIR defaults to the newest sweep under ``outputs/multirun``. Every job dir is read (its
``summary.json``, which holds the job's overrides; ``.hydra/overrides.yaml`` for a job that has
none) and the jobs are printed, sorted by the metric (all of them up to 100, else the best 20).
Jobs that failed (with the reason their summary gives), diverged or never finished (no
``summary.json``) are listed; a job dir whose files are damaged is listed as damaged,
never fatal. Writes ``report.csv`` (one column per swept parameter) and, for each parameter
that takes two values or more among the completed jobs, ``report_<param>.png`` (the metric and
the test accuracy against it), plus ``report_heatmap.png`` when two of them, seeds and
continuous values aside, are swept.

Exit status: 0; 2 for bad input (one ``error:`` line); 1 when report.csv or a plot could
not be written (a read-only sweep dir, say): the table is printed all the same, followed by
one ``error:`` line saying what was not written, since a script that asked for the files
did not get them.
"""

import contextlib
import csv
import gc
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from quadnet import table
from quadnet.artifacts import summary_metric, write_text
from quadnet.checkpoint import CHECKPOINT
from quadnet.exits import ArgumentParser, command, fail
from quadnet.plots import figure

METRICS = {"val_loss": True, "val_error": True, "test_loss": True, "test_error": True, "final_loss": True,
           "val_accuracy": False, "test_accuracy": False, "train_accuracy": False}  # fmt: skip
FIGURES = ["final_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy", "epoch",
           "train_seconds"]  # fmt: skip
# a numeric parameter with more distinct values than this (and than half the jobs) is drawn as a scatter
CONTINUOUS = 12


def parse_value(text: str) -> Any:
    """An override's value: int, float, bool, or the text itself."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def show(v: Any, pct: bool = False) -> str:
    """A value for the terminal (pct: a fraction, as a percentage): a control character (a newline, an escape
    code) written as repr writes it."""
    text = "-" if v is None else f"{100 * v:.1f}%" if pct else f"{v:.4g}" if isinstance(v, float) else str(v)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _read(job: Path, name: str, parse: Any, kind: type, what: str) -> Any:
    """The job dir's file name, parsed; a ValueError that says what is wrong with it."""
    if not (job / name).is_file():  # (a FIFO would block the read)
        raise ValueError(f"{name} is not a regular file")
    try:
        value = parse((job / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:  # (JSONDecodeError is a ValueError)
        raise ValueError(f"{name} cannot be read ({type(e).__name__})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} is not a {what}")
    return value


def read_job(d: Path) -> dict[str, Any]:
    """A job dir's row: overrides, parsed params, status, error and figures (None where there are none)."""
    row: dict[str, Any] = {"job": d.name, "overrides": "", "params": {}, "error": None, **dict.fromkeys(FIGURES)}
    try:
        s = _read(d, "summary.json", json.loads, dict, "JSON object") if (d / "summary.json").exists() else {}
        overrides = s.get("overrides", [] if not (d / ".hydra").is_dir() else None)
        if not isinstance(overrides, list):  # (a job without a summary, or of quadnet 0.2)
            overrides = _read(d, ".hydra/overrides.yaml", yaml.safe_load, list, "list of overrides")
        overrides = [str(o) for o in overrides]
        pairs = [o.split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra")]
        row |= {"overrides": " ".join(overrides), "params": {k.lstrip("+~"): parse_value(v) for k, v in pairs}}
        if not s:
            return {**row, "status": "unfinished (no summary.json)"}
        if not isinstance(s.get("status"), str):
            raise ValueError("summary.json has no status string")
        if bad := [k for k in FIGURES if isinstance(s.get(k), bool) or not isinstance(s.get(k), int | float | None)]:
            raise ValueError(f"summary.json: {', '.join(bad)} not a number")
        error = " ".join(str(s["error"]).split()) if s.get("error") is not None else None
        # each swept value as the job ran with it (.hydra/ may hold a later, refused command's)
        ran = s["config"] if isinstance(s.get("config"), dict) else {}
        data = ran.get("data") if isinstance(ran.get("data"), dict) else {}
        ran = {**ran, **{f"data.{k}": v for k, v in data.items()}, "data": data.get("name")}
        params = {k: ran[k] if ran.get(k) is not None else v for k, v in row["params"].items()}
        params = {k: v if isinstance(v, int | float | str) else json.dumps(v) for k, v in params.items()}  # (hashable)
        return {**row, **{k: s.get(k) for k in FIGURES}, "status": s["status"], "error": error, "params": params}
    except ValueError as e:
        return {**row, "status": "damaged", "error": str(e)}


def read_jobs(sweep: Path, metric: str) -> list[dict[str, Any]]:
    """The sweep's jobs, best first by metric (those without it, not completed, last; else in the dirs' order)."""
    if (sweep / "summary.json").exists():
        fail(f"{str(sweep)!r} is a single run, not a sweep; its results are in its summary.json")
    sign = 1 if METRICS[metric] else -1
    if table.tables(sweep):  # (the sweep's results table; a sweep of quadnet 0.5 and earlier: its job dirs)
        rows, damaged = table.rows(sweep)
        rows += [{"job": name, "overrides": "", "params": {}, "status": "damaged", "error": "chunk cannot be read",
                  **dict.fromkeys(FIGURES)} for name in damaged]  # fmt: skip
        return sorted(rows, key=lambda r: math.inf if (v := summary_metric(r, metric)) is None else sign * v)
    marks = ("summary.json", ".hydra", CHECKPOINT)  # (a job that never finished has its checkpoint or Hydra's record)
    if not (dirs := [p for p in sweep.iterdir() if p.is_dir() and any((p / m).exists() for m in marks)]):
        fail(f"{str(sweep)!r} holds no job dirs (no */summary.json)")
    rows = [read_job(d) for d in sorted(dirs, key=lambda p: (len(p.name), p.name))]
    return sorted(rows, key=lambda r: math.inf if (v := summary_metric(r, metric)) is None else sign * v)


def swept_params(rows: list[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r["params"])
    return [k for k in keys if _varies(repr(r["params"][k]) for r in rows if k in r["params"])]


def _varies(values: Iterator[str]) -> bool:
    first = next(values, None)
    return any(v != first for v in values)  # (stops at the first other value: a million seeds, at the second)


def write_csv(path: Path, rows: list[dict[str, Any]], params: list[str]) -> None:
    """One row a job: its swept parameters, overrides, status, error and every metric (no column twice)."""
    figures = [*FIGURES[:6], "val_error", "test_error", *FIGURES[6:]]
    w = csv.writer(buf := io.StringIO(), lineterminator="\n")
    w.writerow(["job", *params, "overrides", "status", "error", *figures])
    cells = lambda r: [r["params"].get(p) for p in params] + [r[k] for k in ("overrides", "status", "error")]  # noqa: E731
    w.writerows([r["job"], *cells(r), *(summary_metric(r, f) if "error" in f else r[f] for f in figures)] for r in rows)
    write_text(path, buf.getvalue())


def axis_kind(param: str, rows: list[dict[str, Any]]) -> tuple[list[Any], str, bool]:
    """param's sorted distinct values in rows; 'scatter' (seeds, continuous values), 'grid' (a few
    numbers) or 'categorical'; and whether a log axis suits them (all > 0, a span of 10× or more)."""
    values = [r["params"][param] for r in rows if param in r["params"]]
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    log = numeric and min(distinct) > 0 and max(distinct) / min(distinct) >= 10
    many = len(distinct) > CONTINUOUS and len(distinct) > len(values) / 2
    many |= len(values) == len(distinct) >= 3 and any(isinstance(v, float) for v in distinct)  # a search, not a grid
    return distinct, "scatter" if param == "seed" or (numeric and many) else "grid" if numeric else "categorical", log


def _log_scale(name: str, vals: list[float]) -> bool:
    """Whether a log axis suits the figure `name` with these values: all > 0, a span of 100× or more."""
    return "accuracy" not in name and bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= 100


def plot_param(path: Path, rows: list[dict[str, Any]], param: str, metric: str, varied: list[str]) -> None:
    """The metric (left) and the test accuracy (right; test loss if the metric is test accuracy) against param;
    at each value, the jobs of every setting of the other varied parameters together (the title says which)."""
    done = [r for r in rows if r["status"] == "completed" and param in r["params"]]
    xs, kind, xlog = axis_kind(param, done)
    at = xs if kind != "categorical" else list(range(len(xs)))  # where each value is drawn
    pos = dict(zip(xs, at, strict=True))
    names = (metric, "test_loss" if metric == "test_accuracy" else "test_accuracy")
    with figure(path, 1, 2, figsize=(11, 4.2)) as (fig, axes):
        for ax, name in zip(axes, names, strict=True):
            pts = [(pos[r["params"][param]], v) for r in done if (v := summary_metric(r, name)) is not None]
            groups: dict[Any, list[float]] = {x: [] for x in at}  # the figures at each value (one pass: 10⁶ jobs)
            for p, v in pts:
                groups[p].append(v)
            at_x, every = np.array([p for p, _ in pts]), [v for _, v in pts]  # (arrays: 10⁶ dots drawn in a second)
            ax.scatter(at_x, np.array(every), s=12, alpha=0.5, color="tab:blue", label="each job", zorder=3)
            if kind != "scatter":  # (the median beneath the jobs' dots, hollow, so that none hides under it)
                # (median, 16th and 84th percentiles; NaN for none)
                centre, low, high = np.array([np.percentile(g or [math.nan], [50, 16, 84]) for g in groups.values()]).T
                if kind == "grid":
                    ax.plot(at, centre, marker="o", mfc="none", color="tab:red", label="median", zorder=2)
                    ax.fill_between(at, low, high, color="tab:red", alpha=0.15, label="16–84% of jobs")
                else:
                    ax.errorbar(at, centre, yerr=[centre - low, high - centre], fmt="o", mfc="none", color="tab:red",
                                capsize=4, label="median; bars: 16–84% of jobs")  # fmt: skip
            handles = ax.get_legend_handles_labels()[0]
            if kind != "scatter" and name == "test_accuracy":  # a count of jobs, not an accuracy: on an axis of its own
                right = [np.mean(np.equal(g, 1.0)) if g else math.nan for g in groups.values()]
                twin, what = ax.twinx(), "fraction of jobs with every test point right"
                handles += twin.plot(at, right, "s--" if kind == "grid" else "s", color="tab:green", label=what)
                twin.set_ylim(-0.05, 1.05)
                twin.set_ylabel(what, color="tab:green")
            ax.set(xlabel=param, ylabel=f"{name} ({'lower' if METRICS[name] else 'higher'} is better)")
            ax.set(xscale="log" if xlog else "linear", yscale="log" if _log_scale(name, every) else "linear")
            if "accuracy" in name:
                ax.set_ylim(-0.05, 1.05)
            if len(xs) <= CONTINUOUS and kind != "scatter":  # a tick at each value of a grid
                ax.set_xticks(at, [show(x) for x in xs], minor=False)
                ax.minorticks_off()
            elif not xlog and all(isinstance(x, int) for x in xs):  # seeds: whole-number ticks
                ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
        others = [q for q in varied if q != param]
        pooled = f"\neach value pools every setting of {', '.join(others)}" if others else ""
        fig.suptitle(f"{names[0]} and {names[1]} against {param} ({len(done)} completed jobs){pooled}")


def plot_heatmap(path: Path, rows: list[dict[str, Any]], a: str, b: str, metric: str) -> None:
    done = [r for r in rows if r["status"] == "completed" and a in r["params"] and b in r["params"]]
    xa, xb = (axis_kind(p, done)[0] for p in (a, b))
    pts = [((r["params"][a], r["params"][b]), v) for r in done if (v := summary_metric(r, metric)) is not None]
    grid = np.array([[np.median([v for ab, v in pts if ab == (va, vb)] or [math.nan]) for va in xa] for vb in xb])
    norm = "log" if _log_scale(metric, [v for _, v in pts]) else None
    with figure(path, figsize=(1.2 * len(xa) + 3.5, 0.8 * len(xb) + 2.5)) as (fig, ax):
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(xa)), [show(v) for v in xa])
        ax.set_yticks(range(len(xb)), [show(v) for v in xb])
        ax.set(xlabel=a, ylabel=b, title=f"median {metric} over the jobs in each cell")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = sum(im.cmap(im.norm(v))[:3]) < 1.8  # a dark cell: white text
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w" if dark else "k", fontsize="small")
        fig.colorbar(im, ax=ax, label=f"median {metric} ({'lower' if METRICS[metric] else 'higher'} is better)")


def write_files(sweep: Path, rows: list[dict[str, Any]], metric: str, plots: bool) -> None:
    """report.csv and the plots, and a line that names them; the first that cannot be written ends the command
    (exit 1)."""
    done = [r for r in rows if r["status"] == "completed"]
    varied = swept_params(done) if plots else []  # a plot needs two values among the completed jobs
    grids = [p for p in varied if axis_kind(p, done)[1] != "scatter"]
    # (file, writer, its arguments after the path), in order
    writes: list[tuple[str, Any, tuple[Any, ...]]] = [("report.csv", write_csv, (rows, swept_params(rows)))]
    writes += [(f"report_{p.replace('/', '_')}.png", plot_param, (rows, p, metric, varied)) for p in varied]
    writes += [("report_heatmap.png", plot_heatmap, (rows, *grids, metric))] if len(grids) == 2 else []
    for name, write, args in writes:
        try:
            write(sweep / name, *args)
        except OSError as e:  # (after the table: a script that asked for the files did not get them)
            fail(f"could not write {name} in {str(sweep)!r}: {e.strerror or e}", code=1)
    none = " (no plots: no swept parameter takes two values among the completed jobs)" * plots
    print(f"wrote {sweep / 'report.csv'}" + (f" and {', '.join(w[0] for w in writes[1:])}" if writes[1:] else none))


def print_table(sweep: Path, rows: list[dict[str, Any]], metric: str, top: int | None) -> None:
    keys = swept_params(rows) or list(dict.fromkeys(k for r in rows for k in r["params"]))  # what tells them apart
    top, bad = top or (len(rows) if len(rows) <= 100 else 20), [r for r in rows if r["status"] != "completed"]
    listed = rows[:top] + bad[:top]  # (the rows printed: a million jobs print 40)
    shown = {id(r): show(" ".join(f"{k}={show(r['params'][k])}" for k in keys if k in r["params"])) for r in listed}
    width, sw = max(9, *map(len, shown.values())), max(6, *(len(show(r["status"])) for r in listed))
    columns = [*FIGURES[:6], *[metric] * metric.endswith("_error"), *FIGURES[6:]]  # (an error: if sorted by it)
    heads = [f.replace("_accuracy", " acc").replace("_seconds", " s").replace("_", " ") for f in columns]
    test = metric.startswith("val_") and all(r["val_loss"] is None for r in rows)  # (no validation split)
    print(f"sweep {sweep}: {len(rows)} jobs, sorted by {metric}" + " (the test set's: no validation split)" * test)
    print(f"{'job':>5}  {'swept':<{width}}  {'status':<{sw}}  " + " ".join(f"{h:>10}" for h in heads))
    for r in rows[:top]:
        values = [show(summary_metric(r, f) if f.endswith("_error") else r[f], "accuracy" in f) for f in columns]
        cells = f"{show(r['job']):>5}  {shown[id(r)]:<{width}}  {show(r['status']):<{sw}}  "
        print(cells + " ".join(f"{v:>10}" for v in values))
    if len(rows) > top:
        print(f"… {len(rows) - top} more jobs not shown (--top N shows more); all are in report.csv")
    if bad:
        print(f"not completed ({len(bad)}):")
        for r in bad[:top]:
            why = f": {show(r['error'])}" if r["error"] else ""
            print(f"  job {show(r['job'])}: {show(r['status'])}{why}" + (f"  [{shown[id(r)]}]" if shown[id(r)] else ""))


@command()
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m quadnet.report", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("sweep_dir", nargs="?", help="a sweep dir (default: the newest under outputs/multirun)")
    parser.add_argument("--metric", default="val_loss", help=f"sort by: {', '.join(METRICS)} (default val_loss)")
    parser.add_argument("--outputs", default="outputs", help="where to look for the newest sweep")
    parser.add_argument("--no-plots", action="store_true", help="only the table and report.csv")
    parser.add_argument("--top", type=int, default=None, help="print the best N jobs (default: all up to 100, else 20)")
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 1:
        fail(f"--top {args.top} is not allowed: must be >= 1")
    if args.metric not in METRICS:
        fail(f"--metric {args.metric!r} is not allowed: choose one of {', '.join(METRICS)}")
    multirun = Path(args.outputs, "multirun")  # (where the newest sweep is, when none is named)
    if not (args.sweep_dir or (sweeps := [p for p in multirun.glob("*") if p.is_dir()])):
        fail(f"no sweep under {str(multirun)!r}; run one (python -m quadnet.train -m …) or name one")
    sweep = Path(args.sweep_dir or max(sweeps, key=lambda p: p.stat().st_mtime))
    if not sweep.is_dir():
        fail(f"{str(sweep)!r} is not a directory")
    rows = read_jobs(sweep, args.metric)  # (an OSError: one line, by @command)
    gc.freeze()  # (a million jobs' rows: the collector need not walk them again and again)
    print_table(sweep, rows, args.metric, args.top)
    write_files(sweep, rows, args.metric, plots=not args.no_plots)


if __name__ == "__main__":
    main()
