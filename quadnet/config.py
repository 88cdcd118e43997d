"""Every setting quadnet knows, its default, and the checks it must pass.

The dataclasses below are the single source of defaults (the YAML files in
``configs/`` only pick a data variant and set Hydra's output dirs). Hydra
composes the YAML on top of this schema, so a key that is not declared here,
or a value of the wrong type, is refused before any training starts;
:func:`validate` then checks ranges and choices and returns a typed
:class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, ValueNode


class ConfigError(ValueError):
    """A config value that is not allowed. Its message is one line, for the user."""


@dataclass
class DataConfig:
    # which points to train and test on: "seed" (the article's 4+4 points) or
    # "sampled" (uniform in the square [-extent, extent]², labelled by quadrant)
    name: str = "seed"
    n_train: int = 256  # sampled only: number of training points
    n_test: int = 256  # sampled only: number of test points
    extent: float = 3.0  # sampled only: half the side of the square
    margin: float = 0.0  # sampled only: keep |x| and |y| at least this far from the axes
    seed: int = 0  # sampled only: RNG seed of the draw (independent of the init seed)


@dataclass
class TrainConfig:
    # --- the model and the optimisation (the seed program's values) ---
    hidden_dim: int = 50  # width of the hidden ReLU layer
    reg: float = 0.001  # L2 on both weight matrices (grad += reg * W); biases are not decayed
    lr: float = 0.001  # SGD step size
    momentum: float = 0.0  # SGD momentum, torch.optim.SGD semantics (0 = the seed's plain GD)
    epochs: int = 10000  # full-batch gradient steps
    seed: int = 1  # seeds the initial weights
    init: str = "normal"  # "normal": the seed's RandomState(seed).randn draws; "torch": nn.Linear's
    # --- where and how the numbers are computed ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps  (auto: cuda, else mps, else cpu)
    dtype: str = "float64"  # float64 (the seed's precision) | float32
    engine: str = "torch"  # torch | numpy (the hand-written backprop reference)
    step: str = "fused"  # torch engine: fused (hand-written grads, fast) | autograd (nn + optim)
    cuda_graph: bool = True  # on CUDA, capture the fused step once and replay it
    threads: int = 0  # CPU threads for torch; 0 = pick for the size (1 for these tiny tensors)
    # --- what a run shows and leaves behind ---
    log_every: int = 100  # a metrics.csv row (and a log line without a bar) every N epochs
    progress: bool | None = None  # progress bar; None = only when stdout is a terminal
    plots: bool = True  # write loss.png and decision_regions.png
    checkpoint_every: int = 1000  # write checkpoint.pt every N epochs (0 = only at the end)
    resume: str | None = None  # a run dir or checkpoint.pt to continue from
    logger: str = "none"  # none | tensorboard (needs the [tensorboard] extra)
    objective: str = "test_loss"  # what a sweep minimises: test_loss | test_error | final_loss
    data: DataConfig = field(default_factory=DataConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("float32", "float64"),
    "engine": ("torch", "numpy"),
    "step": ("fused", "autograd"),
    "init": ("normal", "torch"),
    "logger": ("none", "tensorboard"),
    "objective": ("test_loss", "test_error", "final_loss"),
    "data.name": ("seed", "sampled"),
}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# --------------------------------------------------------------------------- Hydra glue


def config_dir() -> str:
    """Where Hydra finds ``configs/``: the checkout's folder, else the installed package."""
    here = Path(__file__).resolve().parent.parent / "configs"
    return str(here) if (here / "train.yaml").is_file() else "pkg://quadnet.configs"


def register_configs() -> None:
    """Store the schema for ``configs/train.yaml`` and the run-dir resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="quadnet_schema", node=TrainConfig)
    _expose_checkout_plugins()
    # A short random token, cached per config (and copied into every job of a sweep by
    # Hydra's load_sweep_config), so that two runs started in the same second get
    # different dirs.
    if not OmegaConf.has_resolver("quadnet_uid"):
        OmegaConf.register_new_resolver("quadnet_uid", lambda: secrets.token_hex(3), use_cache=True)


def _expose_checkout_plugins() -> None:
    """Let Hydra find ``hydra_plugins/quadnet_batched_launcher`` of a source checkout.

    A regular install puts it in site-packages, where Hydra's namespace scan finds it. An
    editable install maps it through an import hook that the scan cannot walk, so from any
    directory but the checkout the launcher would be missing; adding the checkout's folder
    to the namespace's path fixes that.
    """
    folder = Path(__file__).resolve().parent.parent / "hydra_plugins"
    if not (folder / "quadnet_batched_launcher").is_dir():
        return
    import hydra_plugins

    if str(folder) not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(str(folder))


# --------------------------------------------------------------------------- validation


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")


# What each field type accepts, in words; field types are annotation strings such as "int | None".
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _base_type(typ: Any) -> tuple[str, bool]:
    """('int', optional?) for a field annotation like 'int' or 'bool | None'."""
    text = typ if isinstance(typ, str) else typ.__name__
    parts = [p.strip() for p in text.split("|")]
    return parts[0], "None" in parts[1:]


def _check_type(key: str, value: Any, typ: Any) -> Any:
    """Return ``value`` as ``typ`` (int, float, bool, str or their Optional), or raise."""
    base, optional = _base_type(typ)
    must = "must be " + _TYPE_WORDS[base]
    if value is None:
        if optional:
            return None
        raise _fail(key, value, must)
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise _fail(key, value, must)
    if base in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, value, must)
        if base == "float":
            return float(value)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _fail(key, value, must)
        return int(value)
    if isinstance(value, str):
        return value
    raise _fail(key, value, must)


def _typed(cls: type, values: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise _fail(prefix.rstrip(".") or "config", values, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown config key '{key}'; allowed keys: {', '.join(allowed_keys())}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in values:
            continue
        if dataclasses.is_dataclass(f.type) or f.type == "DataConfig":
            kwargs[name] = _typed(DataConfig, values[name], prefix + name + ".")
        else:
            kwargs[name] = _check_type(prefix + name, values[name], f.type)
    return cls(**kwargs)


def _at_least(key: str, value: float, low: float, *, strict: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise _fail(key, value, f"must be finite and {'>' if strict else '>='} {low:g}")


def _app_values(cfg: DictConfig) -> dict[str, Any]:
    """The app's keys of a composed config as plain values; Hydra's own node is not read.

    Plain values are read off their nodes: resolving every key costs ~0.5 ms, which a sweep
    of 10,000 jobs pays 10,000 times. Interpolations and missing values resolve as usual.
    """
    out: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not (node._is_none() or node._is_interpolation()):
            out[str(key)] = _app_values(node)
        elif isinstance(node, ValueNode) and not (node._is_interpolation() or node._is_missing()):
            out[str(key)] = node._value()
        else:
            value = cfg[key]
            out[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def validate(cfg: DictConfig | dict | TrainConfig) -> TrainConfig:
    """Check every value of a composed config; return it typed. Raises :class:`ConfigError`."""
    if isinstance(cfg, TrainConfig):
        cfg = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        cfg = _app_values(cfg)
    assert isinstance(cfg, dict)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    c: TrainConfig = _typed(TrainConfig, cfg, "")

    _at_least("hidden_dim", c.hidden_dim, 1)
    _at_least("lr", c.lr, 0, strict=True)
    _at_least("reg", c.reg, 0)
    _at_least("epochs", c.epochs, 0)
    _at_least("seed", c.seed, 0)
    _at_least("log_every", c.log_every, 1)
    _at_least("checkpoint_every", c.checkpoint_every, 0)
    _at_least("threads", c.threads, 0)
    if not (math.isfinite(c.momentum) and 0 <= c.momentum < 1):
        raise _fail("momentum", c.momentum, "must be in [0, 1)")
    for key, allowed in CHOICES.items():
        obj, name = (c.data, "name") if key == "data.name" else (c, key)
        value = getattr(obj, name)
        if value not in allowed:
            raise _fail(key, value, "choose one of " + ", ".join(allowed))
    if not _DEVICE_RE.match(c.device):
        raise _fail("device", c.device, "choose auto, cpu, cuda, cuda:N or mps")
    if c.data.name == "sampled":
        d = c.data
        _at_least("data.n_train", d.n_train, 1)
        _at_least("data.n_test", d.n_test, 1)
        _at_least("data.extent", d.extent, 0, strict=True)
        _at_least("data.seed", d.seed, 0)
        if not (math.isfinite(d.margin) and 0 <= d.margin < d.extent):
            raise _fail("data.margin", d.margin, f"must be in [0, data.extent={d.extent:g})")
    return c


def to_dict(c: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain Python types (what checkpoints and summaries store)."""
    return dataclasses.asdict(c)


def allowed_keys() -> list[str]:
    """Every settable key, dotted, for error messages."""
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "data"]
    return sorted(top) + [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]


def expected_type(key: str) -> str | None:
    """'an integer', 'a number', … for a dotted key, or None if there is no such key."""
    cls: Any = TrainConfig
    *parents, name = key.split(".")
    for part in parents:
        if part != "data":
            return None
        cls = DataConfig
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    if name not in types or dataclasses.is_dataclass(types[name]) or types[name] == "DataConfig":
        return None
    return _TYPE_WORDS[_base_type(types[name])[0]]


def compose(overrides: list[str]) -> DictConfig:
    """Compose configs/train.yaml with overrides, as ``python -m quadnet.train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    register_configs()
    where = config_dir()
    init = (
        initialize_config_module("quadnet.configs", version_base="1.3")
        if where.startswith("pkg://")
        else initialize_config_dir(where, version_base="1.3")
    )
    with init:
        return hydra_compose(config_name="train", overrides=overrides)
