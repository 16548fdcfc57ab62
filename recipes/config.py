"""Recipe configs: one YAML file, plus key=value overrides from the command line.

    python -m recipes.llava.train recipes/llava/configs/demo.yaml train.lr=1e-3 train.epochs=2

An override's key is a dotted path (train.max_steps=10); values are parsed as YAML (1e-3, true, [a, b]). A key the
file does not have is added; a typo is still an error naming the key and the closest valid name: a section by
`load_config(..., sections=...)`, a key by the section's reader, which knows its keys (`unknown_keys`).
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; names the file or the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 (no dot) as a string, so `lr: 1e-3` or `train.lr=2e-3` would reach the optimizer as
    text; numbers in exponent form are floats here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def unknown_keys(where: str, unknown: Iterable[str], known: Iterable[str], what: str = "key") -> ConfigError:
    """The error for names a reader does not know, each with the closest valid one (a typo, most likely)."""
    known = sorted(known)
    names = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        names.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"{where}: unknown {what}{'s' if len(names) > 1 else ''} {', '.join(names)}; "
                       f"known: {', '.join(known)}")


def load_config(path: str | Path, overrides: Iterable[str] = (), sections: Iterable[str] | None = None) -> dict:
    """The YAML file with the overrides applied; with `sections`, any other top-level name is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        config = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    config = apply_overrides(config, overrides, source=str(path))
    if sections is not None and set(config) - set(sections):
        raise unknown_keys(f"{path} (with its overrides)", set(config) - set(sections), sections, "section")
    return config


def apply_overrides(config: dict, overrides: Iterable[str], source: str = "config") -> dict:
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} in {source} is not a section")
        try:
            node[parts[-1]] = _load_yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key!r}: value {raw!r} is not valid YAML ({e})") from None
    return config


def section(config: dict, name: str, known: Iterable[str]) -> dict:
    """A config section, checked for unknown keys (typos) against the keys its reader knows."""
    value = config.get(name, {}) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    unknown = set(value) - set(known)
    if unknown:
        raise unknown_keys(f"config section {name!r}", unknown, known)
    return value


def save_config(config: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)


def get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
