"""The numba engine: the torch step's arithmetic, compiled, with every job of a batch in a SIMD lane.

A block of L jobs keeps each parameter job-innermost: one array of rows × L lanes (rows: W1
as 2·H rows, b1 H, W2 H·C, b2 C), so every loop of a step runs over the lanes and compiles to
vector instructions, and a call runs many steps without returning to Python. Blocks train in
threads (the compiled loop releases the GIL). Narrower nets are zero-padded, as in the torch
engine. ``bench step`` measures it against the machine's arithmetic limit; the tests assert it
equals the torch engine (1e-12 in float64). numba compiles the kernels on first use and caches
them on disk (next to this file, else in the user's cache dir); where no cache dir is writable it
compiles once per process.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numba import config, njit

from quadnet import model, optim
from quadnet.engines import metric_rows, saved_buffers
from quadnet.exits import one_line

log = logging.getLogger("quadnet")

LANES = 64  # most jobs in a block: more amortise each loop's set-up, fewer stay in the L1/L2 caches
# a block's hyperparameter rows: lr, reg, momentum, beta1, beta2, eps (the kernel reads them by position)
HYPER_ROWS = tuple(dict.fromkeys(n for names in optim.HYPER.values() for n in names))


_uncached: list[str] = []  # kernels that compile in each process (no cache dir can be written)


def _jit(fn: Callable[..., Any]) -> Any:
    """njit with the on-disk cache; without one where no cache dir can be written (numba refuses)."""
    try:
        return njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function …: no locator available"
        if not _uncached:  # (one line, not one a kernel)
            where = os.environ.get("NUMBA_CACHE_DIR") or "quadnet's dir or ~/.cache"
            log.warning("numba cannot write its cache in %s: kernels compile each run", where)
        _uncached.append(fn.__name__)
        return njit(nogil=True, error_model="numpy")(fn)


@_jit
def _forward(p: Any, x: Any, h_dim: int, n_cls: int, a: Any, z: Any) -> None:
    """Logits z (N, C, L) and hidden activations a (N, H, L) of one block p (rows, L) for points x (N, D)."""
    dim, lanes = x.shape[1], p.shape[1]
    w2, b2 = (dim + 1) * h_dim, (dim + 1) * h_dim + h_dim * n_cls
    for n in range(x.shape[0]):
        for h in range(h_dim):
            an = a[n, h]
            an[:] = p[dim * h_dim + h]
            for d in range(dim):  # (one pass a feature: each vectorizes over the lanes)
                xd, wd = x[n, d], p[d * h_dim + h]
                for i in range(lanes):
                    an[i] += xd * wd[i]
            for i in range(lanes):
                an[i] = an[i] if not an[i] <= 0.0 else 0.0  # ReLU that passes NaN on, as torch's does
        for c in range(n_cls):
            z[n, c, :] = p[b2 + c]
        for h in range(h_dim):
            an = a[n, h]
            for c in range(n_cls):
                zc, w = z[n, c], p[w2 + h * n_cls + c]
                for i in range(lanes):
                    zc[i] += an[i] * w[i]


@_jit
def logits(blocks: Any, x: Any, h_dim: int, n_cls: int) -> Any:
    """Logits (B, N, C, L) of every block for points x (N, D)."""
    n_blocks, _, lanes = blocks.shape
    z = np.zeros((n_blocks, x.shape[0], n_cls, lanes), blocks.dtype)
    a = np.empty((x.shape[0], h_dim, lanes), blocks.dtype)
    for k in range(n_blocks):
        _forward(blocks[k], x, h_dim, n_cls, a, z[k])
    return z


@_jit
def _exp(u: float) -> float:
    """exp(u) for u <= 0, to about an ulp, in operations that vectorize (libm's exp does not).
    Below -60 it returns exp(-60): as a softmax weight beside the largest (1), that is < 1e-26."""
    u = u if u > -60.0 else -60.0
    k = np.floor(u * 1.4426950408889634 + 0.5)  # u = k·ln2 + r, |r| <= ln2/2
    r = (u - k * 0.6931471803691238) - k * 1.9082149292705877e-10
    e = 1.0 + r * (1.0 + r * (0.5 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (1 / 5040 + r * (
        1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (1 / 39916800 + r / 479001600)))))))))))  # fmt: skip
    for bit in (64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0):  # · 2^k, k in [-87, 0], bit by bit
        e = e * 2.0**-bit if -k >= bit else e
        k = k + bit if -k >= bit else k
    return e


@_jit
def train(blocks: Any, m: Any, v: Any, hyp: Any, bad: Any, x: Any, onehot: Any, h_dim: int, rule: int, t: int,
          done: int, steps: int, k: int) -> None:  # fmt: skip
    """`steps` full-batch steps of block k: blocks, m, v (B, rows, L) are the parameters and the
    optimizer's buffers, hyp (B, 6, L) the HYPER_ROWS values of each lane, onehot (N, C) the labels,
    rule the number of buffers the rule keeps (0 plain SGD, 1 SGD with momentum, 2 Adam), t the
    steps taken before. bad (B, L): done plus the first of these steps whose loss was not finite
    (left as it is where it is set already, or where none is)."""
    _, rows, lanes = blocks.shape
    (n, n_cls), dim = onehot.shape, x.shape[1]
    w2, b2 = (dim + 1) * h_dim, (dim + 1) * h_dim + h_dim * n_cls
    a, z = np.empty((n, h_dim, lanes), blocks.dtype), np.empty((n, n_cls, lanes), blocks.dtype)
    g, da = np.empty((rows, lanes), blocks.dtype), np.empty((n, lanes), blocks.dtype)
    top, total, finite, bc1, bc2 = np.empty(lanes), np.empty(lanes), np.empty(lanes), np.empty(lanes), np.empty(lanes)
    p, lr, reg, mom = blocks[k], hyp[k, 0], hyp[k, 1], hyp[k, 2]
    for step in range(steps):
        # forward, and the mean cross-entropy's gradient in the logits (z, in place)
        _forward(p, x, h_dim, n_cls, a, z)
        finite[:] = 0.0
        for i in range(n):
            top[:] = z[i, 0]
            total[:] = 0.0
            for c in range(1, n_cls):
                zc = z[i, c]
                for j in range(lanes):
                    top[j] = top[j] if top[j] >= zc[j] else zc[j]
            for c in range(n_cls):
                zc = z[i, c]
                for j in range(lanes):
                    u = zc[j] - top[j]
                    finite[j] += u - u  # NaN once a logit is not finite: so is the loss
                    zc[j] = _exp(u)
                    total[j] += zc[j]
            for c in range(n_cls):
                zc, y = z[i, c], onehot[i, c]
                for j in range(lanes):
                    zc[j] = (zc[j] / total[j] - y) / n
        for j in range(lanes):
            if finite[j] != 0.0 and bad[k, j] < 0:
                bad[k, j] = done + step
        # backward: g holds the gradients without the L2 term
        g[:] = 0.0
        for h in range(h_dim):
            da[:] = 0.0
            for c in range(n_cls):
                w, gw = p[w2 + h * n_cls + c], g[w2 + h * n_cls + c]
                for i in range(n):
                    zc, ah, di = z[i, c], a[i, h], da[i]
                    for j in range(lanes):
                        gw[j] += ah[j] * zc[j]
                        di[j] += zc[j] * w[j]
            gb = g[dim * h_dim + h]
            for i in range(n):
                ah, di = a[i, h], da[i]
                for j in range(lanes):
                    di[j] = di[j] if ah[j] > 0.0 else 0.0  # through ReLU
                    gb[j] += di[j]
                for d in range(dim):
                    xd, gd = x[i, d], g[d * h_dim + h]
                    for j in range(lanes):
                        gd[j] += xd * di[j]
        for c in range(n_cls):
            gc = g[b2 + c]
            for i in range(n):
                gc += z[i, c]
        # the update, torch.optim's rules; weights (not biases) decay by reg
        if rule == 2:
            for j in range(lanes):
                bc1[j] = 1.0 - hyp[k, 3, j] ** (t + step + 1)
                bc2[j] = math.sqrt(1.0 - hyp[k, 4, j] ** (t + step + 1))
        for r in range(rows):
            decay = 1.0 if r < dim * h_dim or w2 <= r < b2 else 0.0
            pr, gr, mr, vr = p[r], g[r], m[k, r], v[k, r]
            for j in range(lanes):
                gj = gr[j] + decay * reg[j] * pr[j]
                if rule == 0:
                    pr[j] -= lr[j] * gj
                elif rule == 1:
                    mr[j] = mom[j] * mr[j] + gj
                    pr[j] -= lr[j] * mr[j]
                else:
                    mr[j] += (1.0 - hyp[k, 3, j]) * (gj - mr[j])
                    vr[j] = hyp[k, 4, j] * vr[j] + (1.0 - hyp[k, 4, j]) * gj * gj
                    pr[j] -= lr[j] / bc1[j] * mr[j] / (math.sqrt(vr[j]) / bc2[j] + hyp[k, 5, j])


def from_rows(col: np.ndarray, h_dim: int, h: int, n_cls: int) -> dict[str, np.ndarray]:
    """A job's parameters in the seed layout, h hidden units, float64, from its column of rows."""
    col, dim = col.astype(np.float64), (len(col) - n_cls) // h_dim - n_cls - 1
    w1 = col[: dim * h_dim].reshape(dim, h_dim)[:, :h]
    w2 = col[(dim + 1) * h_dim : -n_cls].reshape(h_dim, n_cls)[:h]
    b1 = col[dim * h_dim : dim * h_dim + h]
    return dict(zip(model.PARAMS, (w1.copy(), b1, w2.copy(), col[-n_cls:].copy()), strict=True))


class NumbaEngine:
    """Jobs of one group (shared data, dtype, optimizer) in blocks of lanes."""

    def __init__(self, cfgs: list[Any], data: Any, starts: list[dict[str, Any]], threads: int = 1) -> None:
        self.cfgs, self.dtype, self.threads, self.name = cfgs, np.dtype(cfgs[0].dtype), threads, "numba"
        self.h_dim, self.n_cls = max(c.hidden_dim for c in cfgs), data.num_classes
        self.buffers = optim.buffers(cfgs[0].optimizer, optim.hyper(cfgs))
        self.x, self.data = data.x_train.astype(self.dtype), data
        self.onehot = np.eye(self.n_cls, dtype=self.dtype)[data.y_train.clip(0)]  # (as the torch engine)
        # (the kernel's rule: the number of buffers, 2 is Adam)
        self.t, self.rows, self.rule = starts[0].get("step", 0), list(range(len(cfgs))), len(self.buffers)
        # jobs' parameters as columns of rows (rows, J), in the order model.padded flattens them
        cols = lambda ps: np.concatenate([t.reshape(len(ps), -1) for t in model.padded(ps, self.h_dim)], 1).T  # noqa: E731
        # the kernel's m and v: zeros where the rule keeps fewer buffers
        params = cols([s["params"] for s in starts])
        saved = [cols(b) for b in saved_buffers(starts, self.buffers).values()]
        saved += [np.zeros_like(params)] * (2 - len(saved))  # (no per-job zeros for buffers the rule lacks)
        hyp = np.array([[float(getattr(c, k)) for c in self.cfgs] for k in HYPER_ROWS])
        self._pack(params, *saved, hyp)
        try:  # compiled or loaded now, before the clock starts
            self._warm_up()
        except Exception as e:  # a damaged cache (a killed writer, a disk error): dropped, and compiled afresh
            log.warning("numba's cache of quadnet's kernels was unreadable (%s); compiling them again", one_line(e))
            roots = [Path(__file__).parent / "__pycache__", *([Path(config.CACHE_DIR)] if config.CACHE_DIR else [])]
            for f in (f for root in roots for f in root.rglob(f"{Path(__file__).stem}.*.nb[ic]")):
                f.unlink(missing_ok=True)
            self._warm_up()

    def _warm_up(self) -> None:
        # (no steps of block 0: its bad steps, an int64 (B, L) array in a run, are not read)
        train(self.blocks, self.m, self.v, self.hyp, np.empty((0, 0), np.int64), self.x, self.onehot, 1, 0, 0, 0, 0, 0)
        logits(self.blocks[:0], self.x, 1, self.n_cls)

    def _pack(self, params: np.ndarray, m: np.ndarray, v: np.ndarray, hyp: np.ndarray) -> None:
        """Job columns (rows, J) into blocks (B, rows, L); padding lanes are zero (lr 0: they never move)."""
        jobs, n_blocks = params.shape[1], -(-params.shape[1] // LANES)
        lanes = -(-jobs // n_blocks)
        lanes = lanes if lanes < 8 else -(-lanes // 8) * 8  # whole vectors

        def block(cols: np.ndarray) -> np.ndarray:
            out = np.pad(cols.astype(self.dtype), [(0, 0), (0, n_blocks * lanes - jobs)])
            return np.ascontiguousarray(out.reshape(-1, n_blocks, lanes).transpose(1, 0, 2))

        self.blocks, self.m, self.v, self.hyp = block(params), block(m), block(v), block(hyp)

    def _columns(self, arr: np.ndarray) -> np.ndarray:
        return arr.transpose(1, 0, 2).reshape(arr.shape[1], -1)[:, : len(self.rows)]

    def run(self, n: int, stop: Callable[[], bool]) -> tuple[int, list[int]]:
        """Up to n steps of every job, in calls short enough that stop() is asked often between them;
        returns the steps done and, per job, the first whose loss was not finite (-1: none)."""
        bad, done = np.full(self.blocks.shape[::2], -1, np.int64), 0  # (B, L)
        per_call = max(1, min(10_000, int(3e7 // (bad.size * self.h_dim * (len(self.x) + 1)))))
        while done < n and not (done and stop()):
            k = min(n - done, per_call)
            arrays = (self.blocks, self.m, self.v, self.hyp, bad, self.x, self.onehot)
            block = functools.partial(train, *arrays, self.h_dim, self.rule, self.t + done, done, k)
            list(_pool(min(self.threads, len(bad))).map(block, range(len(bad))))  # (a task a block)
            done += k
        self.t += done if self.rule == 2 else 0  # (Adam's step count, as the torch engine keeps it)
        return done, bad.reshape(-1)[: len(self.rows)].tolist()

    def metrics(self) -> list[dict[str, float]]:
        """Per job, :func:`quadnet.engines.metric_rows`."""

        def jobs(x: np.ndarray) -> np.ndarray:  # logits (J, N, C), float64
            z = logits(self.blocks, x.astype(self.dtype), self.h_dim, self.n_cls).astype(np.float64)
            return z.transpose(0, 3, 1, 2).reshape(-1, len(x), self.n_cls)[: len(self.rows)]

        return metric_rows(np, jobs, self.data.splits)

    def export(self, rows: list[int]) -> list[dict[str, Any]]:
        """Jobs at `rows`: their parameters and optimizer buffers, unpadded, float64."""
        if not rows:  # (asked at every log point, for the frames of an animation: most have none)
            return []
        kept = (self.blocks, self.m, self.v)[: 1 + len(self.buffers)]  # (the parameters, and the rule's buffers)
        hd, nc, cols = self.h_dim, self.n_cls, [self._columns(a) for a in kept]
        jobs = [[from_rows(c[:, r], hd, self.cfgs[self.rows[r]].hidden_dim, nc) for c in cols] for r in rows]
        return [{"params": p, "optimizer": dict(zip(self.buffers, b, strict=False)), "step": self.t} for p, *b in jobs]

    def keep(self, rows: list[int]) -> None:
        """Drop every job but those at `rows` (the blocks are packed again)."""
        cols = [self._columns(a)[:, rows] for a in (self.blocks, self.m, self.v, self.hyp)]
        self.rows = [self.rows[r] for r in rows]
        if self.rows:
            self._pack(*cols)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """The threads that train blocks (the compiled loop releases the GIL), one pool per size."""
    return ThreadPoolExecutor(threads, thread_name_prefix="quadnet-numba")
