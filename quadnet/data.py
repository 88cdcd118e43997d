"""The points a run trains and tests on, as float64 NumPy arrays.

Classes are quadrants minus one: 0 = I (x>0, y>0), 1 = II, 2 = III, 3 = IV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quadnet.config import DataConfig

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
    magnitude = rng.uniform(margin, extent, size=(n, 2))
    sign = rng.choice(np.array([-1.0, 1.0]), size=(n, 2))
    pts = magnitude * sign
    # margin=0 can still (with probability ~0) give an exact zero; nudge it off the axis.
    pts[pts == 0] = np.finfo(np.float64).tiny
    return pts


def make_dataset(cfg: DataConfig) -> Dataset:
    if cfg.name == "seed":
        return Dataset(SEED_TRAIN, quadrant_class(SEED_TRAIN), SEED_TEST, quadrant_class(SEED_TEST))
    rng = np.random.default_rng(cfg.seed)
    x_train = _sample(rng, cfg.n_train, cfg.extent, cfg.margin)
    x_test = _sample(rng, cfg.n_test, cfg.extent, cfg.margin)
    return Dataset(x_train, quadrant_class(x_train), x_test, quadrant_class(x_test))
