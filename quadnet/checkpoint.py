"""Checkpoints: written atomically, loaded without unpickling code.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool,
None, lists, dicts), so ``torch.load(weights_only=True)`` can read it: that
loader refuses any pickled object it does not know, so a crafted file cannot run
code. ``checkpoint.pt`` holds the whole training state (resume reads it);
``model.pt`` holds the final weights and the resolved config (predict reads either).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quadnet.model import numpy_from_state, state_from_numpy

FORMAT = "quadnet-checkpoint/1"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. Its message is one line, for the user."""


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(
    path: Path,
    *,
    params: dict[str, np.ndarray],
    momentum: dict[str, np.ndarray] | None,
    epoch: int,
    config: dict[str, Any],
    history: list[dict[str, float]] | None = None,
    status: str = "running",
) -> None:
    """Write a checkpoint atomically. Tensors are float64 on the CPU, in QuadNet's layout."""
    payload = {
        "format": FORMAT,
        "model": state_from_numpy(params),
        "momentum": None if momentum is None else state_from_numpy(momentum),
        "epoch": int(epoch),
        "status": status,
        "config": config,
        "history": history or [],
        "rng": {"torch": torch.get_rng_state()},
    }
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def find(path: str | Path) -> Path:
    """A run dir → its checkpoint.pt (or model.pt); a file → itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (CHECKPOINT, MODEL):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{str(p)!r} holds no {CHECKPOINT} or {MODEL}")
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist; give a run dir or a checkpoint file")
    return p


def load(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint. Raises :class:`CheckpointError` with a one-line reason."""
    p = find(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused {str(p)!r}: it holds objects other than tensors and plain values "
            f"and is not loaded ({first[:160]})"
        ) from None
    except Exception as e:  # torch raises many kinds for a file that is not one of its own
        raise CheckpointError(
            f"{str(p)!r} is not a readable checkpoint (truncated or corrupt: {type(e).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a quadnet checkpoint (expected format {FORMAT})")
    try:
        payload["params"] = numpy_from_state(payload["model"])
        mom = payload.get("momentum")
        payload["momentum_params"] = None if mom is None else numpy_from_state(mom)
        if not isinstance(payload["config"], dict):
            raise TypeError("config")
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(p)!r} is missing part of a checkpoint ({e})") from None
    payload["path"] = str(p)
    return payload
