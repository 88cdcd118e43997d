"""The points a run trains and tests on, as float64 NumPy arrays, and the classes they fall in.

The quadrant data (``seed``, ``sampled``) has the classes 1-4, the quadrants I-IV; a point's
class index is its quadrant minus one. A CSV of your own points (``data=csv``) has the classes
its labels name: every distinct label, sorted (numbers as numbers), so 0-3 and 1-4 both work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from quadnet.config import ConfigError, DataConfig, user_path

QUADRANTS = (1, 2, 3, 4)
QUADRANT_NAMES = ("I", "II", "III", "IV")

# The seed article's data: one training point per quadrant, and the test points
# it asks about afterwards.
SEED_TRAIN = np.array([[2, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
SEED_TEST = np.array([[2, 2], [-2, 2], [-2, -2], [2, -2]], dtype=np.float64)

Label = int | str


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # (N_train, 2) float64
    y_train: np.ndarray  # (N_train,) int64: the index of each point's class (-1: on an axis, no quadrant)
    x_test: np.ndarray  # (N_test, 2) float64
    y_test: np.ndarray  # (N_test,) int64
    classes: tuple[Label, ...] = QUADRANTS  # the label of each class index
    quadrants: bool = True  # the classes are the quadrants: any point has a true one (on an axis, none)
    config: DataConfig = field(default_factory=DataConfig)  # what made it (a CSV's paths absolute)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @functools.cached_property
    def digest(self) -> str:
        """The data's identity: a hash of its points, labels and classes (a resume checks it)."""
        h = hashlib.sha256(repr(self.classes).encode())
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def quadrant_class(points: np.ndarray) -> np.ndarray:
    """Class 0..3 of each point (N, 2); -1 for a point on an axis, which has no quadrant."""
    x, y = points[:, 0], points[:, 1]
    cls = np.where(x > 0, np.where(y > 0, 0, 3), np.where(y > 0, 1, 2))
    return np.where((x == 0) | (y == 0), -1, cls).astype(np.int64)


def _sample(rng: np.random.Generator, n: int, extent: float, margin: float) -> np.ndarray:
    """n points uniform in the square [-extent, extent]² minus the band |x|<margin or |y|<margin."""
    pts = rng.uniform(margin, extent, size=(n, 2)) * rng.choice(np.array([-1.0, 1.0]), size=(n, 2))  # magnitude, sign
    # margin=0 can still (with probability ~0) give an exact zero; nudge it off the axis.
    pts[pts == 0] = np.finfo(np.float64).tiny
    return pts


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# a whole-number label, in ASCII digits ("²" is a digit to str.isdigit, not to int) that int() reads
_INTEGER = re.compile(r"[+-]?[0-9]{1,4000}")


def read_csv(path: str, key: str) -> tuple[np.ndarray, list[Label]]:
    """Points (N, 2) and their labels from a file of ``x,y,label`` lines (a header line and ``#``
    comments are skipped; a label is a whole number or a word). Raises :class:`ConfigError`
    with the line at fault."""
    if (file := user_path(path)).exists() and not file.is_file():  # (/dev/zero would never end)
        raise ConfigError(f"{key}={path!r} is not a regular file: give a file of x,y,label lines")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # (a BOM is not data)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise ConfigError(f"{key}={path!r} cannot be read: {reason}") from None
    points, labels, header = [], [], False
    for i, line in enumerate(lines, 1):
        parts = [p.strip() for p in line.split("#", 1)[0].split(",")]
        if parts == [""]:
            continue  # a blank line or a comment
        xy = [_number(p) for p in parts[:2]]
        if len(parts) != 3 or not parts[2] or None in xy or not np.isfinite(xy).all():
            if not points and not header and xy[0] is None:
                header = True
                continue  # a header line (before the first point)
            why = "two finite numbers and a label (one header line may come first)"
            raise ConfigError(f"{key}={path!r} line {i}: {line.strip()!r} is not x,y,label: {why}")
        points.append(xy)
        labels.append(int(parts[2]) if _INTEGER.fullmatch(parts[2]) else parts[2])
    if not points:
        raise ConfigError(f"{key}={path!r} holds no x,y,label lines")
    return np.array(points), labels


def _classes(*label_lists: list[Label]) -> tuple[Label, ...]:
    """Every distinct label, sorted: numbers as numbers (all of them, or none, are numbers)."""
    found = {lab for labels in label_lists for lab in labels}
    if len(found) < 2:
        raise ConfigError(f"data.path holds one class only ({', '.join(map(str, found))}): a classifier needs two")
    return tuple(sorted(found, key=lambda lab: (isinstance(lab, str), str(lab) if isinstance(lab, str) else lab)))


def make_dataset(cfg: DataConfig) -> Dataset:
    """The data of a config. A run makes it once and hands it down."""
    if cfg.name == "seed":
        return Dataset(SEED_TRAIN, quadrant_class(SEED_TRAIN), SEED_TEST, quadrant_class(SEED_TEST), config=cfg)
    if cfg.name == "csv":
        x, labels = read_csv(str(cfg.path), "data.path")
        if cfg.test_path:
            x_test, test_labels = read_csv(cfg.test_path, "data.test_path")
        else:
            test = np.random.default_rng(cfg.seed).permutation(len(x))[: len(x) // 5]
            train = np.setdiff1d(np.arange(len(x)), test)
            if not len(test) or not len(train):
                raise ConfigError(
                    f"data.path={cfg.path!r} has too few points to hold out a test set; add data.test_path"
                )
            x, labels, x_test, test_labels = x[train], [labels[i] for i in train], x[test], [labels[i] for i in test]
        classes = _classes(labels, test_labels)
        index = {lab: i for i, lab in enumerate(classes)}
        y, y_test = (np.array([index[lab] for lab in ls], dtype=np.int64) for ls in (labels, test_labels))
        paths = {k: str(user_path(v).absolute()) for k in ("path", "test_path") if (v := getattr(cfg, k))}
        return Dataset(x, y, x_test, y_test, classes, quadrants=False, config=dataclasses.replace(cfg, **paths))
    rng = np.random.default_rng(cfg.seed)
    x_train, x_test = (_sample(rng, n, cfg.extent, cfg.margin) for n in (cfg.n_train, cfg.n_test))  # (in this order)
    return Dataset(x_train, quadrant_class(x_train), x_test, quadrant_class(x_test), config=cfg)
