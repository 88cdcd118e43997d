"""Turn the ``device`` setting into a device name ('cpu', 'cuda:0', 'mps'), refusing one that is not there."""

import glob
import sys

from quadnet.config import ConfigError


def gpu_possible() -> bool:
    """Whether this machine might have a GPU torch can use: a GPU's device file (NVIDIA, AMD's ROCm,
    WSL), or a Mac. Without one, device=auto is the cpu without importing torch (1-2 s)."""
    return sys.platform == "darwin" or any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg"))


def resolve_device(name: str) -> str:
    """``auto`` → cuda, else mps, else cpu. An explicit device that is missing is an error."""
    if name == "cpu" or (name == "auto" and not gpu_possible()):
        return "cpu"
    import torch

    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not (torch.backends.mps if name == "mps" else torch.cuda).is_available():  # (mps, cuda or cuda:N)
        why = f"this torch build or machine has no {'MPS' if name == 'mps' else 'CUDA'} (torch {torch.__version__})"
        raise ConfigError(f"device={name!r} is not available: {why}; use device=auto or cpu")
    if name == "mps":
        return name
    index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device={name!r} is not available: only cuda:0..cuda:{count - 1} exist")
    return f"cuda:{index}"


def describe(device: str) -> str:
    """The device as recorded in summaries, e.g. 'cpu' or 'cuda:0 (NVIDIA H200)'."""
    if device.startswith("cuda"):
        import torch

        return f"{device} ({torch.cuda.get_device_name(int(device.partition(':')[2]))})"
    return device
