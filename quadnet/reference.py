"""The NumPy engine: the two-layer net with backprop written out by hand.

Each layer is a ``*_forward`` / ``*_backward`` pair. A forward returns its output
and a cache of what its backward needs; a backward takes the upstream gradient
and that cache and returns the gradients of its inputs. Shapes use N for the
batch, D for the input size (2), H for the hidden width and C for the classes (4).

This is the reference the torch engine is checked against
(``python -m quadnet.crosscheck``), and :func:`eval_numerical_gradient` checks
it in turn against centred finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Params = dict[str, np.ndarray]  # W1 (D, H), b1 (H,), W2 (H, C), b2 (C,)
WEIGHTS = ("W1", "W2")  # the parameters that `reg` decays; biases are not


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
    """out = x @ w + b.  x: (N, D), w: (D, M), b: (M,) → out: (N, M)."""
    out = x @ w + b
    return out, (x, w)


def affine_backward(dout: np.ndarray, cache: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout: (N, M) → dx: (N, D), dw: (D, M), db: (M,)."""
    x, w = cache
    dx = dout @ w.T
    dw = x.T @ dout
    db = dout.sum(axis=0)
    return dx, dw, db


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    """out = max(0, x), elementwise. x: any shape → out: same shape."""
    return np.maximum(0, x), x


def relu_backward(dout: np.ndarray, cache: Any) -> np.ndarray:
    """Passes the gradient where the input was positive. dout, x: same shape → dx."""
    x = cache
    dx = dout.copy()
    dx[x <= 0] = 0
    return dx


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max for stability. scores: (N, C) → (N, C)."""
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log of the softmax, computed stably. scores: (N, C) → (N, C)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_loss(scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(scores) against labels.

    scores: (N, C) logits, y: (N,) ints in [0, C) → (loss, dscores (N, C)).
    The gradient uses the probabilities exactly as the seed computes them; the loss
    comes from the log-softmax, so a confidently wrong point gives a large finite loss
    rather than log(0) = -inf.
    """
    n = scores.shape[0]
    rows = np.arange(n)
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    loss = -np.sum(shifted[rows, y] - np.log(total[:, 0])) / n
    dscores = exp / total  # the softmax probabilities
    dscores[rows, y] -= 1
    dscores /= n
    return float(loss), dscores


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
    dw1 += reg * params["W1"]
    dw2 += reg * params["W2"]
    return {"W1": dw1, "b1": db1, "W2": dw2, "b2": db2}


def loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray, reg: float) -> tuple[float, Params]:
    """The data loss (no penalty term, as the seed prints it) and the full gradients."""
    scores, caches = forward(params, x)
    loss, dscores = softmax_loss(scores, y)
    return loss, backward(dscores, caches, params, reg)


def objective(params: Params, x: np.ndarray, y: np.ndarray, reg: float) -> float:
    """The function whose gradient :func:`loss_and_grads` returns: data loss + L2 penalty."""
    scores, _ = forward(params, x)
    loss, _ = softmax_loss(scores, y)
    return loss + 0.5 * reg * sum(float(np.sum(params[k] ** 2)) for k in WEIGHTS)


def sgd_update(params: Params, grads: Params, velocity: Params | None, lr: float, momentum: float) -> None:
    """In place: p -= lr·g, or with momentum (torch.optim.SGD's rule) v = m·v + g; p -= lr·v."""
    for k, p in params.items():
        if velocity is None:
            p -= lr * grads[k]
        else:
            v = velocity[k]
            v *= momentum
            v += grads[k]
            p -= lr * v


def eval_numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Centred-difference gradient of scalar f at x: (f(x+h) - f(x-h)) / 2h per element.

    x is perturbed in place and restored, so f may close over it.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        f_plus = f(x)
        x[ix] = old - h
        f_minus = f(x)
        x[ix] = old
        grad[ix] = (f_plus - f_minus) / (2 * h)
        it.iternext()
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """‖a-b‖ / max(1e-12, ‖a‖+‖b‖): a relative error that tiny gradient entries cannot inflate."""
    return float(np.linalg.norm(a - b) / max(1e-12, np.linalg.norm(a) + np.linalg.norm(b)))


class NumpyEngine:
    """Trains :data:`Params` with :func:`loss_and_grads` and :func:`sgd_update`."""

    name = "numpy"

    def __init__(
        self, params: Params, x: np.ndarray, y: np.ndarray, *, lr: float, reg: float, momentum: float, dtype: str
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.params = {k: v.astype(self.dtype, copy=True) for k, v in params.items()}
        self.x, self.y = x.astype(self.dtype), y
        self.lr, self.reg, self.momentum = lr, reg, momentum
        self.velocity = {k: np.zeros_like(v) for k, v in self.params.items()} if momentum else None

    def train_steps(self, n: int, stop: Callable[[], bool]) -> tuple[int, bool]:
        """Up to n full-batch steps; returns (steps done, whether the loss went non-finite)."""
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported, not warned
            for i in range(n):
                loss, grads = loss_and_grads(self.params, self.x, self.y, self.reg)
                if not np.isfinite(loss):
                    return i, True
                sgd_update(self.params, grads, self.velocity, self.lr, self.momentum)
                if stop():
                    return i + 1, False
        return n, False

    def logits(self, x: np.ndarray) -> np.ndarray:
        scores, _ = forward(self.params, x.astype(self.dtype))
        return scores.astype(np.float64)

    def numpy_params(self) -> Params:
        return {k: v.astype(np.float64) for k, v in self.params.items()}

    def momentum_buffers(self) -> Params | None:
        return None if self.velocity is None else {k: v.astype(np.float64) for k, v in self.velocity.items()}

    def load(self, params: Params, momentum: Params | None) -> None:
        for k in self.params:
            self.params[k][...] = params[k]
            if self.velocity is not None and momentum is not None:
                self.velocity[k][...] = momentum[k]
