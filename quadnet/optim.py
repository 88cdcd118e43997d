"""The update rules, for stacked (J, …) parameters with per-job hyperparameters.

Each rule is torch.optim's (``SGD`` with momentum, ``Adam``), with L2 weight decay ``reg``
added to the weights' gradients as torch.optim's ``weight_decay`` does; the tests assert
each equals torch.optim on the same gradients. Optimizer state is a dict of named buffers
(:data:`BUFFERS`), one tensor per parameter each. A hyperparameter is a float when every
job shares it, else a (J, 1, 1) tensor. Adding a rule means a function here, its buffers,
the NumPy oracle's version in :mod:`quadnet.reference`, and its config keys.
"""

from __future__ import annotations

from typing import Any

import torch

from quadnet.model import PARAMS, WEIGHTS

Hyper = dict[str, Any]  # name -> float or (J, 1, 1) tensor
State = dict[str, list[torch.Tensor]]  # buffer name -> one tensor per parameter

BUFFERS = {"sgd": ("momentum",), "adam": ("exp_avg", "exp_avg_sq")}
HYPER = {"sgd": ("lr", "reg", "momentum"), "adam": ("lr", "reg", "beta1", "beta2", "eps")}


def buffers(rule: str, h: Hyper) -> tuple[str, ...]:
    """The buffers a rule keeps: plain SGD (momentum 0 for every job) keeps none."""
    return () if rule == "sgd" and isinstance(h["momentum"], float) and h["momentum"] == 0.0 else BUFFERS[rule]


def _axpy(y: torch.Tensor, a: Any, x: torch.Tensor) -> torch.Tensor:
    """y += a·x in place, for a float or a per-job tensor a."""
    return y.add_(x, alpha=a) if isinstance(a, float) else y.addcmul_(x, a)


def _decay(params: list[torch.Tensor], grads: list[torch.Tensor], reg: Any) -> None:
    for name, p, g in zip(PARAMS, params, grads, strict=True):
        if name in WEIGHTS and (not isinstance(reg, float) or reg):
            _axpy(g, reg, p)


def sgd(params: list[torch.Tensor], grads: list[torch.Tensor], state: State, h: Hyper, t: Any) -> None:
    """torch.optim.SGD: buf = momentum·buf + g; p -= lr·buf (plain descent without buffers)."""
    _decay(params, grads, h["reg"])
    bufs = state.get("momentum") or [None] * len(params)
    for p, g, buf in zip(params, grads, bufs, strict=True):
        _axpy(p, -h["lr"], g if buf is None else _axpy(buf.mul_(h["momentum"]), 1.0, g))


def adam(params: list[torch.Tensor], grads: list[torch.Tensor], state: State, h: Hyper, t: Any) -> None:
    """torch.optim.Adam at step t (1-based): bias-corrected running means of g and g²."""
    _decay(params, grads, h["reg"])
    b1, b2 = h["beta1"], h["beta2"]
    bc1, bc2_sqrt = 1 - b1**t, (1 - b2**t) ** 0.5
    for p, g, m, v in zip(params, grads, state["exp_avg"], state["exp_avg_sq"], strict=True):
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g * (1 - b2))
        denom = (v.sqrt() / bc2_sqrt).add_(h["eps"])
        p.sub_(m / denom * (h["lr"] / bc1))


RULES = {"sgd": sgd, "adam": adam}


def torch_optimizer(rule: str, params: list[torch.nn.Parameter], h: Hyper) -> torch.optim.Optimizer:
    """The torch.optim equivalent, for ``step=autograd`` (hyperparameters shared by the batch)."""
    groups = [
        {"params": [p for n, p in zip(PARAMS, params, strict=True) if n in WEIGHTS], "weight_decay": h["reg"]},
        {"params": [p for n, p in zip(PARAMS, params, strict=True) if n not in WEIGHTS], "weight_decay": 0.0},
    ]
    if rule == "sgd":
        return torch.optim.SGD(groups, lr=h["lr"], momentum=h["momentum"])
    return torch.optim.Adam(groups, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"])


_TORCH_NAMES = {"momentum": "momentum_buffer"}


def torch_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], names: tuple[str, ...]) -> State:
    """A torch.optim optimizer's buffers as named buffers (zeros before its first step)."""
    return {
        n: [opt.state.get(p, {}).get(_TORCH_NAMES.get(n, n), torch.zeros_like(p)).detach() for p in params]
        for n in names
    }


def load_torch_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], state: State, t: int) -> None:
    """Named buffers (and the step count t) into a torch.optim optimizer, for resume."""
    for i, p in enumerate(params):
        entry = {_TORCH_NAMES.get(n, n): bufs[i].clone() for n, bufs in state.items()}
        if isinstance(opt, torch.optim.Adam):
            entry["step"] = torch.tensor(float(t))
        if entry:
            opt.state[p] = entry
