"""The points a run trains and tests on, as float64 NumPy arrays.

Classes are quadrants minus one: 0 = I (x>0, y>0), 1 = II, 2 = III, 3 = IV. A CSV of your
own points (``data=csv``) may label them any way, with the same four labels 1-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadnet.config import ConfigError, DataConfig, user_path

NUM_CLASSES = 4
QUADRANT_NAMES = ("I", "II", "III", "IV")

# The seed article's data: one training point per quadrant, and the test points
# it asks about afterwards.
SEED_TRAIN = np.array([[2, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
SEED_TEST = np.array([[2, 2], [-2, 2], [-2, -2], [2, -2]], dtype=np.float64)


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # (N_train, 2) float64
    y_train: np.ndarray  # (N_train,) int64, class 0..3
    x_test: np.ndarray  # (N_test, 2) float64
    y_test: np.ndarray  # (N_test,) int64, class 0..3


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


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_csv(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 2) and classes 0..3 from a file of ``x,y,label`` lines (label 1-4; a header
    line and ``#`` comments are skipped). Raises :class:`ConfigError` with the line at fault."""
    try:
        lines = user_path(path).read_text(encoding="utf-8-sig").splitlines()  # (a BOM is not data)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise ConfigError(f"{key}={path!r} cannot be read: {reason}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        parts = [p.strip() for p in line.split("#", 1)[0].split(",")]
        if parts == [""]:
            continue  # a blank line or a comment
        try:
            x, y, label = float(parts[0]), float(parts[1]), int(parts[2])
            assert len(parts) == 3 and np.isfinite([x, y]).all() and 1 <= label <= NUM_CLASSES
        except (ValueError, IndexError, AssertionError):
            if i == 1 and not _is_number(parts[0]):
                continue  # a header line
            raise ConfigError(f"{key}={path!r} line {i}: {line.strip()!r} is not x,y,label with label 1-4") from None
        rows.append((x, y, label - 1))
    if not rows:
        raise ConfigError(f"{key}={path!r} holds no x,y,label lines")
    arr = np.array(rows)
    return arr[:, :2].copy(), arr[:, 2].astype(np.int64)


def make_dataset(cfg: DataConfig) -> Dataset:
    if cfg.name == "seed":
        return Dataset(SEED_TRAIN, quadrant_class(SEED_TRAIN), SEED_TEST, quadrant_class(SEED_TEST))
    if cfg.name == "csv":
        x, y = read_csv(str(cfg.path), "data.path")
        if cfg.test_path:
            return Dataset(x, y, *read_csv(cfg.test_path, "data.test_path"))
        test = np.random.default_rng(cfg.seed).permutation(len(x))[: len(x) // 5]
        train = np.setdiff1d(np.arange(len(x)), test)
        if not len(test) or not len(train):
            raise ConfigError(f"data.path={cfg.path!r} has too few points to hold out a test set; add data.test_path")
        return Dataset(x[train], y[train], x[test], y[test])
    rng = np.random.default_rng(cfg.seed)
    x_train, x_test = (_sample(rng, n, cfg.extent, cfg.margin) for n in (cfg.n_train, cfg.n_test))  # (in this order)
    return Dataset(x_train, quadrant_class(x_train), x_test, quadrant_class(x_test))
