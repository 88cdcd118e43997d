"""What a run and a sweep print: a run's headline and table of test points, how it ended (with
the command that goes on after an interruption), and a sweep's closing line."""

import contextlib
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
from collections import Counter
from pathlib import Path
from textwrap import shorten
from typing import Any

from quadnet import artifacts

log = logging.getLogger("quadnet")
TABLE_ROWS = 8  # test points a single run's table shows (the misclassified first)


def headline(s: dict[str, Any], table: bool = True, level: int = logging.INFO) -> None:
    """How a run ended, after its table of test points unless table=False (sweep jobs), and the confusion
    matrix where the table cannot show them all; a point predicted wrongly is marked, as the plots ring
    it, and shown first."""
    preds = s["predictions"]
    marked = {id(p) for p in preds if p["predicted"] is not None and p["true"] not in (None, p["predicted"])}
    shown = sorted(preds, key=lambda p: id(p) not in marked)[:TABLE_ROWS] if table else []  # (the wrong first)
    points = [shorten("(" + ", ".join(f"{v:g}" for v in p["point"]) + ")", 48, placeholder=" …)") for p in shown]
    w, cw = max([16, *map(len, points)]), max([9, *(len(str(c)) for c in s["classes"])])
    lines = ["", f"{'point':>{w}}  {'predicted':>{cw}}  {'p(predicted)':>12}  {'true':>{cw}}"] if shown else []
    for point, p in zip(points, shown, strict=True):
        q, t = ("-" if p[k] is None else str(p[k]) for k in ("predicted", "true"))
        prob = p["probs"][s["classes"].index(p["predicted"])] if p["predicted"] is not None else math.nan
        lines.append(f"{point:>{w}}  {q:>{cw}}  {prob:>12.9f}  {t:>{cw}}{'  ✗ wrong' if id(p) in marked else ''}")
    if table and (more := s.get("test_points", len(preds)) - len(shown)) > 0:  # (the matrix, too: the table is not all)
        kept = f"; summary.json keeps {len(preds)} misclassified" if more + len(shown) > len(preds) else ""
        lines += [f"{'…':>{w}}  ({more} more test points{kept or ' in summary.json'})", *confusion(s)]
    job = f"[{' '.join(s['overrides'])}] " if not table and s.get("overrides") else ""  # a sweep's job: which one
    status = f"{job}status {s['status']} at epoch {s['epoch']}/{s['epochs']}"
    accuracy = f"train accuracy {_num(s['train_accuracy'], True)}   test accuracy {_num(s['test_accuracy'], True)}"
    accuracy += f"   val accuracy {_num(v, True)}" if (v := s.get("val_accuracy")) is not None and v == v else ""
    seconds = f"train_seconds {s['train_seconds']:.3f}"  # (a batched job's: its share, by its steps, of its batch's)
    seconds += f" (its share of its batch's {b['seconds']:.3f} s, {b['jobs']} jobs)" if (b := s.get("batch")) else ""
    lines.append(f"{status}   {accuracy}   final loss {_num(s['final_loss'])}   {seconds}")
    opened = [f"mlflow: {s['tracking']['open']}"] if "open" in s.get("tracking", {}) else []  # (how to open its run)
    log.log(level, "\n".join([*lines, f"run dir: {s['run_dir']}", *opened]))


def confusion(s: dict[str, Any]) -> list[str]:
    """The test set's confusion matrix (rows: the true class, columns: the predicted) and each class's
    accuracy, as lines; none above 10 classes or 120 columns (a terminal's width)."""
    names, counts = [str(c) for c in s["classes"]], s["confusion"]["counts"]
    right = [_num(s["per_class_accuracy"][n], True) for n in names]
    rows = [["true \\ predicted", *names, "right"], *([n, *r, a] for n, r, a in zip(names, counts, right, strict=True))]
    widths = [max(5, *(len(str(row[i])) for row in rows)) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{v!s:>{k}}" for v, k in zip(row, widths, strict=True)) for row in rows]
    return ["", *lines] if len(names) <= 10 and len(lines[0]) <= 120 else []


def _num(v: float | None, pct: bool = False) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%" if pct else f"{v:.6g}"


def conclude(summary: dict[str, Any], single_run: bool = True, exit: bool = True, quiet: bool = False,
             sweep: Path | None = None) -> float:  # fmt: skip
    """Report how a run ended, exit where it must, and return the objective (+inf for a run that
    did not finish with finite values). Interrupted: the command that goes on, and exit
    128+signal (a sweep's job: the sweep's command). Diverged: exit 3 in a single run; in a sweep
    the other jobs carry on. quiet: at debug level (big sweeps); exit=False: a batched sweep's
    job, whose sweep prints one line for all."""
    headline(summary, table=single_run, level=logging.DEBUG if quiet else logging.INFO)
    status, loud = summary["status"], logging.WARNING if exit and not quiet else logging.DEBUG
    if status == "interrupted":
        run = f"python -m quadnet.train {shlex.quote('resume=' + hydra_value(summary['run_dir']))}"
        again = resume_sweep(sweep) if sweep is not None and not summary["config"]["resume"] else run
        log.log(loud, "interrupted at epoch %d; checkpoint written. Resume with:\n  %s", summary["epoch"], again)
        if exit:
            sys.exit(128 + signal.Signals[summary["signal"] or "SIGINT"].value)
    if status == "diverged":
        message = "diverged: the loss became non-finite at epoch %d (lr=%g); try a smaller lr"
        log.log(logging.DEBUG if quiet else logging.ERROR, message, summary["epoch"], summary["config"]["lr"])
        if single_run and exit:
            sys.exit(3)
    value = artifacts.summary_metric(summary, summary["config"]["objective"])
    return math.inf if value is None else value


def hydra_value(path: str | Path) -> str:
    """An absolute path as a value in Hydra's override grammar: quoted unless it is plain."""
    where = os.path.abspath(path)
    if re.fullmatch(r"[\w/.:@+-]+", where):
        return where
    # in a quoted value a backslash escapes only before a quote (or the closing one): double those
    return "'" + re.sub(r"(\\*)('|$)", lambda m: 2 * m[1] + ("\\'" if m[2] else ""), where) + "'"


def resume_sweep(sweep_dir: Path) -> str:
    """The command that goes on with an interrupted sweep: this one, into its dir, under the batched
    launcher (it resumes each job from its checkpoint and keeps those that completed)."""
    again = [a for a in sys.argv[1:] if not a.startswith(("hydra.sweep.dir=", "hydra/launcher="))]
    again += ["hydra/launcher=batched", f"hydra.sweep.dir={hydra_value(sweep_dir)}"]
    return "python -m quadnet.train " + shlex.join(again)


def closing_line(ends: Counter[str], sweep_dir: Path, jobs: int | None = None) -> None:
    """A sweep's last line: how its jobs ended (of `jobs`, those written; the rest: not reached, by a sweep stopped
    before its last chunks: they may hold what an earlier run of it wrote), and the command that reports on them."""
    total = jobs or sum(ends.values())
    ends = ends + Counter({"not reached": total - sum(ends.values())})
    outcome = ", ".join(f"{n} {s}" for s, n in sorted(ends.items()) if n) or "none written"
    where = shlex.quote(str(Path(sweep_dir).absolute()))
    log.info("%d jobs: %s; report: python -m quadnet.report %s", total, outcome, where)


def status_of(summary: Path) -> str:
    """The status a summary.json holds; 'damaged' for one that cannot be read (or is no regular file:
    a FIFO would block the read)."""
    with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
        if summary.is_file():
            return str(json.loads(summary.read_text()).get("status", "damaged"))
    return "damaged"
