"""Each job's config in a sweep, without a Hydra composition for each job.

Hydra composes every job of a sweep from scratch, twice (the sweeper checks each one, then the
launcher loads it): ~80 ms a composition on 2 cores, far more than training a job in a batch,
and a DictConfig of ~1,000 nodes a job. Most sweeps only change values of quadnet's keys
(``seed=3 lr=0.01``). For those, :class:`Composer` composes the job's other overrides once with
Hydra (config groups, ``+experiment=…``: a template) and puts the values on top, typed as
OmegaConf types them: a :class:`~quadnet.config.TrainConfig` in ~20 µs. Hydra composes every
other job itself (``+``/``~`` or ``hydra.*`` overrides per job, interpolations, a template that
holds them). As the sweeper's config loader (:class:`SweepLoader`) it makes the sweeper's check
of each job as cheap. The tests compare its configs with Hydra's on mixed sweeps.
"""

import functools
import re
from typing import Any, get_args

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quadnet.config import TYPES, ConfigError, DataConfig, TrainConfig, allowed_keys, flatten, one_line

# "key=number" in the forms Python reads exactly as Hydra's grammar does ("007" is a string to Hydra,
# "1_000" is 1000: those and everything else go to Hydra's parser)
_NUMBER = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(-?(?:0|[1-9]\d*)(\.\d+)?(?:[eE][-+]?\d+)?)")
BOUND = 10_000  # parsed overrides and typed values kept at most (a sweep of 100,000 seeds has as many)


class Composer:
    def __init__(self, loader: Any, master: DictConfig) -> None:
        self.loader, self.master = loader, master
        self._parser, self._keys = OverridesParser.create(), set(allowed_keys())
        self._parsed: dict[str, tuple[Override, bool]] = {}
        self._templates: dict[tuple[str, ...], dict[str, Any] | None] = {}  # by dotted key

    def typed(self, overrides: list[str]) -> TrainConfig | None:
        """The job's config, typed but not yet range-checked (:func:`quadnet.config.check`); None
        where Hydra must compose the job. A value of the wrong type raises ConfigError, as Hydra's
        composition would."""
        try:
            parsed = self._parse(overrides)
        except Exception:  # (Hydra's parser says why, when Hydra composes it)
            return None
        plain = {o.key_or_group: o for o, ok in parsed if ok}  # (the last of a key's values wins)
        rest = tuple(o.input_line for o, ok in parsed if not ok)
        if any(o.is_hydra_override() for o, _ in parsed):
            return None
        if rest not in self._templates:
            app = OmegaConf.to_container(self.loader.load_sweep_config(self.master, list(rest)), resolve=False)
            flat = {k: v for k, v in flatten(app).items() if not k.startswith("hydra.")}  # type: ignore[arg-type]
            self._templates[rest] = flat if set(flat) == self._keys and "${" not in str(flat) else None
        if (base := self._templates[rest]) is None:
            return None
        values = base | {key: self._value(key, o.value()) for key, o in plain.items()}
        data = DataConfig(**{k.removeprefix("data."): values.pop(k) for k in TYPES if k.startswith("data.")})
        return TrainConfig(**values, data=data)

    def _parse(self, lines: list[str]) -> list[tuple[Override, bool]]:
        """Each line as Hydra's parser reads it, and whether it is plain (:meth:`_plain`); a plain
        key=number without the parser (~1.4 ms a line)."""
        if len(self._parsed) > BOUND:
            self._parsed.clear()
        for line in lines:
            if line not in self._parsed and (number := _number(line)):
                o = Override(OverrideType.CHANGE, number[0], ValueType.ELEMENT, number[1], input_line=line)
                self._parsed[line] = o, self._plain(o)
        if new := list(dict.fromkeys(s for s in lines if s not in self._parsed)):
            parsed = zip(new, self._parser.parse_overrides(new), strict=True)
            self._parsed.update((s, (o, self._plain(o))) for s, o in parsed)
        return [self._parsed[s] for s in lines]

    def _plain(self, o: Override) -> bool:
        """A value for a key of quadnet's: no config group, package, +/~ prefix, sweep or interpolation."""
        if o.type != OverrideType.CHANGE or o.package is not None or o.is_sweep_override():
            return False
        return o.key_or_group in self._keys and not isinstance(o.value(), dict | list) and "${" not in str(o.value())

    def _value(self, key: str, value: Any) -> Any:
        """A value as OmegaConf types it for its key (lr=1 is 1.0, seed='3' is 3)."""
        kinds = get_args(TYPES[key]) or (TYPES[key],)  # (int | None: int and NoneType)
        if type(value) in kinds and value != "???":  # ("???" is OmegaConf's missing value)
            return value
        if float in kinds and type(value) is int and abs(value) < 2**53:
            return float(value)
        return _omegaconf_value(key, value)


@functools.lru_cache(maxsize=BOUND, typed=True)
def _omegaconf_value(key: str, value: Any) -> Any:
    """A value of another type put into a TrainConfig by OmegaConf (seed='3' is 3), or its refusal."""
    node = OmegaConf.structured(TrainConfig)
    try:
        OmegaConf.update(node, key, value)
        return OmegaConf.select(node, key, throw_on_missing=True)
    except (OmegaConfBaseException, OverflowError) as e:  # (OverflowError: an int too large for a float)
        raise ConfigError(one_line(e)) from None


class SweepLoader:
    """Hydra's ConfigLoader for the sweeper, with the sweeper's check of each job (that it can be
    composed; its result is not used) made by :class:`Composer`. Everything else is Hydra's."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._composers: dict[int, Composer] = {}
        self._composed: set[tuple[Any, ...]] = set()  # the jobs checked, by their overrides' kinds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def composer(self, master: DictConfig) -> Composer:
        if id(master) not in self._composers:
            self._composers[id(master)] = Composer(self._loader, master)
        return self._composers[id(master)]

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        # a job whose key=number lines match, key and kind of number (int, float, long), those of a job
        # that composed composes too (seed=7 as seed=6): the check of a million jobs in seconds
        kinds = (id(master_config), *(_kind(line) for line in sweep_overrides))
        if kinds in self._composed:
            return master_config
        if self.composer(master_config).typed(list(sweep_overrides)) is not None:
            if len(self._composed) < BOUND:
                self._composed.add(kinds)
            return master_config  # (checked: it composes)
        return self._loader.load_sweep_config(master_config, sweep_overrides)


def _number(line: str) -> tuple[str, int | float] | None:
    """A key=number line's key and number, as Hydra's grammar reads it; None for any other line."""
    m = _NUMBER.fullmatch(line)
    return (m[1], float(m[2]) if m[3] is not None or "e" in m[2].lower() else int(m[2])) if m else None


def _kind(line: str) -> Any:
    """What decides whether a line composes: a number's key, type and size (beyond 2**53 an int is not a
    float exactly); any other line itself."""
    return (number[0], type(number[1]), abs(number[1]) < 2**53) if (number := _number(line)) else line
