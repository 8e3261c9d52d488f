"""Experiment files: YAML with a `base:` run config, optional `sweep:` axes and a `tune:` block.

The run schema itself (every key, its type and default) lives in `workloads.config`; this module reads files,
applies `--set dotted.key=value` overrides and hands the result to `parse_run_config`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workloads.config import ConfigError, RunConfig, parse_run_config

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("description", "base", "sweep", "tune", "tracking")


@dataclass
class ExperimentFile:
    """A parsed experiment file: the validated base config plus the raw sweep and tune blocks."""

    path: Path
    base: RunConfig
    base_raw: dict
    axes: list = field(default_factory=list)  # orchestrator.search_space.Axis, validated
    tune: dict = field(default_factory=dict)
    tracking: dict = field(default_factory=dict)
    description: str = ""

    def cache_configs(self) -> tuple[list[RunConfig], list[str]]:
        """Run configs with distinct caches (one per combination of cache-relevant grid / choice axes), and
        the keys of sampled axes that change caches (those cannot be precomputed)."""
        from orchestrator.search_space import cache_combinations

        combos, sampled = cache_combinations(self.axes)
        configs = [parse_run_config(with_values(self.base_raw, combo)) for combo in combos]
        return configs, [a.key for a in sampled]


def parse_override(text: str) -> tuple[list[str], Any]:
    """'learner.num_keys=512' -> (['learner', 'num_keys'], 512); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set: expected dotted.key=value, got {text!r}")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: {key!r} is not a dotted key like learner.num_keys")
    try:
        return parts, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {value!r} is not valid YAML ({e.problem})") from e


def with_values(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of `raw` with each dotted key of `values` set, creating mappings along the way."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


# Blocks whose `name` picks an entry of a registry: a new name there means another entry, with options of its own.
NAMED_BLOCKS = ("learner", "backbone")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each `dotted.key=value` of `overrides` set (values read as YAML). `--set learner.name=mlp` (or
    backbone.name) switches to another entry and drops the old one's options that no other --set gives, with a
    note naming them: the file's dkvb options mean nothing to an mlp."""
    values = {}
    for text in overrides:
        parts, value = parse_override(text)
        values[".".join(parts)] = value
    raw = copy.deepcopy(raw)
    for block in NAMED_BLOCKS:
        current = raw.get(block)
        new = values.get(f"{block}.name")
        if new is None or not isinstance(current, dict):
            continue
        default = getattr(parse_run_config({}), block).name  # the entry a block without a name gets
        if current.get("name", default) == new:
            continue
        dropped = [k for k in current if k != "name" and f"{block}.{k}" not in values]
        raw[block] = {k: v for k, v in current.items() if k not in dropped}
        if dropped:
            log.info("--set %s.name=%s: dropped the %s options of %s: %s", block, new, block,
                     current.get("name", default), ", ".join(dropped))
    try:
        return with_values(raw, values)
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`, with file and syntax errors turned into ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', e)})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    return data


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentFile:
    """Read and validate an experiment file; `overrides` are `dotted.key=value` strings applied to `base`."""
    data = read_yaml(path)
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    base_raw = data.get("base") or {}
    if not isinstance(base_raw, dict):
        raise ConfigError(f"{path}: base: expected a mapping of run options")
    base_raw = apply_overrides(base_raw, overrides or [])
    try:
        base = parse_run_config(base_raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for block in ("sweep", "tune", "tracking"):
        if not isinstance(data.get(block) or {}, dict):
            raise ConfigError(f"{path}: {block}: expected a mapping")
    from orchestrator.search_space import parse_sweep  # it imports this module

    try:
        axes = parse_sweep(data.get("sweep") or {}, base_raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return ExperimentFile(Path(path), base, base_raw, axes, data.get("tune") or {}, data.get("tracking") or {},
                          str(data.get("description") or ""))
