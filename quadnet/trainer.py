"""The Trainer: builds a run from a validated config, trains it, and writes its dir.

Reading order: ``Trainer.__init__`` sets up (device, data, weights, engine),
``Trainer.fit`` is the training loop, and ``Trainer.finish`` evaluates and writes
the artifacts. Both engines (torch and numpy) go through the same loop, so they
log, checkpoint, stop and save identically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from quadnet import artifacts, checkpoint, plots
from quadnet.config import ConfigError, TrainConfig, to_dict
from quadnet.data import Dataset, make_dataset
from quadnet.device import describe, resolve_device
from quadnet.model import initial_params
from quadnet.reference import log_softmax, softmax

log = logging.getLogger("quadnet")


class Engine(Protocol):
    name: str

    def train_steps(self, n: int, stop: Any) -> tuple[int, bool]: ...
    def logits(self, x: np.ndarray) -> np.ndarray: ...
    def numpy_params(self) -> dict[str, np.ndarray]: ...
    def momentum_buffers(self) -> dict[str, np.ndarray] | None: ...
    def load(self, params: dict[str, np.ndarray], momentum: dict[str, np.ndarray] | None) -> None: ...


def loss_and_accuracy(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of logits (N, 4) against classes y (N,).

    Points without a quadrant (class -1, on an axis) count in neither.
    """
    keep = y >= 0
    if not keep.any():
        return math.nan, math.nan
    z, t = logits[keep], y[keep]
    loss = float(-np.mean(log_softmax(z)[np.arange(len(t)), t]))
    acc = float(np.mean(z.argmax(axis=1) == t))
    return loss, acc


def build_engine(cfg: TrainConfig, params: dict[str, np.ndarray], data: Dataset, device: torch.device) -> Engine:
    if cfg.engine == "numpy":
        from quadnet.reference import NumpyEngine

        return NumpyEngine(
            params, data.x_train, data.y_train, lr=cfg.lr, reg=cfg.reg, momentum=cfg.momentum, dtype=cfg.dtype
        )
    from quadnet.torch_engine import TorchEngine

    return TorchEngine(
        params,
        data.x_train,
        data.y_train,
        lr=cfg.lr,
        reg=cfg.reg,
        momentum=cfg.momentum,
        dtype=cfg.dtype,
        device=device,
        step=cfg.step,
        cuda_graph=cfg.cuda_graph,
    )


def resume_command(run_dir: Path) -> str:
    return f"python -m quadnet.train resume={shlex.quote(str(run_dir))}"


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        resume: dict[str, Any] | None = None,
        device: torch.device | None = None,
        device_label: str | None = None,
        summary_extra: dict[str, Any] | None = None,
    ) -> None:
        """``device`` overrides cfg.device; ``device_label`` is what the summary records as the
        device (a batched job is written on the CPU after training elsewhere); ``summary_extra``
        adds fields to summary.json."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # --- where to compute: a missing device is an error, never a silent fallback
        if cfg.engine == "numpy" and cfg.device not in ("auto", "cpu"):
            raise ConfigError(f"device={cfg.device!r} is not allowed with engine=numpy: it runs on the cpu")
        if device is None:
            device = resolve_device(cfg.device) if cfg.engine == "torch" else torch.device("cpu")
        self.device = device
        self.device_label = device_label or describe(device)
        self.summary_extra = summary_extra or {}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # --- data, and the initial weights (the seed's draw by default) or a checkpoint's
        self.data = make_dataset(cfg.data)
        self.epoch, self.history = 0, []
        if resume is None:
            params, momentum = initial_params(cfg.hidden_dim, cfg.seed, cfg.init), None
        else:
            params, momentum = resume["params"], resume["momentum_params"]
            self.epoch = resume["epoch"]
            self.history = [r for r in resume["history"] if r["epoch"] <= self.epoch]
        # --- the engine that owns the parameters and the optimizer state
        self.engine = build_engine(cfg, params, self.data, self.device)
        if momentum is not None:
            self.engine.load(params, momentum)
        self._stop_signal: int | None = None
        self._tb: Any = None

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        d = self.data
        loss, train_acc = loss_and_accuracy(self.engine.logits(d.x_train), d.y_train)
        test_loss, test_acc = loss_and_accuracy(self.engine.logits(d.x_test), d.y_test)
        return {
            "epoch": self.epoch,
            "loss": loss,
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "test_loss": test_loss,
        }

    def _record(self) -> dict[str, float]:
        row = self.evaluate()
        if self.history and self.history[-1]["epoch"] == row["epoch"]:
            self.history[-1] = row
        else:
            self.history.append(row)
        if self._tb is not None:
            for key in ("loss", "train_accuracy", "test_accuracy", "test_loss"):
                self._tb.add_scalar(key, row[key], self.epoch)
        return row

    def save_checkpoint(self, status: str) -> None:
        checkpoint.save(
            self.run_dir / checkpoint.CHECKPOINT,
            params=self.engine.numpy_params(),
            momentum=self.engine.momentum_buffers(),
            epoch=self.epoch,
            config=to_dict(self.cfg),
            history=self.history,
            status=status,
        )

    # ------------------------------------------------------------------ the training loop

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        log.info(
            "quadnet: %s data, hidden_dim=%d, %d epochs, %s engine%s on %s (%s)",
            cfg.data.name,
            cfg.hidden_dim,
            cfg.epochs,
            cfg.engine,
            f"/{cfg.step}" if cfg.engine == "torch" else "",
            self.device_label,
            cfg.dtype,
        )
        if self.epoch:
            log.info("resuming at epoch %d", self.epoch)
        self._tb = _tensorboard(cfg, self.run_dir)
        bar = _progress_bar(cfg, self.epoch)
        print_every = _print_interval(cfg)
        status = "completed"
        with _threads(cfg, self.device), _catch_signals(self):
            t0 = time.perf_counter()
            if not self.history or self.history[-1]["epoch"] != self.epoch:
                self._record()  # the starting point: epoch 0, or the resumed epoch
            while self.epoch < cfg.epochs:
                # 1. run steps up to the next log point, checkpoint or the end
                n = min(cfg.log_every - self.epoch % cfg.log_every, cfg.epochs - self.epoch)
                if cfg.checkpoint_every:
                    n = min(n, cfg.checkpoint_every - self.epoch % cfg.checkpoint_every)
                done, diverged = self.engine.train_steps(n, self._should_stop)
                self.epoch += done
                if bar is not None:
                    bar.update(done)
                # 2. stop at once on a non-finite loss or a signal
                if diverged:
                    status = "diverged"
                    break
                if self._stop_signal is not None:
                    status = "interrupted"
                    break
                # 3. log and checkpoint at their points
                if self.epoch % cfg.log_every == 0 or self.epoch == cfg.epochs:
                    row = self._record()
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                    elif self.epoch % print_every == 0 or self.epoch == cfg.epochs:
                        log.info(
                            "epoch %*d/%d  loss %.6g  train_acc %.3f  test_acc %.3f",
                            len(str(cfg.epochs)),
                            self.epoch,
                            cfg.epochs,
                            row["loss"],
                            row["train_accuracy"],
                            row["test_accuracy"],
                        )
                # (the last one is written by finish(), with the run's final status)
                if cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0 and self.epoch < cfg.epochs:
                    self.save_checkpoint("running")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        return self.finish(status, train_seconds)

    def _should_stop(self) -> bool:
        return self._stop_signal is not None

    # ------------------------------------------------------------------ artifacts

    def finish(self, status: str, train_seconds: float) -> dict[str, Any]:
        cfg, d, run_dir = self.cfg, self.data, self.run_dir
        if status == "diverged":  # the weights are not finite: nothing to evaluate
            final = {
                "epoch": self.epoch,
                "loss": math.nan,
                "train_accuracy": math.nan,
                "test_accuracy": math.nan,
                "test_loss": math.nan,
            }
            self.history.append(final)
        elif self.history[-1]["epoch"] == self.epoch:
            final = self.history[-1]
        else:
            final = self._record()
        with np.errstate(all="ignore"):  # a diverged run's weights are not finite
            probs = softmax(self.engine.logits(d.x_test))
        predictions = artifacts.prediction_rows(d.x_test, probs)
        summary = {
            "status": status,
            "epoch": self.epoch,
            "epochs": cfg.epochs,
            "final_loss": final["loss"],
            "test_loss": final["test_loss"],
            "train_accuracy": final["train_accuracy"],
            "test_accuracy": final["test_accuracy"],
            "train_seconds": train_seconds,
            "device": self.device_label,
            "dtype": cfg.dtype,
            "engine": cfg.engine if cfg.engine == "numpy" else f"torch/{cfg.step}",
            "run_dir": str(run_dir),
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
            "predictions": predictions,
            "signal": signal.Signals(self._stop_signal).name if status == "interrupted" else None,
            "config": to_dict(cfg),
            **self.summary_extra,
        }
        # The checkpoint first (it is what resume needs), then the human-facing files.
        self.save_checkpoint(status)
        artifacts.write_metrics(run_dir / "metrics.csv", self.history)
        if status == "completed":
            checkpoint.save(
                run_dir / checkpoint.MODEL,
                params=self.engine.numpy_params(),
                momentum=None,
                epoch=self.epoch,
                config=to_dict(cfg),
                status=status,
            )
        if cfg.plots and self.epoch > 0:  # no curves (and no matplotlib import) for an untrained run
            title = f"hidden_dim={cfg.hidden_dim} lr={cfg.lr:g} reg={cfg.reg:g} seed={cfg.seed}"
            plots.plot_curves(run_dir / "loss.png", self.history, title)
            if status != "diverged":
                plots.plot_regions(run_dir / "decision_regions.png", self.engine.numpy_params(), d, title)
        artifacts.write_json(run_dir / "summary.json", summary)
        if self._tb is not None:
            self._tb.close()
        return summary


# ---------------------------------------------------------------------- helpers of fit()


def report(s: dict[str, Any], table: bool = True) -> None:
    """The headline figures of a finished run, after its table of test points unless table=False.

    Sweeps leave the table out: thousands of them would bury the sweep's own output (each
    job's summary.json has its predictions).
    """
    preds = s["predictions"] if table else []
    lines = ["", f"{'point':>16}  {'predicted':>9}  {'p(predicted)':>12}  {'true':>4}"] if preds else []
    for p in preds[:8]:
        q, t = p["quadrant"], p["true_quadrant"]
        prob = p["probs"][q - 1] if q else math.nan
        point = "(" + ", ".join(f"{v:g}" for v in p["point"]) + ")"
        lines.append(f"{point:>16}  {q if q else '-':>9}  {prob:>12.9f}  {t if t else '-':>4}")
    if len(preds) > 8:
        lines.append(f"{'…':>16}  ({len(preds) - 8} more test points in summary.json)")

    def pct(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"

    lines.append(
        f"status {s['status']} at epoch {s['epoch']}/{s['epochs']}   "
        f"train accuracy {pct(s['train_accuracy'])}   test accuracy {pct(s['test_accuracy'])}   "
        f"final loss {s['final_loss']:.6g}   train_seconds {s['train_seconds']:.3f}"
    )
    lines.append(f"run dir: {s['run_dir']}")
    log.info("\n".join(lines))


def _progress_bar(cfg: TrainConfig, start: int) -> Any:
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not show or cfg.epochs == start:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.epochs, initial=start, unit="epoch", dynamic_ncols=True, leave=False)


def _print_interval(cfg: TrainConfig) -> int:
    """Without a bar, print about ten lines a run, at multiples of log_every."""
    tenth = max(1, cfg.epochs // 10)
    return max(cfg.log_every, math.ceil(tenth / cfg.log_every) * cfg.log_every)


def _tensorboard(cfg: TrainConfig, run_dir: Path) -> Any:
    if cfg.logger != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "logger='tensorboard' needs the tensorboard package: pip install 'quadnet[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


@contextlib.contextmanager
def _threads(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Tiny tensors run fastest on one thread; threads=N overrides. Restored afterwards."""
    before = torch.get_num_threads()
    want = cfg.threads or 1
    if device.type == "cpu" and want != before:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _catch_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop_signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
