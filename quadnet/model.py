"""The network, and the initial weights that both engines start from."""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from quadnet.data import NUM_CLASSES

INPUT_DIM = 2


class QuadNet(nn.Module):
    """Linear(2 → hidden_dim) → ReLU → Linear(hidden_dim → 4). Returns logits (N, 4)."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(INPUT_DIM, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


_rngs = threading.local()


def _legacy_rng(seed: int) -> np.random.RandomState:
    """``np.random.RandomState(seed)``, the same stream: one generator per thread, re-seeded.
    Making a RandomState costs ~0.2 ms, 15× more than seeding one (seconds for 10,000 jobs)."""
    rs = getattr(_rngs, "rs", None)
    if rs is None:
        rs = _rngs.rs = np.random.RandomState()
    rs.seed(seed)
    return rs


def initial_params(hidden_dim: int, seed: int, init: str) -> dict[str, np.ndarray]:
    """Initial weights in the seed's layout: W1 (2, H), b1 (H,), W2 (H, 4), b2 (4,), float64.

    ``normal`` is the seed program's draw, bit for bit: legacy ``RandomState(seed).randn``
    for W1, then for W2, and zero biases. ``torch`` is what ``nn.Linear`` does by default
    under ``torch.manual_seed(seed)``.
    """
    if init == "normal":
        rs = _legacy_rng(seed)
        w1 = rs.randn(INPUT_DIM, hidden_dim)
        w2 = rs.randn(hidden_dim, NUM_CLASSES)
        return {"W1": w1, "b1": np.zeros(hidden_dim), "W2": w2, "b2": np.zeros(NUM_CLASSES)}
    if init == "torch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = QuadNet(hidden_dim).double()
        return numpy_from_state(net.state_dict())
    raise ValueError(f"unknown init {init!r}")


def state_from_numpy(p: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Seed layout → QuadNet state dict (nn.Linear stores weight as (out, in))."""
    return {
        "fc1.weight": torch.from_numpy(np.ascontiguousarray(p["W1"].T)),
        "fc1.bias": torch.from_numpy(np.ascontiguousarray(p["b1"])),
        "fc2.weight": torch.from_numpy(np.ascontiguousarray(p["W2"].T)),
        "fc2.bias": torch.from_numpy(np.ascontiguousarray(p["b2"])),
    }


def numpy_from_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """QuadNet state dict → seed layout, float64 NumPy."""

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy().copy()

    return {
        "W1": arr(state["fc1.weight"]).T.copy(),
        "b1": arr(state["fc1.bias"]),
        "W2": arr(state["fc2.weight"]).T.copy(),
        "b2": arr(state["fc2.bias"]),
    }
