"""Typed configs from YAML with dotted `key=value` overrides (the `rl-agents train` front end).

Configs are (nested) dataclasses validated in `__post_init__`. `from_dict` builds one from a
plain mapping, checking every key and value *before any work starts*: an unknown key or a
value of the wrong type raises `ConfigError` naming the dotted key (e.g. `train.optim.lr`).

    cfg = load_config(TrainConfig, "train.yaml", ["optim.lr=1e-6", "lora.enabled=true"])

(`algorithms.runner.load_algorithm_config` reads an algorithm's YAML, whose `algo:` key picks the
config class, through the same `load_mapping`.)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' | '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise `ConfigError`. A class may
    name keys that moved (`moved_keys = {"beta": "loss.beta"}`): their error says where they went."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        moved = getattr(cls, "moved_keys", {}).get(unknown[0])
        hint = f"; it is {prefix}{moved} now" if moved else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}{hint} (valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError) or _KEY.match(str(e)):  # the message names a field: make it the dotted key
            raise ConfigError(full_key_message(str(e), prefix)) from None
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


_KEY = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def full_key_message(msg: str, prefix: str) -> str:
    """A nested config's `__post_init__` names its fields relative to itself (`optim.lr`, or
    `num_workers` inside `TrainConfig`); prefix them with where the config sits (`train.optim.lr`)."""
    m = _KEY.match(msg)
    if not prefix or not m:
        return msg
    key, parts = m.group(1), prefix.rstrip(".").split(".")
    for k in range(len(parts) + 1):  # the longest overlap of the prefix's tail with the key's head
        tail = ".".join(parts[k:])
        if not tail or key == tail or key.startswith(tail + "."):
            return ".".join(parts[:k] + [key]) + msg[len(key):]
    return msg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, bools, lists) to a nested dict."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; a missing, unreadable, non-UTF-8, empty or non-mapping
    file raises `ConfigError` naming it."""
    from rl_agents.fileio import read_utf8

    text = read_utf8(path, ConfigError, kind="config file")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f":{where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{at}: invalid YAML: {' '.join(str(e).split())}") from None
    if loaded is None:
        raise ConfigError(f"{path}: the config file is empty (expected a mapping such as `algo: sft`)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_mapping(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file's mapping (optional) with dotted `key=value` overrides applied: every config file
    is read here."""
    data = read_yaml_mapping(path) if path is not None else {}
    return apply_overrides(data, overrides or [])


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + overrides -> validated `cls`."""
    return from_dict(cls, load_mapping(path, overrides))
