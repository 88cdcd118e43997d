"""The points a run trains and tests on, as float64 NumPy arrays, and the classes they fall in.

The quadrant data (``seed``, ``sampled``) has the classes 1-4, the quadrants I-IV; a point's
class index is its quadrant minus one. A CSV of your own points (``data=csv``) has the classes
its labels name: every distinct label, sorted (numbers as numbers), so 0-3 and 1-4 both work.
"""

import functools
import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple

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
    """A run's points, already scaled (see :meth:`scaled`), and their class indices."""

    x_train: np.ndarray  # (N_train, D) float64
    y_train: np.ndarray  # (N_train,) int64: the index of each point's class (-1: on an axis, no quadrant)
    x_test: np.ndarray  # (N_test, D) float64
    y_test: np.ndarray  # (N_test,) int64
    classes: tuple[Label, ...] = QUADRANTS  # the label of each class index
    quadrants: bool = True  # the classes are the quadrants: any point has a true one (on an axis, none)
    config: DataConfig = field(default_factory=DataConfig)  # what made it (a CSV's paths absolute)
    # (N_val, D): what sweeps select on; N_val may be 0
    x_val: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))
    y_val: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    features: tuple[str, ...] = ("x", "y")  # the columns' names
    label: str = "label"  # the label's column (predict reads true labels from it)
    shift: np.ndarray | None = None  # standardization from the training split: x = (raw - shift) / scale
    scale: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(points, labels) of the training, test and validation splits, in this order."""
        return [(self.x_train, self.y_train), (self.x_test, self.y_test), (self.x_val, self.y_val)]

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Points (N, D) as the net sees them, as they were in the data (standardization undone)."""
        return x if self.shift is None or self.scale is None else x * self.scale + self.shift

    @functools.cached_property
    def digest(self) -> str:
        """The data's identity: a hash of its points, labels, classes and scaling (a resume checks it)."""
        h = hashlib.sha256(repr(self.classes).encode())
        extra = (self.x_val, self.y_val) if len(self.y_val) else ()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test, *extra, self.shift, self.scale):
            h.update(b"" if a is None else np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def quadrant_class(points: np.ndarray) -> np.ndarray:
    """Class 0..3 of each point (N, 2); -1 for a point on an axis, which has no quadrant."""
    x, y = points[:, 0], points[:, 1]
    cls = np.where(x > 0, np.where(y > 0, 0, 3), np.where(y > 0, 1, 2))
    return np.where((x == 0) | (y == 0), -1, cls).astype(np.int64)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# a whole-number label, in ASCII digits ("²" is a digit to str.isdigit, not to int) that int() reads
_INTEGER = re.compile(r"[+-]?[0-9]{1,4000}")


class Table(NamedTuple):
    x: np.ndarray  # (N, D) float64
    labels: list[Label]
    features: list[str]  # the columns of x
    label: str  # the label's column
    columns: list[str]  # the file's, as its header names them (or by position)


def read_csv(path: str, key: str, label: str | None = None, features: list[str] | None = None,
             columns: list[str] | None = None) -> Table:  # fmt: skip
    """Feature rows (N, D) and their labels from a table of numbers with a label column. A header
    line naming the columns may come first (without one they are x, y, label, or x1..xD, label);
    the label is column ``label`` (else the header's ``label``, else the last), the features are
    ``features`` (else every other column), ``#`` starts a comment. A label is a whole number or a
    word. Raises :class:`ConfigError` naming the line or column at fault."""
    if (file := user_path(path)).exists() and not file.is_file():  # (/dev/zero would never end)
        raise ConfigError(f"{key}={path!r} is not a regular file: give a CSV file of numbers and a label")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # (a BOM is not data)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise ConfigError(f"{key}={path!r} cannot be read: {reason}") from None
    rows = [(i, [p.strip() for p in text.split("#", 1)[0].split(",")]) for i, text in enumerate(lines, 1)]
    rows = [(i, parts) for i, parts in rows if parts != [""]]  # (blank lines and comments)
    if not rows:
        raise ConfigError(f"{key}={path!r} holds no rows")
    names, width = rows[0][1], len(rows[0][1])
    if all(_number(p) is not None for p in names[:-1]):  # no header: columns (a training file's) or by position
        positional = ["x", "y", "label"] if width == 3 else [*(f"x{d}" for d in range(1, width)), "label"]
        names = columns if columns is not None and len(columns) == width else positional
    else:
        rows = rows[1:]
    where = f"the columns of {key}={path!r} are {', '.join(names)}"
    if width < 2:
        first = lines[rows[0][0] - 1].strip()
        raise ConfigError(f"{key}={path!r} line {rows[0][0]}: {first!r} is not comma-separated numbers and a label")
    if len(set(names)) < width:
        raise ConfigError(f"{where}: give each column its own name")
    label = label or ("label" if "label" in names else names[-1])
    if features and len(set(features)) < len(features):
        why = "name each column once, or null (or []) for every column but the label"
        raise ConfigError(f"data.features=[{','.join(features)}] is not allowed: {why}")
    picked = list(features) if features else [n for n in names if n != label]
    if missing := [name for name in (label, *picked) if name not in names]:
        raise ConfigError(f"{missing[0]!r} is not a column: {where}")
    if label in picked:
        raise ConfigError(f"{label!r} is the label: it cannot be a feature too ({where})")
    cols, at = [names.index(n) for n in picked], names.index(label)
    points, labels = [], []
    for i, parts in rows:
        values = [_number(parts[c]) for c in cols] if len(parts) == width else [None]
        if None in values or not np.isfinite(values).all() or not parts[at]:
            words = [names[c] for c in cols if len(parts) == width and parts[c] and _number(parts[c]) is None]
            why = f"finite numbers for {', '.join(picked)} and a label"
            why = f"column {words[0]!r} holds a word: if it is the label, give data.label={words[0]}" if words else why
            raise ConfigError(f"{key}={path!r} line {i}: {lines[i - 1].strip()!r} is not {','.join(names)}: {why}")
        points.append(values)
        lab, whole = parts[at], _INTEGER.fullmatch(parts[at])
        if not whole and lab.isascii() and _number(lab) is not None:  # (1.5: a feature's column, more likely)
            raise ConfigError(f"{key}={path!r} line {i}: label {lab!r} is a number but not whole in digits ({where})")
        labels.append(int(lab) if whole else lab)
    if not points:
        raise ConfigError(f"{key}={path!r} holds a header and no rows")
    return Table(np.array(points, dtype=np.float64), labels, picked, label, names)


def _held_out(x: np.ndarray, labels: list[Label], n: int, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """n random rows of a table, and the rest in their order: (rows, labels) each."""
    out = rng.permutation(len(x))[:n]
    keep = np.setdiff1d(np.arange(len(x)), out)
    return (x[keep], [labels[i] for i in keep]), (x[out], [labels[i] for i in out])


def make_dataset(cfg: DataConfig) -> Dataset:
    """The data of a config. A run makes it once and hands it down."""
    if cfg.name == "seed":
        return Dataset(SEED_TRAIN, quadrant_class(SEED_TRAIN), SEED_TEST, quadrant_class(SEED_TEST), config=cfg)
    rng = np.random.default_rng(cfg.seed)
    if cfg.name == "sampled":  # (the validation points are drawn last, so train and test are as before)
        sizes = (cfg.n_train, cfg.n_test, round(cfg.val_fraction * cfg.n_train))
        # uniform in [-extent, extent]² minus the band |x|<margin or |y|<margin: a magnitude, then a sign
        draws = [rng.uniform(cfg.margin, cfg.extent, (n, 2)) * rng.choice(np.array([-1.0, 1.0]), (n, 2)) for n in sizes]
        # margin=0 can still (with probability ~0) give an exact zero; nudge it off the axis.
        x_train, x_test, x_val = (np.where(x == 0, np.finfo(np.float64).tiny, x) for x in draws)
        ys = [quadrant_class(x) for x in (x_train, x_test, x_val)]
        data = Dataset(x_train, ys[0], x_test, ys[1], config=cfg, x_val=x_val, y_val=ys[2])
        return _standardized(data) if cfg.standardize else data
    t = read_csv(str(cfg.path), "data.path", cfg.label, cfg.features)
    # (the other files' columns by the training file's names: by position without a header)
    read = lambda key: read_csv(str(getattr(cfg, key)), f"data.{key}", t.label, t.features, t.columns)[:2]  # noqa: E731
    train, test = (t[:2], read("test_path")) if cfg.test_path else _held_out(t.x, t.labels, len(t.x) // 5, rng)
    n_val = round(cfg.val_fraction * len(train[0]))
    train, val = (train, read("val_path")) if cfg.val_path else _held_out(*train, n_val, rng)
    for key, split in (("test_path", test), ("val_path", val)):  # (a random split may hold a rare class alone)
        if getattr(cfg, key) and (unseen := set(split[1]) - set(train[1])):
            raise ConfigError(f"data.{key} has labels the training rows have not: {', '.join(map(str, unseen))}")
    if not len(train[0]) or not len(test[0]):
        raise ConfigError(f"data.path={cfg.path!r} has too few rows for a test and a training set: add data.test_path")
    # the classes: every distinct label, sorted; numbers as numbers (all of them, or none, are numbers)
    if len(found := {lab for split in (train, test, val) for lab in split[1]}) < 2:
        raise ConfigError(f"data.path holds one class only ({', '.join(map(str, found))}): a classifier needs two")
    classes = tuple(sorted(found, key=lambda lab: (isinstance(lab, str), str(lab) if isinstance(lab, str) else lab)))
    index = {lab: i for i, lab in enumerate(classes)}
    y, y_test, y_val = (np.array([index[lab] for lab in split[1]], dtype=np.int64) for split in (train, test, val))
    paths = {k: str(user_path(v).absolute()) for k in ("path", "test_path", "val_path") if (v := getattr(cfg, k))}
    data = Dataset(train[0], y, test[0], y_test, classes, False, replace(cfg, **paths), val[0], y_val,
                   tuple(t.features), label=t.label)  # fmt: skip
    return data if cfg.standardize is False else _standardized(data)


def _standardized(data: Dataset) -> Dataset:
    """Each feature shifted and scaled to mean 0 and spread 1 on the training split (a constant one: 1)."""
    with np.errstate(all="ignore"):  # (values near 1e308 overflow: refused below, in one line)
        shift, spread = data.x_train.mean(0), data.x_train.std(0)
        scale = np.where(spread > 0, spread, 1.0)
        x = {k: (getattr(data, k) - shift) / scale for k in ("x_train", "x_test", "x_val")}
    if (bad := ~np.isfinite(np.vstack([*x.values(), shift, scale])).all(0)).any():
        raise ConfigError(f"{data.features[np.argmax(bad)]!r} is too big to standardize: data.standardize=false")
    return replace(data, **x, shift=shift, scale=scale)
