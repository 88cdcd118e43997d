"""What a run leaves in its dir: metrics.csv and summary.json (the plots are in quadnet.plots)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.checkpoint import atomic_write

METRIC_FIELDS = ("epoch", "loss", "train_accuracy", "test_accuracy", "test_loss")


def clean(obj: Any) -> Any:
    """JSON-safe copy: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(obj, np.ndarray | np.generic):
        obj = obj.tolist()  # nested lists, or a Python scalar
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_metric(summary: dict[str, Any], name: str) -> float | None:
    """A figure of a completed run's summary (test_error is 1 − test_accuracy); None otherwise."""
    if summary.get("status") != "completed":
        return None
    value = summary.get("test_accuracy" if name == "test_error" else name)
    try:
        if value is None or not math.isfinite(value):
            return None
        return 1 - float(value) if name == "test_error" else float(value)
    except (TypeError, ValueError, OverflowError):  # a damaged summary
        return None


def prediction_rows(points: np.ndarray, probs: np.ndarray, classes: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per point (N, 2): the predicted class 1–4 (None if probs are not finite), the probabilities,
    the true class (the data's label; without labels the point's quadrant, None on an axis) and
    whether it lies on an axis."""
    from quadnet.data import quadrant_class

    return [
        {
            "point": pt.tolist(),
            "quadrant": int(np.argmax(p)) + 1 if np.isfinite(p).all() else None,
            "probs": p.tolist(),
            "true_quadrant": int(t) + 1 if t >= 0 else None,
            "on_axis": bool(t < 0),
        }
        for pt, p, t in zip(points, probs, quadrant_class(points) if classes is None else classes, strict=True)
    ]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(clean(obj), indent=2) + "\n")


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    # a missing figure is NaN (0.1 checkpoints: no test_loss); other keys of a row are not written
    writer = csv.DictWriter(buf, METRIC_FIELDS, restval=math.nan, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
