"""Per-job configs of a sweep without a full Hydra composition for each job.

Hydra composes every job of a sweep from scratch, twice (the sweeper validates the
batch, then the launcher loads each job's config): on 2 cores that is ~0.1 s a
composition, more than training a job takes in a batch. Most sweeps only change values
(``seed=3 lr=0.01``), and for those the composed config is the composition of the first
job with the same keys, with the values replaced. :class:`FastSweepLoader` does exactly
what Hydra's ``load_sweep_config`` does for such jobs (the values, ``hydra.overrides.task``,
``hydra.job.override_dirname`` and the resolver cache) and hands everything else (config
groups, ``+``/``~`` overrides, ``hydra.*`` keys, interpolations, errors) to Hydra itself.
The tests compare the two on mixed sweeps.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
import re
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf, open_dict

# "key=number" in the forms whose value Python reads exactly as Hydra's grammar does (Hydra
# reads "007" as a string, "1_000" as 1000: those, and everything else, go to its parser).
_SIMPLE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(-?(?:0|[1-9]\d*)(\.\d+)?(?:[eE][-+]?\d+)?)")


def _simple(line: str) -> Override | None:
    """The Override Hydra's parser makes of a simple "key=number", made without the parser (~1 ms)."""
    m = _SIMPLE.fullmatch(line)
    if m is None:
        return None
    is_float = m[3] is not None or "e" in m[2].lower()
    value = float(m[2]) if is_float else int(m[2])
    return Override(
        type=OverrideType.CHANGE, key_or_group=m[1], value_type=ValueType.ELEMENT, _value=value, input_line=line
    )


def _plain(o: Override, groups: set[str]) -> bool:
    """A plain value change of an existing app key: no group, package, prefix or sweep.

    Other overrides (config groups, +/~/++, hydra.*) must be the same as the template's."""
    if o.type != OverrideType.CHANGE or o.is_hydra_override() or o.package is not None:
        return False
    if o.is_sweep_override() or o.key_or_group in groups:
        return False
    value = o.value()
    return not (isinstance(value, str) and "${" in value) and not isinstance(value, dict | list)


@dataclasses.dataclass
class _Template:
    """The first job of a sweep shape, composed by Hydra, and what later jobs need from it."""

    blob: bytes  # the composed config, pickled: loads is ~7× faster than deepcopy
    parsed: list[Override]
    plain: list[bool]  # per override: only its value may differ in later jobs
    kv_sep: str  # hydra.job.config.override_dirname, read once
    item_sep: str
    exclude_keys: list[str]


class FastSweepLoader:
    """Wraps a Hydra ConfigLoader; only ``load_sweep_config`` differs, and only in speed."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._parser = OverridesParser.create()
        self._overrides: dict[str, Override] = {}  # each override string parsed once per sweep
        self._templates: dict[tuple[Any, ...], _Template] = {}
        self._recent: dict[tuple[Any, ...], DictConfig] = {}  # validated by the sweeper, not yet launched

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        # The sweeper composes each job to validate the batch and drops the result; then the
        # launcher composes it again, and gets that first result.
        memo = (id(master_config), tuple(sweep_overrides))
        if memo in self._recent:
            return self._recent.pop(memo)
        cfg = self._load(master_config, sweep_overrides)
        self._recent[memo] = cfg
        if len(self._recent) > 100_000:
            self._recent.clear()
        if len(self._recent) % 64 == 0:
            # Thousands of live configs (~1000 nodes each) make every full pass of the cyclic GC
            # slower: for 2,000 jobs it took longer than composing them. Move what exists now out
            # of its reach; the batched launcher hands it back (gc.unfreeze) when it is done.
            gc.freeze()
        return cfg

    def _parse(self, sweep_overrides: list[str]) -> list[Override]:
        """Hydra's parse of each override; a sweep repeats most of them, and parsing is slow."""
        for line in sweep_overrides:
            if line not in self._overrides and (o := _simple(line)) is not None:
                self._overrides[line] = o
        new = [s for s in sweep_overrides if s not in self._overrides]
        if new:
            if len(self._overrides) > 100_000:
                self._overrides.clear()
            self._overrides.update(zip(new, self._parser.parse_overrides(new), strict=True))
        return [self._overrides[s] for s in sweep_overrides]

    def _load(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        try:
            parsed = self._parse(sweep_overrides)
        except Exception:
            return self._loader.load_sweep_config(master_config, sweep_overrides)
        # Jobs share a template when they set the same keys and the same non-plain overrides
        # (e.g. +experiment=…): only plain values may differ from it.
        key = (id(master_config), tuple(o.key_or_group for o in parsed))
        t = self._templates.get(key)
        if t is None or any(
            o.input_line != first.input_line and not plain
            for o, first, plain in zip(parsed, t.parsed, t.plain, strict=True)
        ):
            cfg = self._loader.load_sweep_config(master_config, sweep_overrides)
            if t is None:
                groups = set(cfg.hydra.runtime.choices)
                dirname = cfg.hydra.job.config.override_dirname
                self._templates[key] = _Template(
                    pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL),
                    parsed,
                    [_plain(o, groups) for o in parsed],
                    dirname.kv_sep,
                    dirname.item_sep,
                    list(dirname.exclude_keys),
                )
            return cfg
        cfg = pickle.loads(t.blob)
        try:
            for o, plain in zip(parsed, t.plain, strict=True):
                if plain:
                    OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except Exception:  # a value the schema refuses: let Hydra raise its own error
            return self._loader.load_sweep_config(master_config, sweep_overrides)
        with open_dict(cfg.hydra):
            task = (
                cfg.hydra.overrides.task
            )  # the template's lines: set only those that differ (cheaper than a new list)
            for i, (o, first) in enumerate(zip(parsed, t.parsed, strict=True)):
                if o.input_line != first.input_line:
                    task[i] = o.input_line
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=parsed, kv_sep=t.kv_sep, item_sep=t.item_sep, exclude_keys=t.exclude_keys
            )
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg
