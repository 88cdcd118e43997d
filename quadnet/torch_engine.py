"""The torch engine: QuadNet trained with SGD, by autograd or by a fused hand-written step.

``step=autograd`` is the reference semantics: ``nn.Module`` forward, ``cross_entropy``,
``backward()`` and ``torch.optim.SGD`` with weight decay on the weights only.

``step=fused`` computes the same gradients by hand with a few in-place torch ops
and applies the same SGD rule to the same parameter and momentum tensors. On
these tiny tensors the per-op overhead of autograd and the optimizer dominates,
so this is several times faster; the tests assert it equals autograd. On CUDA the
fused step is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from quadnet.model import QuadNet, numpy_from_state, state_from_numpy

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchEngine:
    name = "torch"

    def __init__(
        self,
        params: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        *,
        lr: float,
        reg: float,
        momentum: float,
        dtype: str,
        device: torch.device,
        step: str = "fused",
        cuda_graph: bool = True,
    ) -> None:
        self.device, self.dtype = device, DTYPES[dtype]
        self.lr, self.reg, self.momentum = lr, reg, momentum
        self.model = QuadNet(params["b1"].shape[0]).to(device, self.dtype)
        self.model.load_state_dict(state_from_numpy(params))
        self.x = torch.as_tensor(x, dtype=self.dtype, device=device)
        self.y = torch.as_tensor(y, dtype=torch.long, device=device)
        m = self.model
        params = [m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias]
        self.step_kind = step
        self.optimizer: torch.optim.SGD | None = None
        if step == "autograd":
            self.optimizer = torch.optim.SGD(
                [{"params": params[0::2], "weight_decay": reg}, {"params": params[1::2], "weight_decay": 0.0}],
                lr=lr,
                momentum=momentum,
            )
        else:
            # Plain tensors sharing the parameters' storage: in-place updates reach the model,
            # without autograd's bookkeeping or nn.Module attribute look-ups on every op. No
            # torch.optim object either: the first one built imports torch._dynamo (seconds).
            self._raw = [p.detach() for p in params]
            self._onehot = F.one_hot(self.y, 4).to(self.dtype)
            self._buffers = [torch.zeros_like(p) for p in params] if momentum else []
        self._graph: _GraphStep | None = None
        self._use_graph = step == "fused" and cuda_graph and device.type == "cuda"

    # ------------------------------------------------------------------ one step

    def _loss_autograd(self) -> torch.Tensor:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        return loss

    def _step_autograd(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()  # type: ignore[union-attr]

    def _forward_fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits' log-softmax (N, C), with the hidden pre-activations z1 and activations a (N, H)."""
        w1, b1, w2, b2 = self._raw
        z1 = torch.addmm(b1, self.x, w1.t())  # (N, H)
        a = z1.clamp_min(0)  # ReLU
        logp = torch.log_softmax(torch.addmm(b2, a, w2.t()), dim=1)  # (N, C)
        return z1, a, logp

    def _step_fused(self, z1: torch.Tensor, a: torch.Tensor, logp: torch.Tensor) -> None:
        """One SGD step from the forward's tensors, with the gradients written out by hand.

        With L the mean cross-entropy over N points and dz2 = softmax − onehot (N, C):
        dL/dW2 = dz2ᵀa / N, dL/db2 = Σ dz2 / N, dz1 = (dz2 W2) ⊙ [z1 > 0],
        dL/dW1 = dz1ᵀx / N, dL/db1 = Σ dz1 / N; weight decay adds reg·W to the weights'.
        The update is torch.optim.SGD's, in the same order, so float32 rounds as autograd does.
        """
        w1, _, w2, _ = self._raw
        x, lr, reg, inv_n = self.x, self.lr, self.reg, 1.0 / self.x.shape[0]
        dz2 = logp.exp_().sub_(self._onehot)  # N · dL/dlogits
        dz1 = torch.ops.aten.threshold_backward(dz2 @ w2, z1, 0)  # through ReLU, before w2 changes
        grads = (
            torch.addmm(w1, dz1.t(), x, beta=reg, alpha=inv_n),
            dz1.sum(0),
            torch.addmm(w2, dz2.t(), a, beta=reg, alpha=inv_n),
            dz2.sum(0),
        )
        scale = (1.0, inv_n, 1.0, inv_n)  # the bias sums still carry the factor N
        if not self.momentum:
            for p, g, k in zip(self._raw, grads, scale, strict=True):
                p.add_(g, alpha=-lr * k)
            return
        for p, g, k, buf in zip(self._raw, grads, scale, self._buffers, strict=True):
            buf.mul_(self.momentum).add_(g, alpha=k)  # torch.optim.SGD: buf = m·buf + g; p -= lr·buf
            p.add_(buf, alpha=-lr)

    # ------------------------------------------------------------------ the loop

    def train_steps(self, n: int, stop: Callable[[], bool]) -> tuple[int, bool]:
        """Up to n full-batch steps; returns (steps done, whether the loss went non-finite).

        On CPU the loss is checked every step, before its update, so a diverging run
        stops at once. A CUDA graph checks on the device and reports the exact step at
        the end of the call, without a host sync per step.
        """
        if self._use_graph:
            if self._graph is None:
                self._graph = _GraphStep(self)
            return self._graph.run(n, stop)
        if self.step_kind == "fused":
            with torch.inference_mode():
                for i in range(n):
                    z1, a, logp = self._forward_fused()
                    # the loss is non-finite exactly when some log-probability is
                    if not math.isfinite(logp.sum().item()):
                        return i, True
                    self._step_fused(z1, a, logp)
                    if stop():
                        return i + 1, False
            return n, False
        with torch.enable_grad():
            for i in range(n):
                loss = self._loss_autograd()
                if not torch.isfinite(loss):
                    return i, True
                self._step_autograd(loss)
                if stop():
                    return i + 1, False
        return n, False

    # ------------------------------------------------------------------ evaluation and state

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        return self.model(xt).to("cpu", torch.float64).numpy()

    def numpy_params(self) -> dict[str, np.ndarray]:
        return numpy_from_state(self.model.state_dict())

    def momentum_buffers(self) -> dict[str, np.ndarray] | None:
        if not self.momentum:
            return None
        names = [n for n, _ in self.model.named_parameters()]
        if self.optimizer is None:
            bufs = self._buffers
        else:  # torch.optim.SGD creates its buffers at the first step
            bufs = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.model.parameters()]
            bufs = [torch.zeros_like(p) if b is None else b for b, p in zip(bufs, self.model.parameters(), strict=True)]
        return numpy_from_state(dict(zip(names, bufs, strict=True)))

    def load(self, params: dict[str, np.ndarray], momentum: dict[str, np.ndarray] | None) -> None:
        with torch.no_grad():
            for name, t in state_from_numpy(params).items():
                self.model.get_parameter(name).copy_(t)
            if not (self.momentum and momentum is not None):
                return
            for i, (name, t) in enumerate(state_from_numpy(momentum).items()):
                p = self.model.get_parameter(name)
                if self.optimizer is None:
                    self._buffers[i].copy_(t)
                else:
                    self.optimizer.state[p]["momentum_buffer"] = t.to(p).clone()


class _GraphStep:
    """The fused step captured as one CUDA graph, with on-device divergence tracking."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        dev = engine.device
        self.count = torch.zeros((), dtype=torch.long, device=dev)  # steps replayed so far
        self.first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first non-finite step
        state = [*engine._raw, *engine._buffers]
        saved = [t.clone() for t in state]
        # Warm up on a side stream (as CUDA graph capture requires), then undo the warm-up steps.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.no_grad():
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            self.count.zero_()
            self.first_bad.fill_(-1)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._body()

    def _body(self) -> None:
        e = self.engine
        z1, a, logp = e._forward_fused()
        bad = ~torch.isfinite(logp.sum())
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.count, self.first_bad))
        e._step_fused(z1, a, logp)
        self.count.add_(1)

    def run(self, n: int, stop: Callable[[], bool]) -> tuple[int, bool]:
        start = int(self.count)
        done = n
        for i in range(n):
            self.graph.replay()
            if stop():
                done = i + 1
                break
        bad = int(self.first_bad)  # the one host sync of the call
        if bad >= 0:
            return bad - start, True
        return done, False
