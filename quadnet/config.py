"""Every setting quadnet knows: its default and meaning (the dataclasses), and the ranges it must be in.

The dataclasses are the single source of defaults: ``quadnet/configs/`` only picks a data variant
and says where runs go. Hydra composes the YAML onto this schema, so OmegaConf refuses an
unknown key or a value of the wrong type before anything runs; :func:`validate` then
checks the ranges and choices in :data:`RULES` and returns a typed :class:`TrainConfig`.
The comment after each field is also its ``--help`` text.
"""

import difflib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, get_args, get_type_hints

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from quadnet.exits import OOM, out_of_memory


class ConfigError(ValueError):
    """A config value that is not allowed. Its message is one line, for the user."""


@dataclass
class DataConfig:
    name: str = "seed"  # seed (the article's 4+4 points) | sampled (uniform, labelled by quadrant) | csv
    n_train: int = 256  # sampled: number of training points
    n_test: int = 256  # sampled: number of test points
    extent: float = 3.0  # sampled: points lie in [-extent, extent]²
    margin: float = 0.1  # sampled: keep points at least this far from the axes, where the label flips
    seed: int = 0  # sampled: seed of the draw (independent of the init seed); csv: of the test and validation splits
    path: str | None = None  # csv: a table of numbers and a label column; its labels (sorted) are the classes
    label: str | None = None  # csv: the label's column; null: the one named label, else the last
    features: list[str] | None = None  # csv: the feature columns; null: every column but the label
    test_path: str | None = None  # csv: a test file; none: a random fifth of `path` (by data.seed) is held out
    val_path: str | None = None  # csv: a validation file; none: val_fraction of the training rows are held out
    val_fraction: float = 0.2  # csv, sampled: the validation split (sampled: this share of n_train more points)
    standardize: bool | None = None  # scale each feature to mean 0, spread 1 on the training split; null: csv only


@dataclass
class TrainConfig:
    # --- the model and its optimisation (the original program's values) ---
    hidden_dim: int = 50  # width of the hidden ReLU layer
    optimizer: str = "sgd"  # sgd (the original's, with optional momentum) | adam (torch.optim.Adam's rule)
    lr: float = 0.001  # step size
    reg: float = 0.001  # L2 on both weight matrices (grad += reg·W); biases are not decayed
    momentum: float = 0.0  # sgd: torch.optim.SGD's momentum (0 = the original's plain descent)
    beta1: float = 0.9  # adam: decay of the gradient's running mean
    beta2: float = 0.999  # adam: decay of the squared gradient's running mean
    eps: float = 1e-8  # adam: added to the denominator
    epochs: int = 10000  # full-batch gradient steps
    seed: int = 1  # seeds the initial weights
    init: str = "normal"  # normal: the original's RandomState(seed).randn draws | torch: nn.Linear's default
    # --- where and how the numbers are computed ---
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float64"  # float64 (the original's precision) | float32
    engine: str = "auto"  # auto (numba on the cpu when installed, else torch) | numba | torch | numpy (the reference)
    step: str = "fused"  # torch: fused (hand-written gradients) | autograd (nn.Module + torch.optim)
    cuda_graph: bool = True  # on CUDA, replay the fused steps as a CUDA graph
    threads: int = 0  # CPU threads; 0 = numba: every usable CPU for a batch, torch: 1 (fastest for tensors this small)
    # --- what a run shows and leaves behind ---
    log_every: int = 0  # a metrics.csv row every N epochs; 0 = about 100 rows a run (epochs/100)
    progress: bool | None = None  # progress bar; null = only when stderr is a terminal
    plots: bool = True  # write loss.png, confusion.png and decision_regions.png
    animate: bool = False  # write training.gif: the decision regions and the loss over training
    checkpoint_every: int = 1000  # write checkpoint.npz every N epochs (0 = only at the end)
    resume: str | None = None  # a run dir or checkpoint to continue from
    logger: str = "none"  # none | tensorboard | mlflow (the [tensorboard] or [mlflow] extra)
    objective: str = "val_loss"  # what a sweep minimises: val_loss | val_error | test_loss | test_error | final_loss
    data: DataConfig = field(default_factory=DataConfig)


# each key's type, dotted as an override names it (data.path)
TYPES = get_type_hints(TrainConfig) | {f"data.{k}": t for k, t in get_type_hints(DataConfig).items()}


def _choice(*allowed: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), "choose one of " + ", ".join(allowed)


def _range(low: float, high: float = math.inf, *, open_low: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:  # (an int of thousands of digits is no float: isfinite would overflow)
        return (isinstance(v, int) or math.isfinite(v)) and (v > low if open_low else v >= low) and v <= high

    text = f"must be finite and {'>' if open_low else '>='} {low:g}"
    return ok, text + ("" if high == math.inf else f" and <= {high:.16g}")


# key: (check, what is allowed). Types are OmegaConf's job; these are the ranges.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden_dim": _range(1, 1_000_000),
    "optimizer": _choice("sgd", "adam"),
    "lr": _range(0, 1e30, open_low=True),  # (beyond, float32 cannot hold the step)
    "reg": _range(0, 1e30),
    **dict.fromkeys(("momentum", "beta1", "beta2", "data.val_fraction"), ((lambda v: 0 <= v < 1), "must be in [0, 1)")),
    "eps": _range(0, open_low=True),
    **dict.fromkeys(("epochs", "log_every", "checkpoint_every"), _range(0, 1e9)),
    "seed": _range(0, 2**32 - 1),  # NumPy's RandomState takes 32 bits
    "init": _choice("normal", "torch"),
    "device": (lambda v: bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)), "choose auto, cpu, cuda, cuda:N or mps"),
    "dtype": _choice("float32", "float64"),
    "engine": _choice("auto", "numba", "torch", "numpy"),
    "step": _choice("fused", "autograd"),
    "threads": _range(0, 4096),
    "logger": _choice("none", "tensorboard", "mlflow"),
    "objective": _choice("val_loss", "val_error", "test_loss", "test_error", "final_loss"),
    "data.name": _choice("seed", "sampled", "csv"),
    **dict.fromkeys(("data.n_train", "data.n_test"), _range(1, 10_000_000)),
    "data.extent": _range(0, 1e12, open_low=True),
    "data.margin": _range(0),
    "data.seed": _range(0, 2**63 - 1),
}


# The data variant each key belongs to; the others ignore it (data.seed is shared).
_OWNER = {
    **dict.fromkeys(("n_train", "n_test", "extent", "margin"), "sampled"),
    **dict.fromkeys(("path", "test_path", "val_path", "label", "features"), "csv"),
}


def validate(cfg: DictConfig | dict[str, Any] | TrainConfig) -> TrainConfig:
    """Check a composed config (a Hydra node in it is ignored); return it typed. Raises :class:`ConfigError`."""
    try:  # OmegaConf refuses an unknown key or a wrong type, and ~lr, ${oops}: a key without a value
        node = asdict(cfg) if isinstance(cfg, TrainConfig) else cfg
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) is TrainConfig:  # on the schema already
            keys = {str(k) for k in node} | {f"data.{k}" for k in node.data}
            if extra := sorted(keys - set(allowed_keys()) - {"data", "hydra"}):  # added with +key=…
                raise ConfigError(unknown_key(extra[0], allowed_keys()))
        else:  # any other mapping, put on the schema
            plain = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
            if not isinstance(plain, dict):
                raise ConfigError(f"a config must be a mapping of keys to values, not {type(plain).__name__}")
            if (typed := _typed(plain)) is not None:
                return check(typed)
            node = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in plain.items() if k != "hydra"})
        # plain values through OmegaConf's public API (interpolations resolve)
        data = DataConfig(**OmegaConf.to_container(node.data, resolve=True))  # type: ignore[arg-type]
        return check(TrainConfig(**{f.name: node[f.name] for f in fields(TrainConfig) if f.name != "data"}, data=data))
    except (OmegaConfBaseException, OverflowError) as e:  # (check raises neither)
        raise ConfigError(one_line(e)) from None


def _typed(plain: dict[str, Any]) -> TrainConfig | None:
    """A mapping whose keys are the schema's and whose values are of their fields' types already (a checkpoint's
    config as quadnet wrote it), typed without OmegaConf: ~5 ms less a config (a 4,096-job sweep's resume spent
    28 s there). None for anything else (an int for a float, ${…}, ???), which OmegaConf types or refuses."""
    if not isinstance(data := plain.get("data", {}), dict):
        return None
    flat = {k: v for k, v in plain.items() if k not in ("data", "hydra")} | {f"data.{k}": v for k, v in data.items()}
    for k, v in flat.items():
        if k not in TYPES or type(v) not in (get_args(TYPES[k]) or (TYPES[k],)) or "${" in str(v) or v == "???":
            return None
    return TrainConfig(**{k: v for k, v in flat.items() if "." not in k}, data=DataConfig(**data))


def check(c: TrainConfig) -> TrainConfig:
    """The ranges and choices of :data:`RULES`, and the rules between keys, of a typed config."""
    for key, (ok, allowed) in RULES.items():
        group, _, name = key.rpartition(".")
        value = getattr(c.data if group else c, name)
        if not ok(value) and _OWNER.get(name, c.data.name) == c.data.name:  # (not a key another variant ignores)
            text = repr(value)  # (a number of thousands of digits: its start)
            raise ConfigError(f"{key}={text if len(text) <= 40 else text[:37] + '...'} is not allowed: {allowed}")
    if c.data.name == "sampled" and c.data.margin >= c.data.extent:  # (a float: its repr is short)
        raise ConfigError(f"data.margin={c.data.margin!r} is not allowed: must be below data.extent={c.data.extent:g}")
    for key, owner in _OWNER.items():  # (a key of another data variant would be silently ignored)
        if owner != c.data.name and getattr(c.data, key) != getattr(DataConfig, key) and not c.resume:
            raise ConfigError(f"data.{key} does not apply to data={c.data.name}; did you mean data={owner}?")
    if c.data.name == "csv" and not c.data.path and not c.resume:  # (resume=: the checkpoint's data, checked then)
        raise ConfigError("data=csv needs data.path=FILE: a CSV table of numbers and a label column")
    if c.engine in ("numpy", "numba") and c.device not in ("auto", "cpu"):
        raise ConfigError(f"device={c.device!r} is not allowed with engine={c.engine}: it runs on the cpu")
    if c.engine == "numba" and c.step == "autograd":
        raise ConfigError("step=autograd is not allowed with engine=numba: autograd is torch's (engine=torch)")
    return c


def log_every(c: TrainConfig) -> int:
    """Epochs between metrics rows: log_every, or for 0 about 100 rows a run."""
    return c.log_every or max(1, c.epochs // 100)


def unknown_key(key: str, known: list[str], where: str = "allowed keys") -> str:
    """'unknown config key', with the likeliest meant key first (hiden_dim, Lr) and the known ones."""
    name = key if any("." in k for k in known) else key.rpartition(".")[2]
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    guess = f"; did you mean {next(k for k in known if k.lower() == close[0])}?" if close else ""
    return f"unknown config key '{key}'{guess} ({where}: {', '.join(known)})"


def one_line(ex: BaseException) -> str:
    """A one-line account of an error: Hydra's and OmegaConf's in the user's words, else its first line."""
    if out_of_memory(ex):
        return OOM
    if isinstance(ex, OverflowError):  # an integer too large for a float key, as OmegaConf types it
        key = m[1] if (m := re.search(r"full_key: (\S+)", str(ex))) else "a key"
        return f"{key}: the number is too large; a float holds at most ~1.8e308"
    if isinstance(ex, MissingConfigException) and ex.options is not None and ex.missing_cfg_file:
        group, _, name = ex.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is not a config option; choose one of {', '.join(sorted(ex.options))}"
    err = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex  # (Hydra's wraps OmegaConf's)
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and key:
        if key.startswith("hydra.sweeper.sampler.") and not version_base():  # Hydra 1.4
            sweeper, core = version("hydra-optuna-sweeper"), version("hydra-core")
            fix = "its sampler is never instantiated; use hydra-core 1.3, or pip install hydra-optuna-sweeper==1.4.0rc3"
            return f"hydra-optuna-sweeper {sweeper} does not work with hydra-core {core}: {fix}"
        # the dataclass of the node the key is missing from: its keys
        if key.startswith(("hydra.launcher.", "hydra.sweeper.")) and is_dataclass(schema := err.object_type):
            known = [f.name for f in fields(schema) if not f.name.startswith("_")]
            return unknown_key(key, known, f"{key.rpartition('.')[0]} has the keys")
        if key.startswith("hydra."):  # Hydra's own keys: too many to list
            return f"unknown config key '{key}'; add it with '+{key}=…', or see Hydra's keys with --cfg hydra"
        if key in allowed_keys():  # a key of quadnet's that has no value: deleted with ~key
            return f"'{key}' has no value (deleted with ~{key}?): every key needs one, its default or yours"
        return unknown_key(key, allowed_keys())
    # a value of the wrong type for one of quadnet's keys (its type; of a `str | None`, the str)
    types = {f.name: f.type for f in fields(TrainConfig)} | {f"data.{f.name}": f.type for f in fields(DataConfig)}
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list[str]: "a list: [a,b]"}
    if isinstance(err, ValidationError) and (kind := words.get([*get_args(t := types.get(key)), t][0])):
        return f"{key}={getattr(err, 'value', None)!r} is not allowed: must be {kind}"
    if err is not ex:  # OmegaConf's, in Hydra's: its first line and key
        first = str(err.msg if hasattr(err, "msg") else err).splitlines()[0]
        return f"{err.full_key}: {first}" if err.full_key else first
    text = str(ex).strip()  # (an override that does not parse: its first line says where)
    if text.startswith("Unable to configure handler") and isinstance(why := ex.__cause__, OSError):  # Hydra's log
        return f"cannot write {why.filename}: {why.strerror} (hydra.run.dir, hydra.sweep.dir: a dir you can write)"
    if text.startswith("Config group override must be"):  # Hydra's words for data=null
        return "a config group cannot be null (data=null): choose one of its options, e.g. data=seed, sampled or csv"
    if text.startswith("Ambiguous value for argument"):  # Hydra's advice, of which -m is the likeliest
        return text.splitlines()[0] + ": to sweep it, add -m (--multirun); a list is key=[a,b], a string key='a,b'"
    dotted = [a.split("=")[0] for a in sys.argv[1:] if a.split("=")[0] in ("hydra.launcher", "hydra.sweeper")]
    if "_target_" in text and dotted:  # hydra.launcher=batched: a value, where a config group was meant
        return f"{dotted[0]}=… sets a value; to pick a config, use {dotted[0].replace('.', '/')}=… (a slash)"
    return text.splitlines()[0] if text else type(ex).__name__


def check_installed(c: TrainConfig) -> None:
    """What a run about to train needs installed (a checkpoint's config, read to predict, needs none)."""
    needs = {("logger", "tensorboard"): "tensorboard", ("logger", "mlflow"): "mlflow", ("engine", "numba"): "fast"}
    for (key, module), extra in needs.items():  # (key, value: the module it needs): the extra that installs it
        if getattr(c, key) == module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}={module} needs {module}: pip install {module} (quadnet's [{extra}] extra)")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict's values by dotted key (a config's ``data.path``)."""
    parts = [flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v} for k, v in d.items()]
    return {key: value for part in parts for key, value in part.items()}


def to_dict(c: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain Python types (what checkpoints and summaries store)."""
    return {**vars(c), "data": dict(vars(c.data))}


def allowed_keys() -> list[str]:
    """Every settable key, dotted, for error messages."""
    return sorted(vars(TrainConfig()).keys() - {"data"}) + [f"data.{f.name}" for f in fields(DataConfig)]


def help_text() -> str:
    """``--help``: each key with its default and meaning, read from the comments above (one definition)."""
    lines = ["usage: python -m quadnet.train [key=value ...]   (a sweep: -m key=a,b,c ...)", "", "keys:"]
    for schema, prefix in ((TrainConfig, ""), (DataConfig, "data.")):  # (TrainConfig.data has no comment)
        for key, default, meaning in re.findall(r"^    (\w+): .+?= (.+?)  # (.+)$", inspect.getsource(schema), re.M):
            default = {"None": "null", "True": "true", "False": "false"}.get(default, default.strip('"'))
            lines.append(f"  {(prefix + key).replace('data.name', 'data') + '=' + default:<26} {meaning}")  # (a group)
    groups = "data=seed|sampled|csv  hydra/launcher=batched|basic|joblib|submitit_local|slurm  +hparams_search=optuna"
    tail = ["", f"config groups: {groups}  +experiment=epochs_study", "Hydra's own options: --hydra-help"]
    return "\n".join(lines + tail)


# --------------------------------------------------------------------------- Hydra glue


def user_path(path: str) -> Path:
    """A path the user gave (data.path, resume=): ``~`` expanded, and a relative one taken from
    where the command was started, also in a job that runs in its own dir (hydra.job.chdir=true)."""
    try:
        p = Path(path).expanduser()
    except RuntimeError:  # ~nouser
        raise ConfigError(f"{path!r}: no home dir is known for that user") from None
    return Path(HydraConfig.get().runtime.cwd) / p if not p.is_absolute() and HydraConfig.initialized() else p


def config_dir() -> str:
    """Where Hydra finds quadnet's YAML: the package's ``configs/``."""
    return str(Path(__file__).resolve().parent / "configs")


def register_configs() -> None:
    """Store the schema that ``quadnet/configs/train.yaml`` builds on (once: Hydra 1.4 warns of a second)."""
    if "quadnet_schema.yaml" not in ConfigStore.instance().list(""):
        ConfigStore.instance().store(name="quadnet_schema", node=TrainConfig)


def version_base() -> dict[str, str]:
    """Hydra 1.3 needs version_base="1.3" for today's defaults; 1.4 has them and deprecates the argument."""
    return {} if tuple(int(p) for p in hydra.__version__.split(".")[:2]) >= (1, 4) else {"version_base": "1.3"}


def compose(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose quadnet/configs/train.yaml with overrides, as ``python -m quadnet.train`` would (Hydra's
    node too, with_hydra=True). Hydra's global state is set up and cleared again each call."""
    register_configs()
    with hydra.initialize_config_dir(config_dir(), **version_base()):
        return hydra.compose(config_name="train", overrides=overrides, return_hydra_config=with_hydra)
