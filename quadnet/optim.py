"""The update rules, for stacked (J, …) parameters with per-job hyperparameters, and what every
engine's version of them shares: each rule's hyperparameters (:data:`HYPER`) and buffers.

Each rule is torch.optim's (``SGD`` with momentum, ``Adam``), with L2 weight decay ``reg``
added to the weights' gradients as torch.optim's ``weight_decay`` does; the tests assert
each equals torch.optim on the same gradients (step=autograd uses them too). Optimizer state is a
dict of named buffers (:data:`BUFFERS`), one tensor per parameter each. A hyperparameter is a float
when every job shares it, else a (J, 1, 1) tensor. Adding a rule means a function here, its
hyperparameters and buffers, the NumPy oracle's version in :mod:`quadnet.engines.numpy`, the numba
kernel's, and its config keys. Importing this module does not import torch.
"""

from collections.abc import Sequence
from typing import Any

from quadnet.model import PARAMS, WEIGHTS, Tensor

Hyper = dict[str, Any]  # name -> float or per job (a list, or a (J, 1, 1) tensor)
State = dict[str, list[Tensor]]  # buffer name -> one tensor per parameter

HYPER = {"sgd": ("lr", "reg", "momentum"), "adam": ("lr", "reg", "beta1", "beta2", "eps")}
BUFFERS = {"sgd": ("momentum",), "adam": ("exp_avg", "exp_avg_sq")}


def hyper(cfgs: Sequence[Any]) -> dict[str, float | list[float]]:
    """The jobs' hyperparameters of their rule: a float where every job has the same, else one per job."""
    values = {name: [float(getattr(c, name)) for c in cfgs] for name in HYPER[cfgs[0].optimizer]}
    return {name: v[0] if len(set(v)) == 1 else v for name, v in values.items()}


def buffers(rule: str, h: Hyper) -> tuple[str, ...]:
    """The buffers a rule keeps: plain SGD (momentum 0 for every job) keeps none."""
    return () if rule == "sgd" and isinstance(h["momentum"], float) and h["momentum"] == 0.0 else BUFFERS[rule]


def _axpy(y: Tensor, a: Any, x: Tensor) -> Tensor:
    """y += a·x in place, for a float or a per-job tensor a."""
    return y.add_(x, alpha=a) if isinstance(a, float) else y.addcmul_(x, a)


def _decay(params: list[Tensor], grads: list[Tensor], reg: Any) -> None:
    for name, p, g in zip(PARAMS, params, grads, strict=True):
        if name in WEIGHTS and (not isinstance(reg, float) or reg):
            _axpy(g, reg, p)


def sgd(params: list[Tensor], grads: list[Tensor], state: State, h: Hyper, t: Any) -> None:
    """torch.optim.SGD: buf = momentum·buf + g; p -= lr·buf (plain descent without buffers)."""
    _decay(params, grads, h["reg"])
    bufs = state.get("momentum") or [None] * len(params)
    for p, g, buf in zip(params, grads, bufs, strict=True):
        _axpy(p, -h["lr"], g if buf is None else _axpy(buf.mul_(h["momentum"]), 1.0, g))


def adam(params: list[Tensor], grads: list[Tensor], state: State, h: Hyper, t: Any) -> None:
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
