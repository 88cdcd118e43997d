"""What a run leaves in its dir: metrics.csv and summary.json, written atomically (the
checkpoint is in quadnet.checkpoint, the plots in quadnet.plots)."""

import contextlib
import functools
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.data import quadrant_class
from quadnet.engines import METRICS
from quadnet.exits import unwritable

METRIC_FIELDS = ("epoch", *METRICS)
# what a run writes into its dir besides its checkpoint (and Hydra's .hydra/ and log)
RUN_FILES = ("summary.json", "metrics.csv", "loss.png", "confusion.png", "decision_regions.png", "training.gif")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers see old or new, never half.

    A failed write (a full disk) leaves the old file and raises OSError naming the file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # name the file (a full disk's error does not)
        raise unwritable(e, repr(str(path))) from None
    finally:
        with contextlib.suppress(OSError):  # (a read-only fs: the error above names the file, not the tmp)
            tmp.unlink(missing_ok=True)


def remove_stale(folder: Path) -> None:
    """Temporary files in folder of writers that were killed (their pid is gone)."""
    for stale in folder.glob(".*.tmp"):
        with contextlib.suppress(ValueError, PermissionError):  # (not a pid; another user's process)
            try:
                os.kill(int(stale.name.split(".")[-2]), 0)
            except ProcessLookupError:
                stale.unlink(missing_ok=True)


def clean(obj: Any) -> Any:
    """JSON-safe copy: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(obj, np.ndarray | np.generic):
        obj = obj.tolist()  # nested lists, or a Python scalar
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def final_figures(history: list[dict[str, float]]) -> dict[str, float | None]:
    """A job's last metrics row as its summary and its table row keep it: ``final_loss`` and the
    other METRICS (NaN, a figure the data has not: None)."""
    last = history[-1] if history else {}
    return {"final_loss" if k == "loss" else k: clean(last.get(k)) for k in METRICS}


def summary_metric(summary: dict[str, Any], name: str) -> float | None:
    """A figure of a completed run's summary (an error is 1 − its accuracy); None otherwise. A
    val_ figure of data without a validation split (the seed's 4 points) is the test set's."""
    key = name.replace("_error", "_accuracy")
    if key.startswith("val_") and (summary.get(key) is None or summary[key] != summary[key]):  # (None or NaN)
        key = "test_" + key[4:]
    try:  # (not contextlib.suppress: a report of a million jobs calls this five million times)
        if summary.get("status") == "completed" and math.isfinite(value := summary.get(key)):  # type: ignore[arg-type]
            return 1 - float(value) if name.endswith("_error") else float(value)
    except (TypeError, ValueError, OverflowError):  # (None, or a damaged summary)
        pass
    return None


def prediction_rows(points: np.ndarray, probs: np.ndarray, classes: tuple[Any, ...], truth: np.ndarray | None,
                    quadrants: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Per point (N, 2): the predicted class's label (None if probs are not finite), the
    probabilities, the true label (the data's; for quadrant classes without data, the point's
    quadrant, None on an axis) and, for quadrant classes, whether it lies on an axis."""
    if truth is None:
        truth = quadrant_class(points) if quadrants else np.full(len(points), -1)
    rows = []
    for pt, p, t in zip(points, probs, truth, strict=True):
        row = {"point": pt.tolist(), "predicted": classes[int(np.argmax(p))] if np.isfinite(p).all() else None}
        row |= {"probs": p.tolist(), "true": classes[t] if t >= 0 else None}
        rows.append(row | ({"on_axis": bool(t < 0)} if quadrants else {}))
    return rows


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """A JSON object a key a line (each value on its line, compact: the C encoder, ~10x faster than indent=2)."""
    lines = (f"  {json.dumps(str(k))}: {json.dumps(v, allow_nan=False)}" for k, v in clean(obj).items())
    write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    # a missing figure is NaN; an epoch is a whole number, though a checkpoint's history holds it as a float
    cell = lambda k, v: f"{v:.0f}" if k == "epoch" else repr(float(v))  # noqa: E731
    lines = [",".join(METRIC_FIELDS)] + [",".join(cell(k, r.get(k, math.nan)) for k in METRIC_FIELDS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


@functools.cache
def versions() -> dict[str, str | None]:
    """What produced a run: the packages' versions, Python's, and quadnet's git commit in a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = dict.fromkeys(("quadnet", "torch", "numpy", "hydra-core", "omegaconf"))
    for p in out:  # (None: a checkout on PYTHONPATH, not installed)
        with contextlib.suppress(PackageNotFoundError):
            out[p] = version(p)
    out |= {"python": platform.python_version(), "git_commit": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if ((here := Path(__file__).resolve().parent.parent) / ".git").exists():
            git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
            out["git_commit"] = git.stdout.strip() or None
    return out
