"""``python -m quadnet.report [SWEEP_DIR] [--metric M]``: one table and a few plots for a sweep.

SWEEP_DIR defaults to the newest sweep under ``outputs/multirun``. Every job dir is read (its
``summary.json``, which holds the job's overrides; ``.hydra/overrides.yaml`` for a job that has
none) and the jobs are printed, sorted by the metric (all of them up to 100, else the best 20).
Jobs that failed (with the reason their summary gives), diverged or never finished (no
``summary.json``) are listed; a job dir whose files are damaged is listed as damaged,
never fatal. Writes ``report.csv`` (one column per swept parameter) and, for each parameter
that takes two values or more among the jobs that trained (completed or diverged),
``report_<param>.png`` (the metric and the test accuracy against it), plus ``report_heatmap.png``
when exactly two of them, seeds and continuous values aside, take two values or more among the
completed jobs.

Exit status: 0; 2 for bad input (one ``error:`` line); 1 when report.csv or a plot could
not be written (a read-only sweep dir, say): the table is printed all the same, followed by
one ``error:`` line saying what was not written, since a script that asked for the files
did not get them.
"""

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import yaml

from quadnet import table
from quadnet.artifacts import atomic_write, summary_metric
from quadnet.checkpoint import CHECKPOINT
from quadnet.exits import ArgumentParser, command, fail, one_line
from quadnet.plots import figure as figure_file

METRICS = {"val_loss": True, "val_error": True, "test_loss": True, "test_error": True, "final_loss": True,
           "val_accuracy": False, "test_accuracy": False, "train_accuracy": False}  # fmt: skip
FIGURES = ["final_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy", "epoch",
           "train_seconds"]  # fmt: skip
ROW = ["job", "overrides", "status", "error", *FIGURES]
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
    spec = ".0f" if isinstance(v, float) and v.is_integer() and abs(v) < 1e6 else ".4g"  # (epoch 10000, not 1e+04)
    text = "-" if v is None else f"{100 * v:.1f}%" if pct else f"{v:{spec}}" if isinstance(v, float) else str(v)
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


def _number(v: Any) -> bool:
    """Whether v is a figure a summary may hold: None, a float, or an int that fits in 64 bits."""
    return v is None or type(v) is float or (type(v) is int and abs(v) < 2**63)


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
        if bad := [k for k in FIGURES if not _number(s.get(k))]:
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


def read_jobs(sweep: Path, metric: str) -> tuple[Any, list[str]]:
    """The sweep's jobs as one pyarrow Table, a column per figure and per swept key (``job`` and the
    overrides as text), best first by metric (those without it, not completed, last; else in the
    dirs' order); and the swept keys."""

    if (sweep / "summary.json").exists():
        fail(f"{str(sweep)!r} is a single run, not a sweep; its results are in its summary.json")
    ours = []  # (the results table's readable rows; `rows`: the job dirs', or the damaged chunks')
    if table.tables(sweep):  # (the sweep's results table; a sweep of quadnet 0.5 and earlier: its job dirs)
        t, params, damaged = table.rows(sweep)
        # (job as text: a damaged chunk's row is named by its file, as a job dir by its name)
        ours = [t.set_column(t.column_names.index("job"), "job", t["job"].cast(pa.string()))] if t is not None else []
        lost = {"overrides": "", "params": {}, "status": "damaged", "error": "chunk cannot be read"}
        rows = [{**lost, **dict.fromkeys(FIGURES), "job": name} for name in damaged]
    else:
        marks = ("summary.json", ".hydra", CHECKPOINT)  # (a job that never finished has its checkpoint or Hydra's)
        if not (dirs := [p for p in sweep.iterdir() if p.is_dir() and any((p / m).exists() for m in marks)]):
            fail(f"{str(sweep)!r} holds no job dirs (no */summary.json) and no results table (no results/*.parquet)")
        rows = [read_job(d) for d in sorted(dirs, key=lambda p: (len(p.name), p.name))]
        params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    params = [k for k in params if k not in ROW]  # (+status=…: a swept key of its own, never over the column)
    columns = {k: pa.array([r[k] for r in rows], pa.float64() if k in FIGURES else pa.string()) for k in ROW}
    for k in params:  # (a key whose values are of kinds no one column holds: as text)
        values = [r["params"].get(k) for r in rows]
        try:
            columns[k] = pa.array(values)
        except (ValueError, TypeError, OverflowError):
            columns[k] = pa.array([None if v is None else str(v) for v in values])
    t = pa.concat_tables([*ours, pa.table(columns)], promote_options="permissive")
    order = pc.array_sort_indices(figure(t, metric), order="ascending" if METRICS[metric] else "descending")
    return t.take(order), params  # (a stable sort, NaN last either way)


def figure(t: Any, name: str, test: bool = True) -> np.ndarray:
    """:func:`quadnet.artifacts.summary_metric` for every job at once: a figure of each completed job
    (an error is 1 − its accuracy; test: a val_ figure without a validation split is the test set's), NaN else."""
    key = name.replace("_error", "_accuracy")
    v = t[key].to_numpy()
    if key.startswith("val_") and test:
        v = np.where(np.isnan(v), t["test_" + key[4:]].to_numpy(), v)
    v = np.where(np.isfinite(v) & done(t), v, np.nan)
    return 1 - v if name.endswith("_error") else v


def label(t: Any, name: str) -> str:
    """A figure's name, and whose it is when a val_ figure is the test set's (no validation split)."""
    return name + " (the test set's)" * (name.startswith("val_") and t["val_loss"].null_count == len(t))


def done(t: Any, *also: str) -> np.ndarray:
    """Whether each job completed, or ended as one of also ("diverged": the jobs that trained, no figures but a
    result of their settings)."""
    return pc.is_in(t["status"], pa.array(["completed", *also])).to_numpy(zero_copy_only=False)


def swept_params(t: Any, params: list[str]) -> list[str]:

    return [k for k in params if pc.count_distinct(t[k]).as_py() > 1]


def write_csv(path: Path, t: Any, params: list[str]) -> None:
    """One row a job: its swept parameters, overrides, status, error and every metric (no column twice)."""

    figures = [*FIGURES[:6], "val_error", "test_error", *FIGURES[6:]]
    errors = {f: pa.array(figure(t, f, test=False), from_pandas=True) for f in figures if "error" in f}  # (NaN: null)
    order = ["job", *params, "overrides", "status", "error", *figures]
    out = pa.table({k: errors[k] if k in errors else t[k] for k in order})
    atomic_write(path, lambda tmp: pyarrow.csv.write_csv(out, tmp))


def axis_kind(param: str, values: Any) -> tuple[Any, str, bool]:
    """param's sorted distinct values (values: its column, no nulls; they: an array); 'scatter' (seeds, continuous
    values), 'grid' (a few numbers) or 'categorical'; and whether a log axis suits them (all > 0, a
    span of 10× or more)."""

    distinct = values.unique().sort()
    numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
    log = numeric and (low := distinct[0].as_py()) > 0 and distinct[-1].as_py() / low >= 10
    many = len(distinct) > CONTINUOUS and len(distinct) > len(values) / 2
    many |= len(values) == len(distinct) >= 3 and pa.types.is_floating(values.type)  # a search, not a grid
    return distinct, "scatter" if param == "seed" or (numeric and many) else "grid" if numeric else "categorical", log


def _log_scale(name: str, vals: np.ndarray) -> bool:
    """Whether a log axis suits the figure `name` with these values: all > 0, a span of 100× or more."""
    return "accuracy" not in name and bool(vals.size) and vals.min() > 0 and vals.max() / vals.min() >= 100


def _axes(t: Any, *params: str) -> tuple[Any, list[tuple[np.ndarray, Any, str, bool]]]:
    """The jobs that trained (completed or diverged) with every param; for each param, the index of each job's
    value among its sorted distinct values, and :func:`axis_kind`'s values, kind and log."""
    keep = [done(t, "diverged"), *(pc.is_valid(t[p]).to_numpy(zero_copy_only=False) for p in params)]
    t = t.filter(np.logical_and.reduce(keep))
    return t, [(pc.index_in(t[p], (axis := axis_kind(p, t[p]))[0]).to_numpy(), *axis) for p in params]


def plot_param(path: Path, t: Any, param: str, metric: str, varied: list[str]) -> None:
    """The metric (left) and the test accuracy (right; test loss if the metric is test accuracy) against param;
    at each value, the jobs of every setting of the other varied parameters together (the title says which)."""
    t, [(idx, xs, kind, xlog)] = _axes(t, param)
    at = xs.to_numpy(zero_copy_only=False) if kind != "categorical" else np.arange(len(xs))  # where each is drawn
    names = (metric, "test_loss" if metric == "test_accuracy" else "test_accuracy")
    with figure_file(path, 1, 2, figsize=(11, 4.2)) as (fig, axes):
        for ax, name in zip(axes, names, strict=True):
            v = figure(t, name)
            ok = ~np.isnan(v)
            every = v[ok]
            ax.scatter(at[idx[ok]], every, s=12, alpha=0.5, color="tab:blue", label="each job", zorder=3)
            groups = [v[ok & (idx == i)] for i in range(len(xs))] if kind != "scatter" else []
            if groups:  # (the median beneath the jobs' dots, hollow, so that none hides under it)
                # (median, 16th and 84th percentiles; NaN for none)
                stats = [np.percentile(g, [50, 16, 84]) if g.size else [math.nan] * 3 for g in groups]
                centre, low, high = np.array(stats).T
                if kind == "grid":
                    ax.plot(at, centre, marker="o", mfc="none", color="tab:red", label="median", zorder=2)
                    ax.fill_between(at, low, high, color="tab:red", alpha=0.15, label="16–84% of jobs")
                else:
                    ax.errorbar(at, centre, yerr=[centre - low, high - centre], fmt="o", mfc="none", color="tab:red",
                                capsize=4, label="median; bars: 16–84% of jobs")  # fmt: skip
            handles = ax.get_legend_handles_labels()[0]
            if groups and name == "test_accuracy":  # a count of jobs, not an accuracy: on an axis of its own
                right = [np.mean(v[idx == i] == 1.0) for i in range(len(xs))]  # (a job that diverged: not right)
                twin, what = ax.twinx(), "fraction of jobs with every test point right"
                handles += twin.plot(at, right, "s--" if kind == "grid" else "s", color="tab:green", label=what)
                twin.set_ylim(-0.05, 1.05)
                twin.set_ylabel(what, color="tab:green")
            ax.set(xlabel=param, ylabel=f"{label(t, name)} ({'lower' if METRICS[name] else 'higher'} is better)")
            ax.set(xscale="log" if xlog else "linear", yscale="log" if _log_scale(name, every) else "linear")
            if "accuracy" in name:
                ax.set_ylim(-0.05, 1.05)
            if len(xs) <= CONTINUOUS and kind != "scatter":  # a tick at each value of a grid
                ax.set_xticks(at, [show(x) for x in xs.to_pylist()], minor=False)
                ax.minorticks_off()
            elif not xlog and "int" in str(xs.type):  # seeds: whole-number ticks
                ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
        others = [q for q in varied if q != param]
        pooled = f"\neach value pools every setting of {', '.join(others)}" if others else ""
        jobs = f"{len(t)} jobs, {done(t).sum()} completed"  # (those that diverged: no figures, in the fraction)
        fig.suptitle(f"{label(t, names[0])} and {names[1]} against {param} ({jobs}){pooled}")


def plot_heatmap(path: Path, t: Any, a: str, b: str, metric: str) -> None:
    t, [(ia, xa, *_), (ib, xb, *_)] = _axes(t, a, b)
    v = figure(t, metric)
    cells = [[v[(ia == i) & (ib == j) & ~np.isnan(v)] for i in range(len(xa))] for j in range(len(xb))]
    grid = np.array([[np.median(c) if c.size else math.nan for c in row] for row in cells])
    norm = "log" if _log_scale(metric, v[~np.isnan(v)]) else None
    with figure_file(path, figsize=(1.2 * len(xa) + 3.5, 0.8 * len(xb) + 2.5)) as (fig, ax):
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(xa)), [show(v) for v in xa.to_pylist()])
        ax.set_yticks(range(len(xb)), [show(v) for v in xb.to_pylist()])
        ax.set(xlabel=a, ylabel=b, title=f"median {label(t, metric)} over the jobs in each cell")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = sum(im.cmap(im.norm(v))[:3]) < 1.8  # a dark cell: white text
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w" if dark else "k", fontsize="small")
        fig.colorbar(im, ax=ax, label=f"median {metric} ({'lower' if METRICS[metric] else 'higher'} is better)")


def write_files(sweep: Path, t: Any, params: list[str], metric: str, plots: bool) -> None:
    """report.csv and the plots, and a line that names them; the first that cannot be written ends the command
    (exit 1)."""
    completed = t.filter(done(t))
    # two values among the trained jobs
    varied = swept_params(t.filter(done(t, "diverged")), params) if plots and len(completed) else []
    grids = [p for p in swept_params(completed, varied) if axis_kind(p, completed[p].drop_null())[1] != "scatter"]
    # (file, writer, its arguments after the path), in order
    writes: list[tuple[str, Any, tuple[Any, ...]]] = [("report.csv", write_csv, (t, swept_params(t, params)))]
    writes += [(f"report_{p.replace('/', '_')}.png", plot_param, (t, p, metric, varied)) for p in varied]
    writes += [("report_heatmap.png", plot_heatmap, (t, *grids, metric))] if len(grids) == 2 else []
    for name, write, args in writes:
        try:
            write(sweep / name, *args)
        except Exception as e:  # (after the table: a script that asked for the files did not get them)
            fail(f"could not write {name} in {str(sweep)!r}: {getattr(e, 'strerror', None) or one_line(e)}", code=1)
    none = " (no plots: no swept parameter takes two values among the completed jobs)" * plots
    print(f"wrote {sweep / 'report.csv'}" + (f" and {', '.join(w[0] for w in writes[1:])}" if writes[1:] else none))


def print_table(sweep: Path, t: Any, params: list[str], metric: str, top: int | None) -> None:
    keys = swept_params(t, params) or params  # what tells the jobs apart
    bad = t.filter(~done(t))
    top = min(top or (len(t) if len(t) <= 100 else 20), len(t))
    best, worst = t.slice(0, top).to_pylist(), bad.slice(0, top).to_pylist()  # (the rows printed: 10⁶ jobs print 40)
    for r in best + worst:
        r["swept"] = show(" ".join(f"{k}={show(r[k])}" for k in keys if r[k] is not None))
    width = max(9, *(len(r["swept"]) for r in best + worst))
    sw = max(6, *(len(show(r["status"])) for r in best + worst))
    columns = [*FIGURES[:6], *[metric] * metric.endswith("_error"), *FIGURES[6:]]  # (an error: if sorted by it)
    heads = [f.replace("_accuracy", " acc").replace("_seconds", " s").replace("_", " ") for f in columns]
    test = metric.startswith("val_") and t["val_loss"].null_count == len(t)  # (no validation split)
    print(f"sweep {sweep}: {len(t)} jobs, sorted by {metric}" + " (the test set's: no validation split)" * test)
    print(f"{'job':>5}  {'swept':<{width}}  {'status':<{sw}}  " + " ".join(f"{h:>10}" for h in heads))
    for r in best:
        values = [show(summary_metric(r, f) if f.endswith("_error") else r[f], "accuracy" in f) for f in columns]
        cells = f"{show(r['job']):>5}  {r['swept']:<{width}}  {show(r['status']):<{sw}}  "
        print(cells + " ".join(f"{v:>10}" for v in values))
    if len(t) > top:
        print(f"… {len(t) - top} more jobs not shown (--top N shows more); all are in report.csv")
    if worst:
        print(f"not completed ({len(bad)}):")
        for r in worst:
            why = f": {show(r['error'])}" if r["error"] else ""
            print(f"  job {show(r['job'])}: {show(r['status'])}{why}" + (f"  [{r['swept']}]" if r["swept"] else ""))


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
    t, params = read_jobs(sweep, args.metric)  # (an OSError: one line, by @command)
    print_table(sweep, t, params, args.metric, args.top)
    write_files(sweep, t, params, args.metric, plots=not args.no_plots)


if __name__ == "__main__":
    main()
