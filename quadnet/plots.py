"""Every per-run plot: ``loss.png``, ``decision_regions.png`` and the training GIF.

Params are float64 NumPy arrays in the seed layout (W1 (2, H), b1 (H,), W2 (H, 4), b2 (4,));
predictions come from the NumPy reference (:func:`quadnet.engines.numpy.forward`), so no plot
needs torch. History rows are dicts with ``epoch, loss, train_accuracy, test_accuracy,
test_loss``; the losses are mean cross-entropy without the L2 term, and may be NaN.
matplotlib is imported inside the functions, so importing this module costs nothing.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.data import QUADRANT_NAMES, Dataset
from quadnet.engines.numpy import Params, forward
from quadnet.exits import unwritable

# Okabe–Ito colours (safe for colour-blind readers), one per class (the first four: quadrants I–IV),
# then matplotlib's tab10 for more classes; and pale versions of them for the regions, so that the
# points drawn in the full colour stand out.
OKABE_ITO = ["#e69f00", "#56b4e9", "#009e73", "#cc79a7", "#f0e442", "#0072b2", "#d55e00"]


def colors(classes: Sequence[Any]) -> np.ndarray:
    """A colour (n, 3) a class: the colours the labels name (red, blue, …), else a palette that
    repeats past 17 classes."""
    from matplotlib.colors import TABLEAU_COLORS, is_color_like, to_rgba_array

    named = all(isinstance(c, str) and is_color_like(c) for c in classes)
    every = to_rgba_array(classes if named else [*OKABE_ITO, *TABLEAU_COLORS.values()])[:, :3]
    return every[np.arange(len(classes)) % len(every)]


def class_names(data: Dataset) -> list[str]:
    """The key's name of each class, a long one cut in its middle (where labels differ, at one end or the other);
    a label's ``$`` drawn as itself, not as the start of mathtext."""
    named = [f"quadrant {q}" for q in QUADRANT_NAMES] if data.quadrants else [f"class {c}" for c in data.classes]
    return [(n if len(n) <= 40 else f"{n[:19]}…{n[-20:]}").replace("$", r"\$") for n in named]


WRONG = "#d00000"
HUGE = 1e100  # a loss beyond this is drawn as not finite: matplotlib's log axes overflow near the float range
MANY = 100  # with more points than this, markers are small and see-through
History = list[dict[str, float]]


@contextlib.contextmanager
def figure(path: Path | None, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """A new figure (figsize, dpi: 100 unless given; constrained layout) and its axes (the other arguments,
    Figure.subplots'), saved to path at 100 dpi after the block unless path is None."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize"), dpi=kwargs.pop("dpi", 100), layout="constrained")
    FigureCanvasAgg(fig)  # (no pyplot: no backend to choose, no display needed, no figure to close)
    try:
        with warnings.catch_warnings():  # (a diverged run's huge values overflow matplotlib's log scale)
            warnings.simplefilter("ignore", RuntimeWarning)
            yield fig, fig.subplots(*args, **kwargs)
            if path is not None:
                fig.savefig(path, dpi=100)
    except OSError as e:  # name the file (a full disk's error does not)
        raise unwritable(e, repr(str(path))) from None


def predict_class(params: Params, x: np.ndarray) -> np.ndarray:
    """The class index the net gives each point (N, D); -1 where its logits are not finite."""
    step = max(1, (1 << 22) // params["b1"].size)  # points at a time: a wide net's hidden layer in bounded memory
    with np.errstate(all="ignore"):
        scores = np.concatenate([forward(params, x[i : i + step])[0] for i in range(0, max(len(x), 1), step)])
    return np.where(np.isfinite(scores).all(axis=1), scores.argmax(axis=1), -1)


def plane(data: Dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Where the regions are drawn, in feature space: (origin (D,), directions (2, D), the axes' labels).
    Two features: their plane. More: the plane of the two leading principal components of the training
    points (as the net sees them: standardized where the run is), the other components at their mean."""
    if data.x_train.shape[1] == 2:  # (scaled: a feature's values are not as the file has them)
        return np.zeros(2), np.eye(2), [f"{f}{' (standardized)' * (data.shift is not None)}" for f in data.features]
    mean = data.x_train.mean(axis=0)
    _, spread, directions = np.linalg.svd(data.x_train - mean, full_matrices=False)
    share = spread[:2] ** 2 / (spread**2).sum()  # (NaN for points all alike: a warning the figure silences)
    return mean, directions[:2], [f"PC{i + 1} ({v:.0%} of variance)" for i, v in enumerate(share)]


def _regions_axes(ax: Any, params: Params, data: Dataset, n: int) -> tuple[Callable[[Params], Any], Any]:
    """Draw the regions over :func:`plane` (n × n), the axes lines, the points and the misclassified
    rings; return a function that draws other params' regions and rings (the GIF's frames) and
    returns (how many points it ringed, the test accuracy), and what it returned for params."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    origin, directions, labels = plane(data)
    x, y = np.concatenate([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test])
    xy = (x - origin) @ directions.T  # (for two features: the points themselves)
    lim, full = max(2.5, float(np.abs(xy).max()) * 1.15), colors(data.classes)
    grid = np.stack(np.meshgrid(*[np.linspace(-lim, lim, n)] * 2), axis=-1).reshape(-1, 2) @ directions + origin
    image = ax.imshow(np.ones((n, n, 3)), extent=(-lim, lim, -lim, lim), origin="lower")
    for border in (ax.axhline, ax.axvline) if data.quadrants else ():  # (other data's zero is no border)
        border(0, color="k", lw=0.6)
    size, alpha, ring = (12, 0.6, 30) if len(x) > MANY else (60, 1.0, 200)
    for points, truth, marker in zip(np.split(xy, [len(data.x_train)]), (data.y_train, data.y_test), "o^", strict=True):
        cols = np.where((truth >= 0)[:, None], full[truth.clip(0)], 0.5)
        ax.scatter(*points.T, c=cols, marker=marker, s=size, alpha=alpha, edgecolors="k", linewidths=0.4)
    rings = ax.scatter([], [], s=ring, facecolors="none", edgecolors=WRONG, linewidths=1.5)

    def draw(params: Params) -> tuple[int, float]:
        """The pale colour of the predicted class (white where it is undefined), and a ring round each point
        that has a class and is classified wrongly."""
        pred = predict_class(params, grid).reshape(n, n)
        image.set_data(np.where((pred >= 0)[..., None], (0.4 * full + 0.6)[pred.clip(0)], 1.0))
        right, test = predict_class(params, x) == y, (y >= 0) & (np.arange(len(y)) >= len(data.x_train))
        rings.set_offsets(xy[(y >= 0) & ~right].reshape(-1, 2))
        return len(rings.get_offsets()), float(right[test].mean()) if test.any() else np.nan

    drawn = draw(params)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel=labels[0], ylabel=labels[1], aspect="equal")
    handles = [Patch(fc=0.4 * c + 0.6, ec=c, label=n) for c, n in zip(full, class_names(data), strict=True)]
    keys = [("o", "train point", "0.5", "k"), ("^", "test point", "0.5", "k"), ("o", "misclassified", "none", WRONG)]
    keys = keys if drawn[0] else keys[:2]  # (a ring in the key only where there is one)
    handles += [Line2D([], [], marker=m, color="w", mfc=face, mec=edge, label=t) for m, t, face, edge in keys]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small", borderaxespad=0)
    return draw, drawn


def plot_regions(path: Path, params: Params, data: Dataset, title: str) -> None:
    """decision_regions.png: the predicted class over :func:`plane`, the points in their true
    class's colour (● train, ▲ test), misclassified ones ringed, and the test accuracy. The figure widens
    for a key of long names (beyond 16 characters), so that the axes keep their size."""
    with figure(path, figsize=(7.2 + 0.07 * (max([16, *map(len, class_names(data))]) - 16), 5.6)) as (_, ax):
        wrong, accuracy = _regions_axes(ax, params, data, 301)[1]
        n = f"{len(data.x_train) + len(data.x_test)} points (train and test)"
        ax.set_title(f"{title}\ntest accuracy {accuracy:.1%}; {wrong} of {n} misclassified", wrap=True)


def plot_confusion(path: Path, counts: np.ndarray, data: Dataset, title: str) -> None:
    """confusion.png: the test points of each true class (rows, with the share predicted right) by the
    class predicted (columns), each cell shaded by its share of its row and, up to 30 classes, its count."""
    n, share = len(counts), counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # (its diagonal: the accuracies)
    names = [name.split(" ", 1)[1] for name in class_names(data)]  # (as the data names them: the key's less its word)
    side, chars = min(1.5 + 0.45 * n, 20), max(map(len, names)) * 0.09  # (inches: the cells, a label's characters)
    with figure(path, figsize=(max(6.4, side + chars + 2), side + chars + 1.2)) as (fig, ax):
        fig.colorbar(ax.imshow(share, cmap="Blues", vmin=0, vmax=1), ax=ax, label="share of the true class's points")
        for (i, j), k in np.ndenumerate(counts if n <= 30 else np.empty((0, 0))):
            ax.text(j, i, k, ha="center", va="center", fontsize="small", color="w" if share[i, j] > 0.6 else "k")
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), [f"{name}: {r:.0%}" for name, r in zip(names, np.diag(share), strict=True)])
        ax.set(xlabel="predicted class", ylabel="true class: its share predicted right")
        fig.suptitle(f"{title}\n{np.trace(counts)} of {counts.sum()} test points right", fontsize="medium")


def _column(history: History, key: str) -> np.ndarray:
    """A column of the history, NaN where it is missing or beyond HUGE."""
    v = np.array([float(r.get(key, np.nan)) for r in history])
    return np.where(np.abs(v) <= HUGE, v, np.nan)


def _lines(ax: Any, history: History, keys: tuple[str, str, str]) -> list[Any]:
    """The train (solid), test (dashed) and validation (dotted; where the run has a validation split)
    columns `keys` against epochs, each logged point marked (where a curve is only its points joined);
    returns the lines."""
    style = dict(marker="o", ms=4) if len(history) < 30 else dict(marker=".", ms=3) if len(history) <= 300 else {}
    epochs, has_val = _column(history, "epoch"), np.isfinite(_column(history, keys[2])).any()
    kinds = [*zip(keys, ("train", "test", "validation"), ("-", "--", ":"), strict=True)][: 3 if has_val else 2]
    return [ax.plot(epochs, _column(history, k), ls=ls, label=label, **style)[0] for k, label, ls in kinds]


def _loss_axes(ax: Any, history: History) -> list[Any]:
    """Train, test and validation loss against epochs (log y when positive); returns the lines."""
    from matplotlib.ticker import LogFormatter

    lines = _lines(ax, history, ("loss", "test_loss", "val_loss"))
    if len(bad := _column(history, "epoch")[~np.isfinite(_column(history, "loss"))]):  # a diverged run: mark where
        ax.axvline(bad[0], color=WRONG, ls=":", label=f"over {HUGE:g} or not finite from epoch {bad[0]:g}")
    if (np.concatenate([line.get_ydata() for line in lines]) > 0).any():  # (NaN where not finite, or beyond HUGE)
        ax.set_yscale("log")  # (a span of a decade or two holds one or two powers of ten: label the ticks between)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
    ax.set(xlabel="epoch", ylabel="cross-entropy (without the L2 term)", title="loss")
    ax.legend(fontsize="small")
    return lines


def plot_curves(path: Path, history: History, title: str) -> None:
    """loss.png: train, test and validation loss (log scale) and accuracy against epochs."""
    last = history[-1] if history else {}
    ends = {k: float(last.get(k, np.nan)) for k in ("loss", "test_loss", "test_accuracy")}
    num = {k: format(v, ".1%" if "acc" in k else ".4g") if np.isfinite(v) else "not finite" for k, v in ends.items()}
    figures = f"train loss {num['loss']}, test loss {num['test_loss']}, test accuracy {num['test_accuracy']}"
    with figure(path, 1, 2, figsize=(10, 4.2), sharex=True) as (fig, (ax_loss, ax_acc)):
        _loss_axes(ax_loss, history)
        _lines(ax_acc, history, ("train_accuracy", "test_accuracy", "val_accuracy"))
        ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(-0.05, 1.05), title="accuracy")
        ax_acc.legend(fontsize="small")
        fig.suptitle(f"{title}\nat epoch {last.get('epoch', 0):g}: {figures}")


def animate(path: Path, frames: list[tuple[int, Params]], history: History, data: Dataset, title: str) -> None:
    """A GIF of training: the decision regions (left) and the loss up to each frame's epoch
    (right). One small figure is laid out and drawn once; each frame redraws only what moves."""
    from PIL import Image

    if not frames:
        raise ValueError("animate needs at least one frame")
    # ax: the decision regions; ax_loss: the loss
    with figure(None, 1, 2, figsize=(9, 3.6), width_ratios=(1.35, 1), dpi=80) as (fig, (ax, ax_loss)):
        draw = _regions_axes(ax, frames[0][1], data, 120)[0]
        lines = _loss_axes(ax_loss, history)  # full curves first, so the axes' limits fit all of training
        ax_loss.set_xscale("symlog", linthresh=1)  # (log-spaced frames: each moves the curve on)
        ax_loss.set_xlim(left=0)
        now = ax_loss.axvline(0, color="0.5", lw=0.8)
        fig.suptitle(title, fontsize="medium")
        ax.set_title("epoch 0: test accuracy 100.0%", fontsize="medium")
        # Blitting: draw the still parts (ticks, labels, legends) once, then per frame only what moves.
        moving = [*ax.images, *ax.collections, *ax.lines, *ax.spines.values(), ax.title, *lines, now]
        for a in moving:
            a.set_animated(True)
        fig.canvas.draw()
        background = fig.canvas.copy_from_bbox(fig.bbox)
        rgb, curves = [], [line.get_data() for line in lines]  # the full curves, cut at each frame
        for epoch, params in frames:
            accuracy = draw(params)[1]
            for line, (epochs, losses) in zip(lines, curves, strict=True):
                line.set_data(epochs[epochs <= epoch], losses[epochs <= epoch])
            now.set_xdata([epoch, epoch])
            ax.set_title(f"epoch {epoch}: test accuracy {accuracy:.1%}", fontsize="medium")
            fig.canvas.restore_region(background)
            for a in sorted(moving, key=lambda a: a.get_zorder()):
                fig.draw_artist(a)
            rgb.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    # one palette for every frame, from the first and the last (no flicker, colours stay true)
    palette = Image.fromarray(np.concatenate([rgb[0], rgb[-1]])).quantize(255)
    gif = [Image.fromarray(a).quantize(palette=palette, dither=Image.Dither.NONE) for a in rgb]
    hold = [120] * (len(gif) - 1) + [2000]  # ms a frame: the last held
    gif[0].save(path, format="GIF", save_all=True, append_images=gif[1:], duration=hold, loop=0)
