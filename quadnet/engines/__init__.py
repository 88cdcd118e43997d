"""The engines that train a batch of jobs, and what they share.

:class:`~quadnet.engines.torch.TorchEngine` (CPU or CUDA), :class:`~quadnet.engines.numba.NumbaEngine`
(compiled, CPU) and :class:`~quadnet.engines.numpy.NumpyEngine` (the hand-written oracle, one job) offer
what :func:`quadnet.loop.fit` needs: ``run``, ``metrics``, ``export``, ``keep``, ``rows`` and ``name``.
Each computes its logits its own way; :func:`metric_rows` turns them into the figures a run records.

(Nothing here is bound to the names torch, numpy or numba: importing an engine submodule binds its
name in this package's namespace.)
"""

import contextlib
import functools
import importlib.util
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quadnet.config import TrainConfig
from quadnet.exits import one_line
from quadnet.model import Params

# the figures of a metrics row, in the order metrics.csv and checkpoints keep them
METRICS = ("loss", "train_accuracy", "test_accuracy", "test_loss", "val_accuracy", "val_loss")
# engine=auto: above this many classes the numba step, whose loops run over every class of every
# point, is slower than torch's matrix products
NUMBA_MAX_CLASSES = 32
# engine=auto, one job: above this much work a step (points · (features + classes) · hidden units),
# torch's matrix products beat the numba step's scalar loops (digits' table: 18 s against 57 s)
SMALL = 100_000


def metric_rows(xp: Any, logits: Callable[[Any], Any], splits: list[tuple]) -> list[dict[str, float]]:
    """Per job: mean cross-entropy (no L2 term) and accuracy on the train, test and validation
    splits, each (points (N, D), labels (N,)); points on an axis (label -1) count in none, and a
    split without points has NaN. logits(points): the jobs' logits (J, N, C) in float64. NumPy
    arrays (xp: numpy) or torch tensors on any device (xp: torch; one transfer, of the figures)."""
    figures = []
    for x, y in splits:
        if not len(y):
            figures += [xp.full_like(figures[0], math.nan)] * 2
            continue
        with np.errstate(all="ignore"):  # (a diverged job's logits are not finite)
            z, y = logits(x)[:, y >= 0], y[y >= 0]
            top = xp.amax(z, axis=-1, keepdims=True)
            logp = z - top - xp.log(xp.exp(z - top).sum(-1, keepdims=True))
            figures += [-logp[:, range(len(y)), y].mean(-1), xp.mean(z.argmax(-1) == y, axis=-1, dtype=xp.float64)]
    # in METRICS' order: the train loss and accuracy, then the test's and validation's accuracy and loss
    table = xp.stack([figures[i] for i in (0, 1, 3, 2, 5, 4)]).tolist()
    return [dict(zip(METRICS, row, strict=True)) for row in zip(*table, strict=True)]


def saved_buffers(starts: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[Params]]:
    """Each named optimizer buffer of every job: as its start saved it, else zeros."""
    zeros = lambda p: {k: np.zeros_like(v) for k, v in p.items()}  # noqa: E731
    return {n: [s.get("optimizer", {}).get(n) or zeros(s["params"]) for s in starts] for n in names}


@functools.cache
def numba_error() -> str | None:
    """Why an installed numba does not import (a build for another NumPy, say); None where it does, or is not there."""
    try:
        if importlib.util.find_spec("numba") is not None:
            importlib.import_module("quadnet.engines.numba")
    except Exception as e:
        return one_line(e)


@functools.cache
def numba_usable() -> bool:
    """Whether engine=auto may pick numba; a broken install is one warning, and torch trains instead."""
    if why := numba_error():
        logging.getLogger("quadnet").warning("numba is installed but does not import (%s): torch trains", why)
    return importlib.util.find_spec("numba") is not None and why is None


def engine_name(c: TrainConfig, device: str, data: Any, jobs: int = 1) -> str:
    """What trains a job: engine=auto is numba on the cpu when it is installed, the step is fused, the
    classes are few enough (:data:`NUMBA_MAX_CLASSES`) and the jobs many or each small (its loops
    are vectorized over jobs: one big job is faster in torch's matrix products), else torch."""
    small = len(data.x_train) * (data.x_train.shape[1] + data.num_classes) * c.hidden_dim <= SMALL
    fits = data.num_classes <= NUMBA_MAX_CLASSES and (jobs > 1 or small)
    if c.engine == "auto" and c.step == "fused" and device == "cpu" and fits and numba_usable():
        return "numba"
    return f"torch/{c.step}" if c.engine in ("auto", "torch") else c.engine


def build(cfgs: list[TrainConfig], data: Any, starts: list[dict[str, Any]], device: str) -> Any:
    """The engine for a batch of jobs on a device (one job for engine=numpy). threads=0 is every
    usable CPU for numba (its threads do not slow down beside busy processes) and one for torch
    (torch's threads contend with a busy process for tensors this small)."""
    name = engine_name(cfgs[0], device, data, len(cfgs))
    if name == "numpy":
        return importlib.import_module("quadnet.engines.numpy").NumpyEngine(cfgs, data, starts)
    threads = min(cfgs[0].threads or (usable_cpus() if name == "numba" else 1), usable_cpus())
    if name == "numba":
        return importlib.import_module("quadnet.engines.numba").NumbaEngine(cfgs, data, starts, threads)
    return importlib.import_module("quadnet.engines.torch").TorchEngine(cfgs, data, device, starts, threads)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (SLURM sets it) and a cgroup quota
    (``docker --cpus`` sets it); not ``os.cpu_count()``, the machine's."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    v1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    for files in (["/sys/fs/cgroup/cpu.max"], v1):  # cgroup v2 (both in one file), then v1
        with contextlib.suppress(OSError, ValueError):
            quota, period = " ".join(Path(f).read_text() for f in files).split()[:2]
            if quota not in ("max", "-1"):
                n = min(n, max(1, -(-int(quota) // int(period))))  # (quota / period, rounded up)
    return n
