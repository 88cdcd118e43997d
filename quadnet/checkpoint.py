"""Checkpoints: written atomically, loaded without unpickling code, checked before use.

A checkpoint is a dict of tensors and plain values, so ``torch.load(weights_only=True)`` can
read it and a crafted file cannot run code. It holds one job's whole training state: its
parameters (the seed layout, float64), the optimizer's named buffers and step count, the
epoch, the metrics so far, the status and the resolved config. ``checkpoint.pt`` is that
state (resume reads it), ``model.pt`` the same for a completed run without the optimizer.
A batch of jobs training together writes one file, ``{"format": BATCH, "jobs": {dir: state}}``.
Files of format ``quadnet-checkpoint/1`` (nn.Linear's layout, one ``momentum`` slot) still load.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quadnet.model import shapes

FORMAT, OLD_FORMAT, BATCH = "quadnet-checkpoint/2", "quadnet-checkpoint/1", "quadnet-batch/2"
CHECKPOINT, MODEL = "checkpoint.pt", "model.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. Its message is one line, for the user."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers see old or new, never half.

    A failed write (a full disk) leaves the old file and raises OSError. Temporary files of
    writers that were killed (their pid is gone) are removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) so, in its own words
        why = str(e).splitlines()[0].split("] ")[-1].lstrip(". ")
        raise OSError(f"cannot write {str(path)!r} (is the disk full? torch.save: {why})") from None
    except OSError as e:  # name the file (a full disk's error does not)
        raise OSError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            os.kill(int(stale.name.split(".")[-2]), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def _tensors(p: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in p.items()}


def payload(state: dict[str, Any], *, epoch: int, config: dict[str, Any], status: str, history: list) -> dict[str, Any]:
    """One job's checkpoint as it is saved (state: params, optimizer buffers, step)."""
    buffers = {n: _tensors(b) for n, b in state.get("optimizer", {}).items()}
    tensors = {"params": _tensors(state["params"]), "optimizer": buffers, "step": int(state.get("step", epoch))}
    return {"format": FORMAT, **tensors, "epoch": int(epoch), "status": status, "config": config, "history": history}


def of(job: Any, status: str) -> dict[str, Any]:
    """The payload of a job of the training loop (:class:`quadnet.loop.Job`) as it stands."""
    from quadnet.config import to_dict

    return payload(job.state, epoch=job.epoch, config=to_dict(job.cfg), status=status, history=job.history)


def save(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def find(path: str | Path) -> Path:
    """A run dir → its checkpoint.pt (or model.pt); a file → itself (a path as the user gave it: config.user_path)."""
    from quadnet.config import user_path

    p = user_path(str(path))
    if p.is_dir():
        for name in (CHECKPOINT, MODEL):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{str(p)!r} holds no {CHECKPOINT} or {MODEL}")
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist; give a run dir or a checkpoint file")
    return p


def read(p: Path) -> Any:
    """torch.load of a file, with a one-line error for anything that is not a safe torch file."""
    try:
        with warnings.catch_warnings():  # torch warns of some files before refusing them: one line is ours
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refused {str(p)!r}: it holds objects other than tensors and plain values") from None
    except Exception:  # torch raises many kinds for a file that is not one of its own
        why = "not a torch file, or truncated or corrupt"
        raise CheckpointError(f"{str(p)!r} is not a quadnet checkpoint ({why})") from None


def _numpy(tensors: Any, hidden: int, what: str) -> dict[str, np.ndarray]:
    """Four float tensors of the net's shapes → float64 arrays; what: "<file>: its weight" or "… buffer"."""
    out = {}
    for name, want in shapes(hidden).items():
        t = tensors.get(name) if isinstance(tensors, dict) else None
        dense = isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta
        if not dense or not t.is_floating_point() or tuple(t.shape) != want:  # type: ignore[union-attr]
            raise CheckpointError(f"{what} {name} is not a float tensor of shape {want} (hidden_dim={hidden})")
        out[name] = t.to(torch.float64).numpy().copy()
    return out


def _upgrade(obj: dict[str, Any]) -> dict[str, Any]:
    """A quadnet-checkpoint/1 payload (nn.Linear's (out, in) layout, one momentum slot) in today's layout."""

    def layout(sd: Any) -> Any:
        if not isinstance(sd, dict):
            return sd
        get = {k: v.T if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in sd.items()}.get
        return {"W1": get("fc1.weight"), "b1": get("fc1.bias"), "W2": get("fc2.weight"), "b2": get("fc2.bias")}

    mom = obj.get("momentum")
    return {**obj, "params": layout(obj.get("model")), "optimizer": {} if mom is None else {"momentum": layout(mom)}}


def check(obj: Any, where: str) -> dict[str, Any]:
    """A loaded payload checked and converted: params and buffers as NumPy, config validated."""
    from quadnet.config import ConfigError, validate

    if not isinstance(obj, dict) or obj.get("format") not in (FORMAT, OLD_FORMAT):
        raise CheckpointError(f"{where} is not a quadnet checkpoint (expected format {FORMAT})")
    if obj["format"] == OLD_FORMAT:
        obj = _upgrade(obj)
    try:
        cfg = validate(obj.get("config"))  # type: ignore[arg-type]
    except ConfigError as e:
        raise CheckpointError(f"{where} has a bad config: {e}") from None
    epoch, history = obj.get("epoch"), obj.get("history", [])
    if type(epoch) is not int or not epoch >= 0:
        raise CheckpointError(f"{where} has a bad epoch {epoch!r}: must be an integer >= 0")
    keys = ("epoch", "loss", "train_accuracy", "test_accuracy")
    if not isinstance(history, list) or not all(
        isinstance(r, dict) and all(isinstance(r.get(k), int | float) for k in keys) for r in history
    ):
        raise CheckpointError(f"{where} has damaged metrics: each row must have {', '.join(keys)}")
    step, opt = obj.get("step", epoch), obj.get("optimizer") or {}
    if type(step) is not int or step < 0 or not isinstance(opt, dict):
        raise CheckpointError(f"{where} has a bad optimizer state: step {step!r}, buffers {type(opt).__name__}")
    params = _numpy(obj.get("params"), cfg.hidden_dim, f"{where}: its weight")
    buffers = {str(n): _numpy(b, cfg.hidden_dim, f"{where}: its {n} buffer") for n, b in opt.items()}
    state = {"params": params, "optimizer": buffers, "step": step}
    return {**obj, "state": state, "params": params, "cfg": cfg, "history": history}


def load(path: str | Path) -> dict[str, Any]:
    """Load and check one job's checkpoint (a run dir or a file). Raises :class:`CheckpointError`."""
    p = find(path)
    return {**check(read(p), repr(str(p))), "path": str(p)}
