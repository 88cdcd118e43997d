"""``python -m quadnet.train [overrides]``: one training run, or a sweep with ``-m``.

:func:`train` is the plain function (tests call it in-process); :func:`main` is the
thin Hydra entry point around it.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from quadnet import checkpoint
from quadnet.cli import fail, friendly_errors
from quadnet.config import ConfigError, TrainConfig, config_dir, register_configs, validate

log = logging.getLogger("quadnet")

# Keys that must not change when resuming: the model's shape and its data.
_SHAPE_KEYS = ("hidden_dim", "data")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _explicit_keys(cfg: Any, resolved: dict[str, Any]) -> set[str]:
    """The keys the user set: a plain dict's own keys; for Hydra's config, the CLI's overrides;
    otherwise the keys whose values differ from the defaults."""
    from hydra.core.hydra_config import HydraConfig

    if isinstance(cfg, dict):
        return set(_flatten(cfg))
    if isinstance(cfg, DictConfig) and HydraConfig.initialized():
        keys = set()
        for o in HydraConfig.get().overrides.task:
            key = o.split("=", 1)[0].lstrip("+~")
            keys.add("data.name" if key == "data" else key)
        return keys
    defaults = _flatten(dataclasses.asdict(TrainConfig()))
    return {k for k, v in _flatten(resolved).items() if defaults.get(k, object()) != v}


def _resume_config(cfg: Any, resolved: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config, with the keys the user set now on top of it."""
    merged = OmegaConf.create(ckpt["config"])
    flat = _flatten(resolved)
    for key in sorted(_explicit_keys(cfg, resolved) & set(flat)):
        OmegaConf.update(merged, key, flat[key])
    out = OmegaConf.to_container(merged)
    assert isinstance(out, dict)
    for key in _SHAPE_KEYS:
        if out[key] != ckpt["config"][key]:
            raise ConfigError(
                f"cannot resume {ckpt['path']!r} with {key}={out[key]!r}: the checkpoint was trained "
                f"with {key}={ckpt['config'][key]!r}, and a run cannot change its shape or data"
            )
    return out


def _default_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs") / f"{stamp}_{secrets.token_hex(3)}"


def train(cfg: DictConfig | dict[str, Any] | TrainConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate ``cfg``, train, write the run dir, and return the summary.

    Raises :class:`~quadnet.config.ConfigError` or
    :class:`~quadnet.checkpoint.CheckpointError` for bad input, before anything is written.
    """
    from quadnet.trainer import Trainer

    c = validate(cfg)
    ckpt = None
    if c.resume:
        ckpt = checkpoint.load(c.resume)
        c = validate(_resume_config(cfg, dataclasses.asdict(c), ckpt))
        if ckpt["epoch"] > c.epochs:
            raise ConfigError(
                f"epochs={c.epochs} is below the checkpoint's epoch {ckpt['epoch']}; resume continues to a later epoch"
            )
    trainer = Trainer(c, Path(run_dir) if run_dir is not None else _default_run_dir(), resume=ckpt)
    return trainer.fit()


def objective_value(summary: dict[str, Any], objective: str) -> float:
    """The number a sweeper minimises; +inf for a run that did not finish with finite values."""
    from quadnet.artifacts import summary_metric

    value = summary_metric(summary, objective)
    return math.inf if value is None else value


def conclude(summary: dict[str, Any], single_run: bool | None = None) -> float:
    """Report how a run ended (a sweep's jobs without their table of test points), exit
    non-zero where a single run must, and return the objective.

    Interrupted: print the resume command and exit 128+signal. Diverged: an error line, and
    exit 3 in a single run; in a sweep the other jobs carry on and this one scores +inf.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from quadnet.trainer import report

    if single_run is None:
        single_run = not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.RUN
    report(summary, table=single_run)
    status = summary["status"]
    if status == "interrupted":
        from quadnet.trainer import resume_command

        log.warning(
            "interrupted at epoch %d; checkpoint written. Resume with:\n  %s",
            summary["epoch"],
            resume_command(Path(summary["run_dir"])),
        )
        sys.exit(128 + signal.Signals[summary["signal"]].value)
    if status == "diverged":
        log.error(
            "diverged: the loss became non-finite at epoch %d (lr=%g); try a smaller lr",
            summary["epoch"],
            summary["config"]["lr"],
        )
        if single_run:
            sys.exit(3)
    return objective_value(summary, summary["config"]["objective"])


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_entry(cfg: DictConfig) -> float:
    try:
        summary = train(cfg)
    except (ConfigError, checkpoint.CheckpointError) as e:
        fail(str(e))
    return conclude(summary)


def main() -> None:
    register_configs()
    with friendly_errors():
        _hydra_entry()


if __name__ == "__main__":
    main()
