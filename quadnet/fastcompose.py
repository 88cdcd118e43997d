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

import pickle
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict


def _plain(o: Override, groups: set[str]) -> bool:
    """A plain value change of an existing app key: no group, package, prefix or sweep.

    Other overrides (config groups, +/~/++, hydra.*) must be the same as the template's."""
    if o.type != OverrideType.CHANGE or o.is_hydra_override() or o.package is not None:
        return False
    if o.is_sweep_override() or o.key_or_group in groups:
        return False
    value = o.value()
    return not (isinstance(value, str) and "${" in value) and not isinstance(value, dict | list)


class FastSweepLoader:
    """Wraps a Hydra ConfigLoader; only ``load_sweep_config`` differs, and only in speed."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._parser = OverridesParser.create()
        self._templates: dict[tuple[Any, ...], bytes] = {}  # pickled: loads is ~7× faster than deepcopy
        self._parsed: dict[tuple[Any, ...], list[Override]] = {}
        self._plain: dict[tuple[Any, ...], list[bool]] = {}
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
        return cfg

    def _load(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        try:
            parsed = self._parser.parse_overrides(sweep_overrides)
        except Exception:
            return self._loader.load_sweep_config(master_config, sweep_overrides)
        # Jobs share a template when they set the same keys and the same non-plain overrides
        # (e.g. +experiment=…): only plain values may differ from it.
        shape = tuple(o.key_or_group for o in parsed)
        key = (id(master_config), shape)
        template = self._templates.get(key)
        if template is None or any(
            o.input_line != t.input_line and not plain
            for o, t, plain in zip(parsed, self._parsed[key], self._plain[key], strict=True)
        ):
            cfg = self._loader.load_sweep_config(master_config, sweep_overrides)
            if template is None:
                groups = set(cfg.hydra.runtime.choices)
                self._templates[key] = pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)
                self._parsed[key] = parsed
                self._plain[key] = [_plain(o, groups) for o in parsed]
            return cfg
        cfg = pickle.loads(template)
        try:
            for o, plain in zip(parsed, self._plain[key], strict=True):
                if plain:
                    OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except Exception:  # a value the schema refuses: let Hydra raise its own error
            return self._loader.load_sweep_config(master_config, sweep_overrides)
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in parsed]
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=parsed,
                kv_sep=cfg.hydra.job.config.override_dirname.kv_sep,
                item_sep=cfg.hydra.job.config.override_dirname.item_sep,
                exclude_keys=cfg.hydra.job.config.override_dirname.exclude_keys,
            )
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg
