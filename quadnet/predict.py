"""``python -m quadnet.predict [RUN_DIR_OR_CHECKPOINT] [POINT ...] [--file F] [--json]``: ask a trained model.

Which class each point falls in, by a trained model: quadrants 1-4 (the quadrant data), or the
labels of the CSV it was trained on.

points: the features, comma-separated, e.g. x,y (negative numbers typed as they are: -2,2), as
arguments; a CSV file, a point a line, its header naming them if it has one (--file F, '#'
starts a comment; --file - reads stdin; where it has the label's column too, the accuracy, a
true column and ✗ wrong marks); or stdin when no point is given and stdin is not a terminal.

model: a run dir or a checkpoint file, given first, or a job of a sweep's results table: SWEEP/N,
or SWEEP --job N (its number, or its overrides: --job "lr=0.1 seed=2"). Without one, the newest
completed run under outputs/ is used, single runs and sweep jobs alike (the newest checkpoint
whose run completed), and the first line says which. A model whose loss diverged is refused.

In Python, :func:`load` gives a :class:`Model` with scikit-learn's ``predict`` (the class
labels: quadrants 1-4, or a CSV's labels) and ``predict_proba`` (n, classes). Any finite
point works, even 1e308,1e308: ReLU is positively homogeneous, so logits(x) =
s·(W2ᵀ relu(W1ᵀ(x/s) + b1/s) + b2/s) exactly for any s > 0; a point beyond 1e100 is scaled by
s = max |x_i|, and the softmax takes exp(s·(z − max z)), so no logit overflows.
"""

import argparse
import contextlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quadnet import checkpoint, table
from quadnet.artifacts import prediction_rows, write_text
from quadnet.checkpoint import CHECKPOINT, CheckpointError
from quadnet.console import status_of
from quadnet.data import QUADRANT_NAMES, QUADRANTS
from quadnet.engines.numpy import forward
from quadnet.exits import command, deferred, fail


class InputError(ValueError):
    """Bad input to predict; the message is one line."""


@dataclass
class Model:
    """A trained net: ``predict`` gives class labels (n,), ``predict_proba`` (n, classes) probabilities.

    Points are a list or array of shape (n, D), or one point of shape (D,), D the features it
    was trained on, as they were in the data (scaling is applied here), or a pandas DataFrame
    holding those columns."""

    params: dict[str, np.ndarray] = field(repr=False)  # seed layout, float64
    path: str
    epoch: int
    status: str
    classes: tuple[Any, ...] = QUADRANTS  # the label of each output
    quadrants: bool = True  # its classes are the quadrants: a point has a true one
    features: tuple[str, ...] = ("x", "y")  # the columns it reads
    label: str = "label"  # the column of the true labels, in a file of points
    shift: np.ndarray | None = None  # the data's standardization (see quadnet.data.Dataset)
    scale: np.ndarray | None = None
    data_files: tuple[str, ...] = ()  # the files it was trained on (data.path, val_path, test_path)

    def predict_proba(self, points: Any) -> np.ndarray:
        if hasattr(points, "columns"):  # a DataFrame: its columns by name
            points = points[list(self.features)]
        x, d = np.atleast_2d(np.asarray(points, dtype=np.float64)), len(self.features)
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"points must have shape (n, {d}) or ({d},), not {np.shape(points)}")
        if not np.isfinite(x).all():
            raise ValueError("points must be finite: a point with nan or inf lies in no quadrant")
        x = x if self.shift is None else (x - self.shift) / self.scale
        # s = 1 for any ordinary point: then these are the NumPy reference's numbers, bit for bit
        s, p = np.where((m := np.abs(x).max(axis=1, keepdims=True, initial=0.0)) > 1e100, m, 1.0), self.params
        z = forward({**p, "b1": p["b1"] / s, "b2": p["b2"] / s}, x / s)[0]  # (b/s: per point)
        with np.errstate(over="ignore"):
            e = np.exp(s * (z - z.max(axis=1, keepdims=True)))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, points: Any) -> np.ndarray:
        return np.array(self.classes)[self.predict_proba(points).argmax(axis=1)]


def load(path: str | Path, job: str | int | None = None) -> Model:
    """The model in a run dir or checkpoint file, or a job of a sweep's results table (``SWEEP/17``,
    or the sweep and job: its number or overrides, ``"lr=0.1 seed=2"``); :class:`CheckpointError`
    (one line) if unusable."""
    if job is None and not Path(path).exists() and table.tables(Path(path).parent):  # SWEEP/17, a table's job
        path, job = Path(path).parent, Path(path).name
    if job is None and table.tables(Path(path)) and not (Path(path) / CHECKPOINT).exists():
        raise CheckpointError(f"{str(path)!r} is a sweep: name one of its jobs, {path}/N or --job OVERRIDES")
    ck = checkpoint.load(path) if job is None else table.load(Path(path), str(job))
    status, params, p = str(ck.get("status")), ck["params"], ck["path"]
    if status == "diverged" or (bad := [k for k, v in params.items() if not np.isfinite(v).all()]):
        weights = f", with non-finite {' '.join(bad)}" if status != "diverged" else ""
        raise CheckpointError(f"{p!r} cannot predict: its status is {status} at epoch {ck['epoch']}{weights}")
    scaling = [None if ck[k] is None else np.array(ck[k]) for k in ("shift", "scale")]
    files = tuple(f for k in ("path", "val_path", "test_path") if (f := getattr(ck["cfg"].data, k)))
    read = (ck["cfg"].data.name != "csv", tuple(ck["features"]), ck["label"], *scaling, files)  # (quadrants; …)
    return Model(params, p, int(ck["epoch"]), status, tuple(ck["classes"]), *read)


def newest_run(root: Path = Path("outputs")) -> Path:
    """The newest completed run under root: single runs and sweep jobs, by when their checkpoint was written."""
    runs = [*root.glob(f"*/{CHECKPOINT}"), *root.glob(f"multirun/*/*/{CHECKPOINT}")]
    for ck in sorted(runs, key=lambda m: m.stat().st_mtime, reverse=True):
        if status_of(ck.parent / "summary.json") == "completed":
            return ck.parent
    why = f"no completed run under {str(root)!r} (no */{CHECKPOINT})"
    raise InputError(f"{why}; train one, or give a run dir or a sweep's job (SWEEP/N) first")


def parse_point(text: str, where: str) -> tuple[float, ...]:
    with contextlib.suppress(ValueError):  # not numbers
        if (point := tuple(map(float, re.split(r"\s*,\s*|\s+", text.strip())))) and np.isfinite(point).all():
            return point
    raise InputError(f"{where}: {text.strip()!r} is not a point; write finite numbers as x,y, one a feature")


POINTS_BYTES = 1 << 28


def read_points(f: str, features: tuple[str, ...] = ("x", "y"), label: str = "label") -> tuple[list, list | None]:
    """The points in file f ('-': stdin) and their true labels where it has them. A header line may
    name the columns (the features, and the label's); without one a line is the features in order,
    then a label. An empty file (/dev/null too) has none. A file that is no regular file (a device,
    a pipe) is read up to POINTS_BYTES: /dev/zero would never end."""
    where, regular = ("stdin", False) if f == "-" else (f"points file {f!r}", Path(f).is_file())
    try:  # (stdin is a pipe too: read up to POINTS_BYTES)
        with open(sys.stdin.fileno() if f == "-" else f, "rb", closefd=f != "-") as fh:
            raw = fh.read() if regular else fh.read(POINTS_BYTES + 1)
        if len(raw) > POINTS_BYTES and not regular:
            raise InputError(f"{where} goes on past {POINTS_BYTES >> 20} MiB: give a file of x,y lines")
        lines = raw.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = "does not exist" if isinstance(e, FileNotFoundError) else "is not a text file of x,y lines"
        raise InputError(f"{where} {why}") from None
    rows = [(i, c) for i, ln in enumerate(lines, 1) if (c := ln.split("#", 1)[0].strip())]
    named = rows and "," in rows[0][1] and not re.match(r"[-+.\d]", rows[0][1])  # (one word: a bad point)
    head = [h.strip() for h in rows[0][1].split(",")] if named else None
    if head is not None and (missing := [n for n in features if n not in head]):
        raise InputError(f"{where}: its header has no column {missing[0]!r}; the model reads {', '.join(features)}")
    cols = [head.index(n) for n in features] if head else list(range(len(features)))
    at = (head.index(label) if label in head else None) if head else len(features)
    points, labels = [], []
    for i, text in rows[head is not None :]:
        parts = [p.strip() for p in text.split(",")] if "," in text else text.split()
        labels += [parts[at]] if at is not None and at < len(parts) else []
        points.append(parse_point(" ".join(parts[k] for k in cols if k < len(parts)), f"{where} line {i}"))
    return points, labels if labels and len(labels) == len(points) else None


def parse_args(argv: list[str]) -> tuple[Path, bool, list[tuple[float, ...]], argparse.Namespace]:
    """(run dir or checkpoint, whether it is the default, the points given as arguments, the
    options). A first argument that is numbers (x,y) and names no file is a point: the newest run
    is used."""
    help_text = "\n\n".join((__doc__ or "").split("\n\n")[1:4])  # (the paragraphs after the usage line)
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser("python -m quadnet.predict", description=help_text, formatter_class=formatter)
    parser.add_argument("args", nargs="*", metavar="RUN_DIR_OR_CHECKPOINT | SWEEP/N | x,y")
    parser.add_argument("--file", action="append", default=[], help="a CSV file of points (a header is optional)")
    parser.add_argument("--out", help="write the predictions to this CSV file (the points, predicted, p(class)...)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--job", help="a job of the sweep given first, from its results table: its number or overrides")
    parser.error = lambda m: fail(re.sub(r"unrecognized arguments: (\S+).*", r"unknown option \1", m))
    with deferred():  # ' -2,2': a point
        args = parser.parse_intermixed_args([" " + t if re.match(r"-[\d.]", t) else t for t in argv])
    # (numbers that name no file are points, and a bad one is named as such: 1,1,1)
    rest = args.args
    default = not rest or not (Path(rest[0]).exists() or table.tables(Path(rest[0]).parent))
    if default and rest and not re.fullmatch(r"[-+\d.,eE\s]+", rest[0]):
        raise InputError(f"{rest[0]!r} is neither a run dir or checkpoint (no such path) nor a point x,y")
    run, point_args = (newest_run(), rest) if default else (Path(rest[0]), rest[1:])
    args.file = args.file or ([] if point_args or sys.stdin.isatty() else ["-"])
    return run, default, [parse_point(p, f"argument {i}") for i, p in enumerate(point_args, 1)], args


@command()
def main(argv: list[str] | None = None) -> None:
    # (an InputError, CheckpointError or ConfigError, for a ~user with no home: one line, by @command)
    run, default, points, args = parse_args(sys.argv[1:] if argv is None else argv)
    model, truth = load(run, args.job), [None] * len(points)  # (a file's true labels; none for an argument)
    out = Path(args.out or ".")  # (not a --file, the model's data, a device, a link nor a run dir's file: none is lost)
    inside = any((d / n).exists() for d in out.resolve().parents for n in (CHECKPOINT, "multirun.yaml"))  # (a run's)
    taken = out.resolve() in {Path(f).resolve() for f in [*args.file, run, *model.data_files]}
    broken = [taken, inside, out.is_symlink(), out.exists() and not out.is_file()]
    if args.out is not None and any(broken):
        why = ("an input file", "inside a run or sweep dir", "a link", "not a regular file")[broken.index(True)]
        raise InputError(f"--out {args.out!r} is not allowed: it is {why}; give a new or regular file outside runs")
    for f in args.file:
        found, labels = read_points(f, model.features, model.label)
        points, truth = points + found, truth + (labels or [None] * len(found))
    if not points:
        names = ", ".join("stdin" if f == "-" else f for f in args.file)
        raise InputError(f"no points given{f' ({names} held none)' if args.file else ''}; pass x,y or --file PATH")
    if bad := [p for p in points if len(p) != len(model.features)]:
        raise InputError(f"{bad[0]} has {len(bad[0])} numbers; the model reads {', '.join(model.features)}")
    x = np.array(points, dtype=np.float64)
    rows = prediction_rows(x, model.predict_proba(x), model.classes, None, model.quadrants)
    known = {str(c): c for c in model.classes}  # (a file's label is text: the class of that name, as JSON has it)
    for r, t in zip(rows, truth, strict=True):
        r["true"] = r["true"] if t is None else known.get(t, t)
    if args.out:
        heads = [*model.features, "predicted", *(f"p({c})" for c in model.classes)]
        lines = [",".join(heads)] + [",".join(map(str, [*r["point"], r["predicted"], *r["probs"]])) for r in rows]
        write_text(Path(args.out), "\n".join(lines) + "\n")
    hits = [r["predicted"] == r["true"] for r, t in zip(rows, truth, strict=True) if t is not None]
    accuracy = float(np.mean(hits)) if hits else None  # (true labels from --file: the accuracy on them)
    if args.json:
        out = {"checkpoint": model.path, "status": model.status, "epoch": model.epoch, "accuracy": accuracy}
        out["predictions"] = rows
        print(json.dumps(out, indent=2))
        return
    how = "  [the newest completed run under outputs/]" if default else ""
    print(f"model: {model.path} (hidden_dim={len(model.params['b1'])}, {model.status} at epoch {model.epoch}){how}")
    if accuracy is not None:
        print(f"accuracy {accuracy:.4f} on {len(hits)} labelled points")
    if args.out:
        print(f"predictions for {len(rows)} points written to {args.out}")
        return
    shown = ["(" + ", ".join(f"{v:g}" for v in r["point"]) + ")" for r in rows]
    heads = [f"p({n})" for n in (QUADRANT_NAMES if model.quadrants else model.classes)]
    w, cw, true = max([16, *map(len, shown)]), max([9, *map(len, heads)]), model.quadrants or bool(hits)
    widths = [len(str(c)) for c in [*model.classes, *truth] if c is not None]  # (as wide as the longest label)
    pw, tw = max(9, *widths), max(4, *widths)
    tcol = f"  {'true':>{tw}}" * true
    print(f"{'point':>{w}}  {'predicted':>{pw}}  p(predicted){tcol} " + "".join(f"{h:>{cw + 1}}" for h in heads))
    for r, point in zip(rows, shown, strict=True):  # (quadrant data: a point's true class is its quadrant)
        q, t = r["predicted"], r["true"]
        pq = f"{r['probs'][model.classes.index(q)]:12.9f}" if q is not None else f"{'-':>12}"
        cells = f"{point:>{w}}  {'-' if q is None else q:>{pw}}  {pq}" + f"  {'-' if t is None else t:>{tw}}" * true
        note = "  on an axis: no true quadrant" * (t is None) * model.quadrants  # (and no label in a file)
        note += "  probabilities not finite" * (q is None) + "  ✗ wrong" * (None not in (q, t) and q != t)
        print(cells + " " + "".join(f"{p:{cw + 1}.6f}" for p in r["probs"]) + note)  # (✗: as train's table marks it)


if __name__ == "__main__":
    main()
