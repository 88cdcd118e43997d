"""What a run leaves in its dir: metrics.csv, summary.json, and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.checkpoint import atomic_write

METRIC_FIELDS = ("epoch", "loss", "train_accuracy", "test_accuracy")


def clean(obj: Any) -> Any:
    """JSON-safe copy: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_metric(summary: dict[str, Any], name: str) -> float | None:
    """A figure of a completed run's summary (test_error is 1 − test_accuracy); None otherwise."""
    if summary.get("status") != "completed":
        return None
    if name == "test_error":
        acc = summary.get("test_accuracy")
        value = None if acc is None else 1 - acc
    else:
        value = summary.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def prediction_rows(points: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """Per point (N, 2): the predicted quadrant 1–4 (None if probs are not finite), the
    probabilities, the true quadrant (None on an axis) and whether it lies on an axis."""
    from quadnet.data import quadrant_class

    return [
        {
            "point": pt.tolist(),
            "quadrant": int(np.argmax(p)) + 1 if np.isfinite(p).all() else None,
            "probs": p.tolist(),
            "true_quadrant": int(t) + 1 if t >= 0 else None,
            "on_axis": bool(t < 0),
        }
        for pt, p, t in zip(points, probs, quadrant_class(points), strict=True)
    ]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(clean(obj), indent=2) + "\n")


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in METRIC_FIELDS})
    write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(path: Path, rows: list[dict[str, float]], title: str) -> None:
    """loss.png: the training loss (log scale) and train/test accuracy against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(epochs, [r["loss"] for r in rows], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax_acc.plot(epochs, [r["test_accuracy"] for r in rows], label="test", linestyle="--")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(-0.05, 1.05), title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_regions(
    path: Path,
    logits: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    title: str,
) -> None:
    """decision_regions.png: the predicted quadrant over the plane, with the data points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    pts = np.concatenate([x_train, x_test])
    lim = max(2.5, float(np.abs(pts).max()) * 1.15)
    grid = np.linspace(-lim, lim, 301)
    gx, gy = np.meshgrid(grid, grid)
    pred = logits(np.column_stack([gx.ravel(), gy.ravel()])).argmax(axis=1).reshape(gx.shape)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    fig, ax = plt.subplots(figsize=(6, 6), constrained_layout=True)
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5, 2.5, 3.5], cmap=ListedColormap(colors), alpha=0.35)
    ax.axhline(0, color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    for pts_, ys, marker, label in ((x_train, y_train, "o", "train"), (x_test, y_test, "^", "test")):
        cols = [colors[c] if c >= 0 else "k" for c in ys]
        ax.scatter(pts_[:, 0], pts_[:, 1], c=cols, marker=marker, edgecolors="k", s=50, label=label)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="x", ylabel="y", aspect="equal", title=title)
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)
