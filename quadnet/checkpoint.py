"""Checkpoints: NumPy ``.npz`` files, written atomically, read without unpickling, checked before use.

``checkpoint.npz`` holds one job's whole training state: ``params/<W1|b1|W2|b2>`` (the seed
layout, float64), ``optimizer/<buffer>/<param>``, ``history`` (a row per log point, columns
:data:`~quadnet.artifacts.METRIC_FIELDS`) and ``meta``, a JSON string with the format, epoch,
optimizer step, status, classes and resolved config. ``np.load(path)`` reads it without torch,
and ``allow_pickle=False`` means a crafted file cannot run code. For a completed run it is the
model (``predict`` and ``quadnet.load`` read it). The ``checkpoint.pt``/``model.pt`` files of quadnet
0.1 and 0.2 (torch.save, read with ``torch.load(weights_only=True)``) still load.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.artifacts import METRIC_FIELDS, atomic_write
from quadnet.config import ConfigError, TrainConfig, to_dict
from quadnet.model import shapes

FORMAT = "quadnet-checkpoint/3"
TORCH_FORMATS = ("quadnet-checkpoint/1", "quadnet-checkpoint/2")
CHECKPOINT = "checkpoint.npz"
NAMES = (CHECKPOINT, "checkpoint.pt", "model.pt")  # what a run dir may hold, newest format first


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. Its message is one line, for the user."""


def arrays(state: dict[str, Any], *, epoch: int, config: dict, status: str, history: list, data: Any) -> dict:
    """One job's checkpoint as the arrays it is saved as (state: params, optimizer buffers, step);
    data: its :class:`~quadnet.data.Dataset`, whose classes and identity are kept."""
    out = {f"params/{k}": v for k, v in state["params"].items()}
    out |= {f"optimizer/{n}/{k}": v for n, b in state.get("optimizer", {}).items() for k, v in b.items()}
    out["history"] = np.array([[r.get(f, math.nan) for f in METRIC_FIELDS] for r in history]).reshape(-1, 5)
    step = int(state.get("step", epoch))
    meta = {"format": FORMAT, "epoch": int(epoch), "step": step, "status": status, "classes": list(data.classes)}
    meta["data_sha256"] = data.digest
    return out | {"meta": np.array(json.dumps({**meta, "config": config}))}


def of(job: Any, status: str, data: Any) -> dict[str, np.ndarray]:
    """The arrays of a job of the training loop (:class:`quadnet.loop.Job`) as it stands."""
    return arrays(job.state, epoch=job.epoch, config=to_dict(job.cfg), status=status, history=job.history, data=data)


def save(path: Path, obj: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **obj)

    atomic_write(path, write)


def in_dir(folder: Path) -> Path | None:
    """The checkpoint a run dir holds (the newest format first), or None."""
    return next((folder / n for n in NAMES if (folder / n).is_file()), None)


def find(path: str | Path) -> Path:
    """A run dir → its checkpoint; a file → itself (a path as the user gave it: config.user_path)."""
    from quadnet.config import user_path

    p = user_path(str(path))
    if p.is_dir():
        if (found := in_dir(p)) is None:
            raise CheckpointError(f"{str(p)!r} holds no {' or '.join(NAMES)}")
        return found
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist; give a run dir or a checkpoint file")
    return p


def read(p: Path) -> dict[str, Any]:
    """A file's arrays by name (npz), or a quadnet 0.1/0.2 torch file's payload; one-line errors."""
    if not zipfile.is_zipfile(p):  # (both formats are zip archives)
        raise CheckpointError(
            f"{str(p)!r} is not a quadnet checkpoint (truncated or corrupt, or not a NumPy or torch file)"
        )
    try:
        with np.load(p, allow_pickle=False) as f:
            if "meta" in f.files:
                return {k: f[k] for k in f.files}
    except ValueError:  # an object array: it would be unpickled
        raise CheckpointError(f"refused {str(p)!r}: it holds objects other than arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile):
        raise CheckpointError(f"{str(p)!r} is not a quadnet checkpoint (truncated or corrupt)") from None
    return _read_torch(p)  # a zip without meta: perhaps torch.save's


def _read_torch(p: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # torch warns of some files before refusing them: one line is ours
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refused {str(p)!r}: it holds objects other than tensors and plain values") from None
    except Exception:  # torch raises many kinds for a file that is not one of its own
        raise CheckpointError(f"{str(p)!r} is not a quadnet checkpoint (truncated or corrupt)") from None
    if not isinstance(obj, dict) or obj.get("format") not in TORCH_FORMATS:
        raise CheckpointError(f"{str(p)!r} is not a quadnet checkpoint (expected format {FORMAT})")
    if obj["format"] == TORCH_FORMATS[0]:  # 0.1: nn.Linear's (out, in) layout, one momentum slot
        obj = {**obj, "params": _linear(obj.get("model")), "optimizer": {"momentum": _linear(obj["momentum"])}
               if obj.get("momentum") is not None else {}}  # fmt: skip
    dense = lambda t: t.to(torch.float64).numpy() if isinstance(t, torch.Tensor) and t.layout == torch.strided else t  # noqa: E731
    out = {f"params/{k}": dense(v) for k, v in (obj.get("params") or {}).items()}
    out |= {f"optimizer/{n}/{k}": dense(v) for n, b in (obj.get("optimizer") or {}).items() for k, v in b.items()}
    history = obj.get("history", [])
    rows = [[r.get(f, math.nan) for f in METRIC_FIELDS] if isinstance(r, dict) else [] for r in history]
    out["history"] = np.array(rows, dtype=object if len({len(r) for r in rows}) > 1 else float).reshape(len(rows), -1)
    meta = {k: obj.get(k) for k in ("epoch", "status", "config")} | {"step": obj.get("step", obj.get("epoch"))}
    return out | {"meta": np.array(json.dumps({**meta, "format": FORMAT, "classes": [1, 2, 3, 4]}, default=str))}


def _linear(sd: Any) -> Any:
    if not isinstance(sd, dict):
        return {}
    get = {k: v.T if hasattr(v, "dim") and v.dim() == 2 else v for k, v in sd.items()}.get
    return {"W1": get("fc1.weight"), "b1": get("fc1.bias"), "W2": get("fc2.weight"), "b2": get("fc2.bias")}


def _float(a: Any, want: tuple[int, ...], what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.shape != want:
        raise CheckpointError(f"{what} is not a float array of shape {want}")
    return a.astype(np.float64)


def check(f: dict[str, Any], where: str) -> dict[str, Any]:
    """One job's arrays checked and unpacked: its state (params, optimizer buffers, step), epoch,
    status, classes, history (rows of dicts), config (validated, ``cfg``) and ``config`` (its dict)."""
    from quadnet.config import ConfigError, validate

    try:
        meta = json.loads(str(f["meta"]))
        assert meta["format"] == FORMAT
    except (KeyError, ValueError, TypeError, AssertionError, RecursionError):
        raise CheckpointError(f"{where} is not a quadnet checkpoint (expected format {FORMAT})") from None
    try:
        cfg = validate(meta.get("config"))  # type: ignore[arg-type]
    except ConfigError as e:
        raise CheckpointError(f"{where} has a bad config: {e}") from None
    epoch, step, classes = meta.get("epoch"), meta.get("step"), meta.get("classes")
    for name, v in (("epoch", epoch), ("optimizer step", step)):
        if type(v) is not int or v < 0:
            raise CheckpointError(f"{where} has a bad {name} {v!r}: must be an integer >= 0")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, int | str) for c in classes):
        raise CheckpointError(f"{where} has bad classes {classes!r}: a list of two labels or more")
    h = f.get("history")
    if not isinstance(h, np.ndarray) or h.dtype.kind != "f" or h.ndim != 2 or h.shape[1] != len(METRIC_FIELDS):
        raise CheckpointError(f"{where} has damaged metrics: each row must have {', '.join(METRIC_FIELDS)}")
    want = shapes(cfg.hidden_dim, len(classes))
    params = {k: _float(f.get(f"params/{k}"), s, f"{where}: its weight {k}") for k, s in want.items()}
    names = sorted({k.split("/")[1] for k in f if k.startswith("optimizer/")})
    bufs = {n: {k: _float(f.get(f"optimizer/{n}/{k}"), s, f"{where}: its {n} buffer {k}") for k, s in want.items()}
            for n in names}  # fmt: skip
    history = [dict(zip(METRIC_FIELDS, map(float, r), strict=True)) for r in h]
    state = {"params": params, "optimizer": bufs, "step": step}
    return {**meta, "state": state, "params": params, "cfg": cfg, "history": history}


def load(path: str | Path) -> dict[str, Any]:
    """Load and check one job's checkpoint (a run dir or a file). Raises :class:`CheckpointError`."""
    p = find(path)
    return {**check(read(p), repr(str(p))), "path": str(p)}


# What a resume may change: how far a run goes, how it shows and where it computes; never what
# its weights were made of (shape, data, initial weights, optimizer and its settings, precision).
# So a resumed run is exactly the run its config describes, and a sweep's job dir can only be
# continued by the same job.
FREE = ("epochs", "checkpoint_every", "log_every", "plots", "animate", "progress", "threads", "logger",
        "objective", "device", "engine", "step", "cuda_graph", "resume")  # fmt: skip


def resume_check(ck: dict[str, Any], now: TrainConfig, data: Any) -> None:
    """Refuse (ConfigError, one line) to go on from checkpoint ck as config now, on data."""
    was, new = _flat(ck["config"]), _flat(to_dict(now))
    for key, value in new.items():
        if key not in FREE and key not in ("data.path", "data.test_path") and was.get(key) != value:
            raise ConfigError(
                f"cannot resume {ck['path']!r} with {key}={value!r}: it was trained with {key}={was.get(key)!r}, and "
                f"a resume keeps what made its weights (its shape, data, initial weights and optimizer); "
                f"it may change {', '.join(FREE[:-1])}"
            )
    if ck.get("data_sha256") not in (None, data.digest):  # (the paths may differ: the contents decide)
        raise ConfigError(
            f"cannot resume {ck['path']!r}: the data it names ({_where(data.config)}) is not the data it was "
            "trained on (its contents differ)"
        )
    if ck["epoch"] > now.epochs:
        raise ConfigError(
            f"epochs={now.epochs} is below the checkpoint's epoch {ck['epoch']}; resume goes on from there"
        )


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in config.items() if k != "data"}, **{f"data.{k}": v for k, v in config["data"].items()}}


def _where(d: Any) -> str:
    return f"data.path={d.path!r}" if d.name == "csv" else f"data={d.name}"
