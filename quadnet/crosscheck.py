"""``python -m quadnet.crosscheck [overrides] [--tol 1e-9]``: autograd and hand-written backprop agree.

From the same initial weights, in float64, it trains the NumPy reference, the numba engine
(when installed) and the torch engine (both its fused step and plain autograd) side by side,
and reports the largest
difference in the training loss along the way, in the final weights and in the test
probabilities. It also compares the NumPy gradients with torch autograd on the same
weights, and with centred finite differences. Exit 0 when all are within --tol, 1 if not.
Engines whose loss became non-finite at the same epoch agree up to it; at different epochs,
they do not. ``resume=RUN [epochs=N]`` cross-checks N epochs from a checkpoint's weights,
optimizer state and config.
"""

import dataclasses
import importlib.util
from typing import Any

import numpy as np
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from quadnet import checkpoint, model
from quadnet.config import ConfigError, TrainConfig, compose, log_every, one_line, validate
from quadnet.data import make_dataset
from quadnet.engines import build
from quadnet.engines import numpy as reference
from quadnet.exits import ArgumentParser, command
from quadnet.loop import start_state


def autograd_grads(params: reference.Params, x: np.ndarray, y: np.ndarray, reg: float) -> reference.Params:
    """Gradients of data loss + reg/2·‖W‖² by torch autograd through :func:`quadnet.model.forward`, seed layout."""
    leaves = [t.requires_grad_() for t in model.stack([params], params["b1"].shape[0], torch.float64, "cpu")]
    loss = torch.nn.functional.cross_entropy(model.forward(leaves, torch.from_numpy(x))[1][0], torch.from_numpy(y))
    grads = torch.autograd.grad(loss + 0.5 * reg * (leaves[0].square().sum() + leaves[2].square().sum()), leaves)
    return model.unstack(list(grads), [0], [params["b1"].shape[0]])[0]


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest |a - b| between two arrays, lists, or dicts of arrays such as weights; NaN stays NaN."""
    return float(np.max([max_abs_diff(a[k], b[k]) for k in a] if isinstance(a, dict) else np.abs(np.subtract(a, b))))


def check(cfg: TrainConfig, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every comparison for cfg (forced to float64 on the CPU) from a state (params, optimizer
    buffers, step; by default cfg's initial weights); return the figures."""
    data = make_dataset(cfg.data)
    x, y, reg = data.x_train, data.y_train, cfg.reg
    state = state or start_state(cfg, data)
    engines = {}
    for name in ("numpy", *(["numba"] if importlib.util.find_spec("numba") else []), "torch/fused", "torch/autograd"):
        engine, _, step = name.partition("/")
        c = dataclasses.replace(cfg, dtype="float64", device="cpu", engine=engine, step=step or "fused", threads=1)
        engines[name] = build([c], data, [{"optimizer": {}, **state}], "cpu")

    at = [*range(0, cfg.epochs, log_every(cfg)), cfg.epochs]  # the log steps
    along = {n: [e.metrics()[0]["loss"]] for n, e in engines.items()}  # the training loss at each log step
    for steps in np.diff(at):
        for n, e in engines.items():
            e.run(int(steps), lambda: False)
            along[n].append(e.metrics()[0]["loss"])
    final = {n: e.export([0])[0]["params"] for n, e in engines.items()}
    probs = {n: reference.softmax(reference.forward(p, data.x_test)[0]) for n, p in final.items()}
    figures = {"loss_along_the_way": along, "final_weights": final, "test_probs": probs}
    compared = {n: {k: max_abs_diff(f[n], f["numpy"]) for k, f in figures.items()} for n in engines if n != "numpy"}
    # the log step at which each engine's loss became non-finite (None: never)
    bad = {n: next((e for e, v in zip(at, a, strict=True) if not np.isfinite(v)), None) for n, a in along.items()}
    # gradients on the same weights: at the start and at the end of training
    p = {k: v.copy() for k, v in state["params"].items()}
    pairs = (("initial", p), ("final", final["numpy"]))
    grads = {k: max_abs_diff(autograd_grads(q, x, y, reg), reference.loss_and_grads(q, x, y, reg)[1]) for k, q in pairs}
    # and the analytic gradient against centred finite differences (a relative error)
    g, objective = reference.loss_and_grads(p, x, y, reg)[1], lambda _: reference.objective(p, x, y, reg)
    rel = max(reference.rel_error(g[k], reference.eval_numerical_gradient(objective, p[k])) for k in p)
    figs = {"engines": compared, "gradients_vs_autograd": grads, "gradient_check_rel_error": rel}
    return {"epochs": cfg.epochs, "diverged": bad, **figs}


def resumed(cfg: TrainConfig, overrides: list[str]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """cfg and no state; with resume=, the checkpoint's config (its epochs: cfg's) and its state."""
    if not cfg.resume:
        return cfg, None
    if other := [o for o in overrides if o.split("=", 1)[0] not in ("resume", "epochs")]:
        raise ConfigError(f"{other[0]} is not allowed with resume=: its checkpoint's config is used (epochs= aside)")
    ck = checkpoint.load(cfg.resume)
    print(f"from {ck['path']} at epoch {ck['epoch']}")
    return dataclasses.replace(ck["cfg"], epochs=cfg.epochs, resume=None), ck["state"]


@command(explain=one_line, bad=(HydraException, OmegaConfBaseException))
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m quadnet.crosscheck", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("overrides", nargs="*", help="config overrides, as for quadnet.train (key=value)")
    parser.add_argument("--tol", type=float, default=1e-9, help="largest allowed difference (default 1e-9)")
    rel_help = "largest allowed relative error against finite differences (default 1e-7)"
    parser.add_argument("--grad-check-tol", type=float, default=1e-7, help=rel_help)
    args = parser.parse_args(argv)
    if not all(0 <= t < float("inf") for t in (args.tol, args.grad_check_tol)):
        parser.error("--tol and --grad-check-tol must be finite and >= 0")
    if set_here := [o for o in args.overrides if o.split("=")[0].lstrip("+~") in ("dtype", "device", "engine", "step")]:
        parser.error(f"{set_here[0]} is not allowed: crosscheck runs every engine and step in float64 on the CPU")
    cfg, state = resumed(validate(compose(args.overrides)), args.overrides)
    make_dataset(cfg.data)  # (a bad CSV says so here, in one line)
    net = f"hidden_dim={cfg.hidden_dim}, lr={cfg.lr:g}, reg={cfg.reg:g}, momentum={cfg.momentum:g}, {cfg.optimizer}"
    setup = f"{cfg.epochs} epochs, {net}, init={cfg.init}, data={cfg.data.name}, float64"
    print(f"cross-check: {setup}; tolerance {args.tol:g}")
    with np.errstate(all="ignore"):  # a diverging config is reported as FAIL, not warned about
        r = check(cfg, state)
    print(f"{'against numpy':>16}  {'loss (max over run)':>20}  {'final weights':>14}  {'test probs':>11}")
    for name, d in r["engines"].items():
        print(f"{name:>16}  {d['loss_along_the_way']:>20.3e}  {d['final_weights']:>14.3e}  {d['test_probs']:>11.3e}")
    g, gc, when = r["gradients_vs_autograd"], r["gradient_check_rel_error"], set(r["diverged"].values())
    same = len(when) == 1 and None not in when  # every engine diverged at the same epoch: they agree
    judged = [g["initial"]] if same else [*g.values(), *(v for d in r["engines"].values() for v in d.values())]
    worst = float(np.max(judged))  # (NaN: fail)
    print(f"numpy gradients vs autograd: {g['initial']:.3e} at the initial weights, {g['final']:.3e} at the final")
    print(f"numpy gradients vs centred differences: relative error {gc:.3e} (tolerance {args.grad_check_tol:g})")
    # (the figures after a divergence are not finite: a divergence at the same epoch is agreement)
    if same:
        print(f"every engine diverged at epoch {min(when)}: they agree")
    elif when != {None}:
        each = ", ".join(f"{n} {'never' if e is None else f'at epoch {e}'}" for n, e in r["diverged"].items())
        print(f"diverged at different epochs: {each}")
    ok = worst <= args.tol and gc <= args.grad_check_tol and len(when) == 1
    print(f"{'PASS' if ok else 'FAIL'}: largest difference {worst:.3e}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
