"""Checkpoints: NumPy ``.npz`` files, written atomically, read without unpickling, checked before use.

``checkpoint.npz`` holds one job's whole training state: ``params/<W1|b1|W2|b2>`` (the seed
layout, float64), ``optimizer/<buffer>/<param>``, ``history`` (a row per log point, columns
:data:`~quadnet.artifacts.METRIC_FIELDS`) and ``meta``, a JSON string with the format, epoch,
optimizer step, status, classes and resolved config. ``np.load(path)`` reads it without torch,
and ``allow_pickle=False`` means a crafted file cannot run code. For a completed run it is the
model (``predict`` and ``quadnet.load`` read it). Only those members are read, each after its
``.npy`` header is checked against the shape its meta implies, so a header that declares a huge
array or an extra member (a zip bomb) costs nothing.
"""

import json
import math
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from quadnet.artifacts import METRIC_FIELDS, atomic_write
from quadnet.config import ConfigError, TrainConfig, flatten, to_dict, user_path, validate
from quadnet.model import shapes

FORMAT = "quadnet-checkpoint/3"
CHECKPOINT = "checkpoint.npz"
META_CHARS = 1 << 20  # a checkpoint's meta (its config and labels) is far shorter; a longer one is not read
BUFFERS = 2  # the most buffers an update rule keeps (Adam's two); without importing torch to ask quadnet.optim


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. Its message is one line, for the user."""


def arrays(state: dict[str, Any], *, epoch: int, config: dict, status: str, history: list, data: Any) -> dict:
    """One job's checkpoint as the arrays it is saved as (state: params, optimizer buffers, step);
    data: its :class:`~quadnet.data.Dataset`, whose classes and identity are kept."""
    out = {f"params/{k}": v for k, v in state["params"].items()}
    out |= {f"optimizer/{n}/{k}": v for n, b in state.get("optimizer", {}).items() for k, v in b.items()}
    rows = [[r.get(f, math.nan) for f in METRIC_FIELDS] for r in history]
    out["history"] = np.array(rows).reshape(-1, len(METRIC_FIELDS))
    return out | {"meta": np.array(meta(state, epoch=epoch, config=config, status=status, data=data))}


def meta(state: dict[str, Any], *, epoch: int, config: dict, status: str, data: Any) -> str:
    """A checkpoint's meta, JSON: what a job's weights are (its config, classes, features, scaling)."""
    m = {"format": FORMAT, "epoch": int(epoch), "step": int(state.get("step", epoch)), "status": status}
    m |= {"classes": list(data.classes), "data_sha256": data.digest, "config": config}
    m |= {"features": list(data.features), "label": data.label}
    m |= {k: None if getattr(data, k) is None else getattr(data, k).tolist() for k in ("shift", "scale")}
    return json.dumps(m)


def of(job: Any, status: str, data: Any) -> dict[str, np.ndarray]:
    """The arrays of a job of the training loop (:class:`quadnet.loop.Job`) as it stands."""
    return arrays(job.state, epoch=job.epoch, config=to_dict(job.cfg), status=status, history=job.history, data=data)


def save(path: Path, obj: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **obj)

    atomic_write(path, write)


def in_dir(folder: Path) -> Path | None:
    """The checkpoint a run dir holds, or None."""
    return folder / CHECKPOINT if (folder / CHECKPOINT).is_file() else None


def find(path: str | Path) -> Path:
    """A run dir → its checkpoint; a file → itself (a path as the user gave it: config.user_path)."""
    p = user_path(str(path))
    if p.is_dir():
        if (found := in_dir(p)) is None:
            pt = any((p / n).is_file() for n in ("checkpoint.pt", "model.pt"))
            old = " (a quadnet 0.1/0.2 .pt checkpoint: convert it as the README's changelog says)" * pt
            raise CheckpointError(f"{str(p)!r} holds no {CHECKPOINT}{old}")
        return found
    if not p.is_file():  # (a FIFO would block the read)
        why = "is not a quadnet checkpoint (not a regular file)" if p.exists() else "does not exist"
        raise CheckpointError(f"{str(p)!r} {why}; give a run dir or a checkpoint file")
    return p


def _member(z: zipfile.ZipFile, name: str, where: str, fits: Callable[..., bool], bad: str) -> np.ndarray:
    """The array `name`, its .npy header checked by ``fits(shape, dtype)`` before any of its data is read
    (a header may declare any size); CheckpointError(where + bad) when it is missing or does not fit."""
    try:
        info = z.getinfo(f"{name}.npy")
    except KeyError:
        raise CheckpointError(where + bad) from None
    with z.open(info) as f:
        header = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}
        shape, _, dtype = header[npformat.read_magic(f)](f)  # (KeyError: a version no checkpoint has)
        if dtype.hasobject:  # an object array would be unpickled
            raise CheckpointError(f"refused {where}: its {name} holds objects other than arrays")
        if not fits(shape, dtype) or any(d < 0 for d in shape):
            raise CheckpointError(where + bad)
        f.seek(0)  # (what it declares, checked: read_array reads that much and no more)
        return npformat.read_array(f, allow_pickle=False)


def _meta(meta: np.ndarray, where: str) -> tuple[dict[str, Any], TrainConfig]:
    """The checkpoint's meta and its config, checked."""
    try:
        m = json.loads(str(meta))
    except (ValueError, RecursionError):
        m = None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a quadnet checkpoint (expected format {FORMAT})")
    try:
        cfg = validate(m.get("config"))  # type: ignore[arg-type]
    except ConfigError as e:
        raise CheckpointError(f"{where} has a bad config: {e}") from None
    for name, v in (("epoch", m.get("epoch")), ("optimizer step", m.get("step"))):
        if type(v) is not int or v < 0:
            raise CheckpointError(f"{where} has a bad {name} {v!r}: must be an integer >= 0")
    classes = m.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, int | str) for c in classes):
        raise CheckpointError(f"{where} has bad classes {classes!r}: a list of two labels or more")
    m = {"features": ["x", "y"], "label": "label", "shift": None, "scale": None} | m  # (before 0.5: x, y unscaled)
    names, d = m["features"], len(m["features"]) if isinstance(m["features"], list) else 0

    def numbers(v: Any, low: float) -> bool:  # (one a feature, above low and far from overflow: nan is none)
        return isinstance(v, list) and len(v) == d and all(type(x) in (int, float) and low < x < 1e308 for x in v)

    named = d and len(set(map(str, names))) == d and all(isinstance(n, str) for n in [*names, m["label"]])
    scaled = m["shift"] is m["scale"] is None or (numbers(m["shift"], -math.inf) and numbers(m["scale"], 1e-300))
    if not (named and scaled):
        raise CheckpointError(f"{where} has bad features or scaling: distinct names; finite numbers, scales > 0")
    return m, cfg


def read(p: Path) -> dict[str, np.ndarray]:
    """A checkpoint file's arrays by name: meta, history, params/*, optimizer/*, each checked against
    what its meta implies before it is read; other members are never read."""
    where = repr(str(p))
    try:
        with zipfile.ZipFile(p) as z:
            text = lambda s, d: s == () and d.kind == "U" and d.itemsize <= 4 * META_CHARS  # noqa: E731
            out = {"meta": _member(z, "meta", where, text, f" is not a quadnet checkpoint (expected format {FORMAT})")}
            m, cfg = _meta(out["meta"], where)
            rows = lambda s, d: d.kind == "f" and s[1:] in ((5,), (len(METRIC_FIELDS),)) and s[0] <= m["epoch"] + 1  # noqa: E731
            metrics = f": damaged metrics: at most a row an epoch, each {', '.join(METRIC_FIELDS)}"
            out["history"] = _member(z, "history", where, rows, metrics)
            want = shapes(cfg.hidden_dim, len(m["classes"]), len(m["features"]))
            kept = sorted({g[1] for i in z.namelist() if (g := re.fullmatch(r"optimizer/(\w+)/\w+\.npy", i))})
            if len(kept) > BUFFERS:
                raise CheckpointError(f"{where} holds more optimizer buffers than an update rule keeps")
            for prefix, what in (("params/", "weight "), *((f"optimizer/{b}/", f"{b} buffer ") for b in kept)):
                for k, shape in want.items():
                    fits = lambda s, d, shape=shape: d.kind == "f" and s == shape  # noqa: E731
                    bad = f": its {what}{k} is not a float array of shape {shape}"
                    out[prefix + k] = _member(z, prefix + k, where, fits, bad)
            return out
    except CheckpointError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError):
        corrupt = "is not a quadnet checkpoint (truncated or corrupt, or not a NumPy .npz file)"
        raise CheckpointError(f"{where} {corrupt}") from None


def load(path: str | Path) -> dict[str, Any]:
    """Load and check one job's checkpoint (a run dir or a file): its state (params, optimizer buffers,
    step), epoch, status, classes, history (rows of dicts), ``cfg`` (validated) and ``config`` (its
    dict). Raises :class:`CheckpointError`."""
    f = read(p := find(path))
    meta, cfg = _meta(f["meta"], repr(str(p)))  # (as read checked it)
    params = {k[7:]: v.astype(np.float64) for k, v in f.items() if k.startswith("params/")}
    kept = dict.fromkeys(k.split("/")[1] for k in f if k.startswith("optimizer/"))  # (read gives each every param)
    bufs = {b: {k: f[f"optimizer/{b}/{k}"].astype(np.float64) for k in params} for b in kept}
    h = np.pad(f["history"], [(0, 0), (0, len(METRIC_FIELDS) - f["history"].shape[1])], constant_values=math.nan)
    history = [dict(zip(METRIC_FIELDS, map(float, r), strict=True)) for r in h]  # (before 0.5: no val_ figures)
    state = {"params": params, "optimizer": bufs, "step": meta["step"]}
    return {**meta, "state": state, "params": params, "cfg": cfg, "history": history, "path": str(p)}


# What a resume may change: how far a run goes, how it shows and where it computes; never what
# its weights were made of (shape, data, initial weights, optimizer and its settings, precision).
# So a resumed run is exactly the run its config describes, and a sweep's job dir can only be
# continued by the same job.
FREE = ("epochs", "checkpoint_every", "log_every", "plots", "animate", "progress", "threads", "logger",
        "objective", "device", "engine", "step", "cuda_graph", "resume")  # fmt: skip


def resume_check(ck: dict[str, Any], now: TrainConfig, data: Any) -> None:
    """Refuse (ConfigError, one line) to go on from checkpoint ck as config now, on data."""
    was, new = flatten(ck["config"]), flatten(to_dict(now))
    for key, value in new.items():
        # (a path may differ: the contents decide; a key newer than the checkpoint: the data's hash)
        if key not in (*FREE, "data.path", "data.test_path", "data.val_path") and was.get(key, value) != value:
            keeps = "a resume keeps what made its weights (its shape, data, initial weights and optimizer)"
            why = f"it was trained with {key}={was.get(key)!r}, and {keeps}; it may change {', '.join(FREE[:-1])}"
            raise ConfigError(f"cannot resume {ck['path']!r} with {key}={value!r}: {why}")
    if ck.get("data_sha256") not in (None, data.digest):  # (the paths may differ: the contents decide)
        named = f"data.path={data.config.path!r}" if data.config.name == "csv" else f"data={data.config.name}"
        why = f"the data it names ({named}) is not the data it was trained on (its contents differ)"
        raise ConfigError(f"cannot resume {ck['path']!r}: {why}")
    if (at := ck["epoch"]) > now.epochs:
        raise ConfigError(f"epochs={now.epochs} is below the checkpoint's epoch {at}; resume goes on from there")
