"""The torch engine: J jobs of one group trained as one program (a single run is J = 1).

Jobs share their data, dtype and device; seed, init, hidden_dim and every optimizer
hyperparameter may differ. A step is :func:`quadnet.model.forward`, the softmax
cross-entropy's gradient, :func:`quadnet.model.backward` and the update rule of
:mod:`quadnet.optim`; ``step=autograd`` takes the gradients from torch's autograd instead of
the hand-written backward (the reference that one is tested against).
On CUDA, runs of steps are captured once as a CUDA graph and replayed.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from quadnet import model, optim
from quadnet.config import TrainConfig
from quadnet.data import Dataset
from quadnet.engines import metric_rows, saved_buffers

GRAPH_STEPS = 25  # steps per CUDA graph replay: few enough that Ctrl-C stays prompt

JobState = dict[str, Any]  # {"params": Params, "optimizer": {buffer: Params}, "step": int}


class TorchEngine:
    def __init__(self, cfgs: list[TrainConfig], data: Dataset, device: str, starts: list[JobState],
                 threads: int = 1) -> None:  # fmt: skip
        c0, device, hidden = cfgs[0], torch.device(device), max(c.hidden_dim for c in cfgs)
        self.cfgs, self.device, self.dtype, self.threads = cfgs, device, getattr(torch, c0.dtype), threads
        self.name, self.rule, self.autograd = f"torch/{c0.step}", c0.optimizer, c0.step == "autograd"
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=self.dtype, device=device)  # noqa: E731
        self.splits = [(as_t(x), torch.as_tensor(y, device=device)) for x, y in data.splits]
        (self.x, self.y) = self.splits[0]
        self.onehot = F.one_hot(self.y.clamp_min(0), data.num_classes).to(self.dtype)
        self.params = model.stack([s["params"] for s in starts], hidden, self.dtype, device)
        self.h = {n: v if isinstance(v, float) else as_t(v).view(-1, 1, 1) for n, v in optim.hyper(cfgs).items()}
        saved = saved_buffers(starts, optim.buffers(self.rule, self.h))
        self.state = {n: model.stack(b, hidden, self.dtype, device) for n, b in saved.items()}
        # steps taken (Adam's bias correction)
        self.t = torch.full((), starts[0].get("step", 0), dtype=self.dtype, device=device)
        self.rows = list(range(len(cfgs)))  # the caller's index of each job still here
        self._graph: Any = None

    # ------------------------------------------------------------------ training

    def step(self) -> torch.Tensor:
        """One step of every job. Returns each job's summed log-probabilities (J,), finite exactly
        when its loss is, so that divergence is found without a host sync per step."""
        if self.rule == "adam":
            self.t += 1
        if self.autograd:  # autograd's: of the sum of the jobs' mean losses
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_() for p in self.params]  # (their storage: updated in place)
                logits = model.forward(leaves, self.x)[1]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.repeat(len(logits)), reduction="sum")
                grads = list(torch.autograd.grad(nll / self.x.shape[0], leaves))
            loss = torch.log_softmax(logits.detach(), dim=-1).sum((-2, -1))
        else:
            a, logits = model.forward(self.params, self.x)
            logp = torch.log_softmax(logits, dim=-1)
            loss = logp.sum((-2, -1))
            grads = model.backward(self.params, self.x, a, logp.exp_().sub_(self.onehot).div_(self.x.shape[0]))
        optim.RULES[self.rule](self.params, grads, self.state, self.h, self.t)
        return loss

    def run(self, n: int, stop: Callable[[], bool]) -> tuple[int, list[int]]:
        """Up to n steps of every job, stopping early when stop() says so. Returns the steps done
        and, per job, the first of them whose loss was not finite (-1: none)."""
        losses: list[torch.Tensor] = []
        with torch.inference_mode(not self.autograd), torch_threads(self.threads):
            while len(losses) < n and not (losses and stop()):
                losses += self._replayed(n - len(losses)) or [self.step()]
        bad = ~torch.isfinite(torch.stack(losses).view(len(losses), -1))
        first = torch.where(bad.any(0), bad.to(torch.uint8).argmax(0), -1)
        return len(losses), first.tolist()  # the one host sync of a call

    def _replayed(self, left: int) -> tuple[torch.Tensor, ...]:
        """GRAPH_STEPS steps replayed from the CUDA graph (captured at first use): each one's losses; none
        where no graph is used (not CUDA, autograd, cuda_graph=false, or fewer steps left)."""
        if self.device.type != "cuda" or self.autograd or not self.cfgs[0].cuda_graph or left < GRAPH_STEPS:
            return ()
        if self._graph is None:
            live = [*self.params, *(b for bufs in self.state.values() for b in bufs), self.t]
            saved = [t.clone() for t in live]
            side = torch.cuda.Stream(device=self.device)  # capture needs warm-up on a side stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            for t, s in zip(live, saved, strict=True):
                t.copy_(s)  # undo the warm-up steps
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_losses = torch.stack([self.step().view(-1) for _ in range(GRAPH_STEPS)])
        self._graph.replay()
        return self._graph_losses.clone().unbind(0)

    # ------------------------------------------------------------------ reading and dropping jobs

    @torch.no_grad()
    def metrics(self) -> list[dict[str, float]]:
        """Per job, :func:`quadnet.engines.metric_rows`."""
        return metric_rows(torch, lambda x: model.forward(self.params, x)[1].double(), self.splits)

    def export(self, rows: list[int]) -> list[JobState]:
        """Jobs at `rows`: their parameters and optimizer buffers, unpadded, float64 NumPy."""
        dims = [self.cfgs[self.rows[r]].hidden_dim for r in rows]
        bufs = {n: model.unstack(b, rows, dims) for n, b in self.state.items()}
        ps, step = model.unstack(self.params, rows, dims), int(self.t)  # (int: one host sync)
        return [{"params": p, "optimizer": {n: b[i] for n, b in bufs.items()}, "step": step} for i, p in enumerate(ps)]

    def keep(self, rows: list[int]) -> None:
        """Drop every job but those at `rows` (the batch shrinks; a CUDA graph is captured again)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        pick = lambda ts: model.lay_out([t.index_select(0, idx) for t in ts])  # noqa: E731
        self.params, self.state = pick(self.params), {n: pick(b) for n, b in self.state.items()}
        self.h = {n: v if isinstance(v, float) else v.index_select(0, idx) for n, v in self.h.items()}
        self.rows, self._graph = [self.rows[r] for r in rows], None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads for a block of work, put back after."""
    with contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(n)
        yield
