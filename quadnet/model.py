"""The network, Linear(D → H) → ReLU → Linear(H → C), for J nets at once: a single run is J = 1.

Parameters carry a leading job dimension and otherwise the seed program's layout:
W1 (J, D, H), b1 (J, 1, H), W2 (J, H, C), b2 (J, 1, C): D features (the quadrants' 2, or a CSV's
columns), C classes (the four quadrants, or a CSV's labels). :func:`forward` and :func:`backward`
are the torch definition of the net;
``step=autograd`` differentiates the same :func:`forward` with autograd; the numba engine
(:mod:`quadnet.engines.numba`) and the NumPy oracle (:mod:`quadnet.engines.numpy`) are written
separately, by hand, and tested equal to it. Importing this module does not import torch.
"""

import threading
from typing import Any

import numpy as np

PARAMS = ("W1", "b1", "W2", "b2")
WEIGHTS = ("W1", "W2")  # the parameters `reg` decays; biases are not

Params = dict[str, np.ndarray]  # one job, seed layout: W1 (D, H), b1 (H,), W2 (H, C), b2 (C,)
Tensor = Any  # torch.Tensor (torch is imported only where tensors are made)


def forward(p: list[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden activations (J, N, H) and logits (J, N, C) for points x (N, D). The first layer of J
    jobs is one GEMM over all of them, (N, D) @ (D, J·H): faster than J small ones."""
    import torch

    w1, b1, w2, b2 = p
    j, _, h = w1.shape
    a = torch.addmm(b1.reshape(1, j * h), x, w1.transpose(0, 1).reshape(-1, j * h)).view(-1, j, h).transpose(0, 1)
    return a.clamp_min_(0), torch.baddbmm(b2, a, w2)


def backward(p: list[Tensor], x: Tensor, a: Tensor, dlogits: Tensor) -> list[Tensor]:
    """Gradients of the loss (no L2 term) in the parameters' layout, from dL/dlogits (J, N, C)."""
    import torch

    da = dlogits @ p[2].transpose(-1, -2)
    dw2 = (dlogits.transpose(-1, -2) @ a).transpose(-1, -2)  # in W2's layout (see lay_out), no copy
    # through ReLU (where a > 0), written in the (N, J, H) layout, so that dW1 is one GEMM for all
    # jobs without a copy (as in forward), in W1's layout
    j, n, h = da.shape
    dz1 = torch.empty((n, j, h), dtype=da.dtype, device=da.device).transpose(0, 1)
    torch.ops.aten.threshold_backward.grad_input(da, a, 0, grad_input=dz1)
    dw1 = (x.t() @ dz1.transpose(0, 1).reshape(n, j * h)).view(-1, j, h).transpose(0, 1)  # W1's layout
    return [dw1, dz1.sum(1, keepdim=True), dw2, dlogits.sum(1, keepdim=True)]


_rngs = threading.local()


def initial_params(hidden_dim: int, seed: int, init: str, classes: int = 4, inputs: int = 2) -> Params:
    """Initial weights of one job, seed layout, float64.

    ``normal`` is the seed program's draw, bit for bit: legacy ``RandomState(seed).randn``
    for W1, then for W2, and zero biases. ``torch`` is what ``nn.Linear`` does by default
    under ``torch.manual_seed(seed)``.
    """
    if init == "normal":
        rs = _rngs.rs = getattr(_rngs, "rs", None) or np.random.RandomState()  # re-seeded: cheaper than a new one
        rs.seed(seed)
        w1, w2 = rs.randn(inputs, hidden_dim), rs.randn(hidden_dim, classes)
        return {"W1": w1, "b1": np.zeros(hidden_dim), "W2": w2, "b2": np.zeros(classes)}
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fc1, fc2 = torch.nn.Linear(inputs, hidden_dim).double(), torch.nn.Linear(hidden_dim, classes).double()
    arr = lambda t: t.detach().numpy().copy()  # noqa: E731
    return {"W1": arr(fc1.weight.T), "b1": arr(fc1.bias), "W2": arr(fc2.weight.T), "b2": arr(fc2.bias)}


def shapes(hidden: int, classes: int = 4, inputs: int = 2) -> dict[str, tuple[int, ...]]:
    """One job's parameters and their shapes in the seed layout (checkpoints are checked against them)."""
    return {"W1": (inputs, hidden), "b1": (hidden,), "W2": (hidden, classes), "b2": (classes,)}


def padded(jobs: list[Params], hidden: int) -> list[np.ndarray]:
    """Jobs' parameters (or optimizer buffers) stacked (J, …) in float64, a bias as a row (J, 1, …), narrower
    nets zero-padded to `hidden`. Padded units stay exactly zero: their pre-activation is 0, so ReLU passes no
    gradient."""
    out = []
    for name, shape in shapes(hidden, len(jobs[0]["b2"]), len(jobs[0]["W1"])).items():
        t = np.zeros((len(jobs), *shape))
        for j, p in enumerate(jobs):
            t[(j, *map(slice, p[name].shape))] = p[name]
        out.append(t.reshape(len(jobs), -1, shape[-1]))
    return out


def stack(jobs: list[Params], hidden: int, dtype: Any, device: Any) -> list[Tensor]:
    """:func:`padded` as tensors on a device, laid out for the torch engine (:func:`lay_out`)."""
    import torch

    return lay_out([torch.as_tensor(t, dtype=dtype, device=device) for t in padded(jobs, hidden)])


def lay_out(tensors: list[Tensor]) -> list[Tensor]:
    """How the parameters lie in memory (their shapes stay the seed's): W1 (J, 2, H) input-major,
    (2, J, H) in memory, so that the first layer and its gradient are single GEMMs over all jobs
    without a copy; W2 (J, H, C) as (J, C, H), nn.Linear's layout, so that its gradient comes out
    of one batched GEMM in place."""
    w1, b1, w2, b2 = tensors
    return [w1.transpose(0, 1).contiguous().transpose(0, 1), b1, w2.transpose(1, 2).contiguous().transpose(1, 2), b2]


def unstack(tensors: list[Tensor], rows: list[int], hidden_dims: list[int]) -> list[Params]:
    """Jobs at `rows`, unpadded, in the seed layout (float64 NumPy): one copy off the device."""
    import torch

    w1, b1, w2, b2 = (t.detach().to("cpu", torch.float64).numpy() for t in tensors)
    job = lambda r, h: (w1[r, :, :h].copy(), b1[r, 0, :h].copy(), w2[r, :h].copy(), b2[r, 0].copy())  # noqa: E731
    return [dict(zip(PARAMS, job(r, h), strict=True)) for r, h in zip(rows, hidden_dims, strict=True)]
