"""The NumPy engine: the two-layer net with backprop written out by hand.

Each layer is a ``*_forward`` / ``*_backward`` pair. A forward returns its output
and a cache of what its backward needs; a backward takes the upstream gradient
and that cache and returns the gradients of its inputs. Shapes use N for the
batch, D for the input size (2), H for the hidden width and C for the classes (4).

This is the reference the torch engine is checked against
(``python -m quadnet.crosscheck``), and :func:`eval_numerical_gradient` checks
it in turn against centred finite differences. Importing it imports neither torch nor numba.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from quadnet.engines import metric_rows, saved_buffers
from quadnet.model import WEIGHTS, Params
from quadnet.optim import BUFFERS, buffers, hyper


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
    """out = x @ w + b.  x: (N, D), w: (D, M), b: (M,) → out: (N, M)."""
    return x @ w + b, (x, w)  # the cache: what the backward needs


def affine_backward(dout: np.ndarray, cache: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout: (N, M) → dx: (N, D), dw: (D, M), db: (M,)."""
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(axis=0)


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    """out = max(0, x), elementwise. x: any shape → out: same shape."""
    return np.maximum(0, x), x


def relu_backward(dout: np.ndarray, cache: Any) -> np.ndarray:
    """Passes the gradient where the input was positive. dout, x: same shape → dx."""
    return np.where(cache <= 0, 0, dout)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max for stability. scores: (N, C) → (N, C)."""
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def softmax_loss(scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(scores) against labels.

    scores: (N, C) logits, y: (N,) ints in [0, C) → (loss, dscores (N, C)).
    The gradient uses the probabilities exactly as the seed computes them; the loss
    comes from the log-softmax, so a confidently wrong point gives a large finite loss
    rather than log(0) = -inf.
    """
    n, rows = len(scores), np.arange(len(scores))
    shifted = scores - scores.max(axis=1, keepdims=True)
    loss = -np.sum(shifted[rows, y] - np.log(np.exp(shifted).sum(axis=1))) / n
    dscores = softmax(scores)  # the probabilities
    dscores[rows, y] -= 1
    return float(loss), dscores / n


def forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, tuple[Any, Any, Any]]:
    """The net's logits (N, C) for x (N, D), with the caches for :func:`backward`."""
    h, fc1_cache = affine_forward(x, params["W1"], params["b1"])
    a, relu_cache = relu_forward(h)
    scores, fc2_cache = affine_forward(a, params["W2"], params["b2"])
    return scores, (fc1_cache, relu_cache, fc2_cache)


def backward(dscores: np.ndarray, caches: tuple[Any, Any, Any], params: Params, reg: float) -> Params:
    """Gradients of (data loss + reg/2·(‖W1‖² + ‖W2‖²)) from dscores (N, C)."""
    fc1_cache, relu_cache, fc2_cache = caches
    da, dw2, db2 = affine_backward(dscores, fc2_cache)
    dh = relu_backward(da, relu_cache)
    _, dw1, db1 = affine_backward(dh, fc1_cache)
    return {"W1": dw1 + reg * params["W1"], "b1": db1, "W2": dw2 + reg * params["W2"], "b2": db2}


def loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray, reg: float) -> tuple[float, Params]:
    """The data loss (no penalty term, as the seed prints it) and the full gradients."""
    scores, caches = forward(params, x)
    loss, dscores = softmax_loss(scores, y)
    return loss, backward(dscores, caches, params, reg)


def objective(params: Params, x: np.ndarray, y: np.ndarray, reg: float) -> float:
    """The function whose gradient :func:`loss_and_grads` returns: data loss + L2 penalty."""
    return softmax_loss(forward(params, x)[0], y)[0] + 0.5 * reg * sum(float(np.sum(params[k] ** 2)) for k in WEIGHTS)


def sgd_update(params: Params, grads: Params, state: dict[str, Params], h: dict[str, float], t: int) -> None:
    """In place, torch.optim.SGD's rule: p -= lr·g, or with momentum v = m·v + g; p -= lr·v."""
    for k, p in params.items():
        if "momentum" in state:  # v = m·v + g, in place; the step takes v
            state["momentum"][k][...] = h["momentum"] * state["momentum"][k] + grads[k]
        p -= h["lr"] * state.get("momentum", grads)[k]


def adam_update(params: Params, grads: Params, state: dict[str, Params], h: dict[str, float], t: int) -> None:
    """In place, torch.optim.Adam's rule at step t (1-based)."""
    b1, b2 = h["beta1"], h["beta2"]
    for k, p in params.items():
        g, m, v = grads[k], state["exp_avg"][k], state["exp_avg_sq"][k]
        m += (1 - b1) * (g - m)
        v[...] = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2**t) + h["eps"]
        p -= h["lr"] / (1 - b1**t) * m / denom


UPDATES = {"sgd": (sgd_update, BUFFERS["sgd"]), "adam": (adam_update, BUFFERS["adam"])}


def eval_numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Centred-difference gradient of scalar f at x: (f(x+h) - f(x-h)) / 2h per element.

    x is perturbed in place and restored, so f may close over it.
    """
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        f_plus = f(x)
        x[ix] = old - h
        grad[ix] = (f_plus - f(x)) / (2 * h)
        x[ix] = old
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """‖a-b‖ / max(1e-12, ‖a‖+‖b‖): a relative error that tiny gradient entries cannot inflate."""
    return float(np.linalg.norm(a - b) / max(1e-12, np.linalg.norm(a) + np.linalg.norm(b)))


class NumpyEngine:
    """One job trained with :func:`loss_and_grads` and :data:`UPDATES`."""

    def __init__(self, cfgs: list[Any], data: Any, starts: list[dict[str, Any]]) -> None:
        (c,), (start,) = cfgs, starts  # a batch of one
        self.dt = np.dtype(c.dtype)
        self.params = {k: v.astype(self.dt) for k, v in start["params"].items()}
        self.x, self.y, self.data = data.x_train.astype(self.dt), data.y_train, data
        self.update, self.h = UPDATES[c.optimizer][0], hyper(cfgs)
        saved = saved_buffers(starts, buffers(c.optimizer, self.h))
        self.state = {n: {k: v.astype(self.dt) for k, v in b.items()} for n, (b,) in saved.items()}  # (copies: its own)
        self.t, self.rows, self.name = start.get("step", 0), [0], "numpy"

    def run(self, n: int, stop: Callable[[], bool]) -> tuple[int, list[int]]:
        """Up to n full-batch steps; (steps done, [the first whose loss was not finite, or -1])."""
        with np.errstate(all="ignore"):  # divergence is reported, not warned about
            for i in range(n):
                loss, grads = loss_and_grads(self.params, self.x, self.y, self.h["reg"])
                if not np.isfinite(loss):
                    return i + 1, [i]
                self.t += 1
                self.update(self.params, grads, self.state, self.h, self.t)
                if stop():
                    return i + 1, [-1]
        return n, [-1]

    def metrics(self) -> list[dict[str, float]]:
        """:func:`quadnet.engines.metric_rows`."""
        logits = lambda x: forward(self.params, x.astype(self.dt))[0].astype(np.float64)[None]  # noqa: E731
        return metric_rows(np, logits, self.data.splits)

    def export(self, rows: list[int]) -> list[dict[str, Any]]:
        f64 = lambda p: {k: v.astype(np.float64) for k, v in p.items()}  # noqa: E731
        optimizer = {n: f64(s) for n, s in self.state.items()}  # rows is [0] or []: a batch of one
        return [{"params": f64(self.params), "optimizer": optimizer, "step": self.t} for _ in rows]

    def keep(self, rows: list[int]) -> None:
        self.rows = [self.rows[r] for r in rows]
