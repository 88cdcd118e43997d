"""Turn the ``device`` setting into a torch.device, refusing one that is not there."""

from __future__ import annotations

import torch

from quadnet.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, else mps, else cpu. An explicit device that is missing is an error."""
    if name == "auto":
        return torch.device(
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' is not available on this machine; use device=auto or cpu")
    if name in ("cpu", "mps"):
        return torch.device(name)
    # cuda or cuda:N
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={name!r} is not available: this torch build or machine has no CUDA "
            f"(torch {torch.__version__}); use device=auto or cpu"
        )
    index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device={name!r} is not available: only cuda:0..cuda:{count - 1} exist")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """The device as recorded in summaries, e.g. 'cpu' or 'cuda:0 (NVIDIA H200)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type
