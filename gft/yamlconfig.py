"""Reading a config from YAML: a file (its values and the line of each key, for errors)
and one `--set key=value` override. What the values mean is gft/config.py's."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gft.errors import ConfigError


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and JSON, and Python) do.

    PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent: `1e-5`,
    `1e5` and `1.0e5` are strings there. Config files from TRL and mlx-lm write learning
    rates and reward weights that way, and a string can reach places no type check sees
    (a reward weight, a reward function's option), so they are read as floats here."""


def _construct_unique_mapping(loader: _YAMLLoader, node: yaml.MappingNode,
                              deep: bool = False) -> dict:
    """A mapping whose keys are unique: PyYAML keeps the last of two equal keys without a
    word, so a config that sets learning_rate twice trained with the one further down."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys may override it
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: SafeLoader's own error says so
            break
        if first is not None:
            lines = (first.start_mark.line + 1, key_node.start_mark.line + 1)
            where = f"on line {lines[0]}" if lines[0] == lines[1] else \
                f"on lines {lines[0]} and {lines[1]}"
            raise yaml.constructor.ConstructorError(
                None, None, f"'{key}' is given twice {where}; keep one", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_YAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            _construct_unique_mapping)
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # a SafeLoader: builds plain values only


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of key: value")
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not a name; config keys are names "
                              "like learning_rate (see gft train --help-config)")
    return ConfigValues(raw, lines=_key_lines(path.read_text(encoding="utf-8")))


class ConfigValues(dict):
    """A config file's values, and the line each top-level key is on (for errors)."""

    def __init__(self, values: dict[str, Any], lines: dict[str, int]):
        super().__init__(values)
        self.lines = lines


def _key_lines(text: str) -> dict[str, int]:
    """{key: its 1-based line} for the top-level mapping of a YAML text."""
    node = yaml.compose(text, Loader=_YAMLLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value
            if isinstance(key, yaml.ScalarNode)}


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), _load_yaml(value)
    except yaml.YAMLError:
        return key.strip(), value
