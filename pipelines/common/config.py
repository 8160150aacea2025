"""Validated configuration: one YAML file per model, dataclasses, dotted `key=value` overrides.

A pipeline describes its configuration as (nested) dataclasses with typed fields and defaults,
ships one YAML file per model in its `configs/` folder, and resolves the final configuration as

    defaults of the dataclass  <-  the YAML file  <-  `key=value` overrides (dotted keys)

`load_config` checks every key and value against the dataclass types: an unknown key, a value of
the wrong type or a failed `__post_init__` check raises `toolkit.errors.UserError` naming the key
(and the file), which the CLI reports as one line with exit code 2. `dump_config` gives the YAML
that `--print-config` prints and `save_config` writes beside every output.

Example:

```python
@dataclasses.dataclass
class Optim:
    learning_rate: float = 1e-3
    warmup_steps: int = 1000

@dataclasses.dataclass
class Config:
    name: str = "demo"
    optim: Optim = dataclasses.field(default_factory=Optim)

config = load_config(Config, overrides=["optim.learning_rate=3e-4"])
assert config.optim.learning_rate == 3e-4
```
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import UserError

__all__ = [
    "add_config_arguments",
    "config_to_dict",
    "dump_config",
    "flatten_config",
    "load_config",
    "parse_overrides",
    "save_config",
]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE.yaml`, `--print-config` and positional `key=value` overrides."""
    parser.add_argument("--config", type=Path, default=None, help="YAML configuration file")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML and exit",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a configuration value with a dotted key, e.g. optim.learning_rate=3e-4",
    )


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """Split `key=value` strings into an ordered dict of dotted key -> raw value string."""
    parsed: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.epochs=3)")
        parsed[key] = value
    return parsed


def load_config(
    config_cls: type,
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    default_path: str | Path | None = None,
):
    """Resolve and validate a configuration.

    Args:
        config_cls: dataclass type describing the configuration.
        path: str or Path. The user's YAML file, or `None`. Keys it leaves out keep their
            defaults (from `default_path`, else from the dataclass).
        overrides: `key=value` strings (or a mapping of dotted key -> value) applied last.
            String values are parsed as YAML scalars/lists (`true`, `3`, `1e-3`, `[1, 2]`,
            `null`), except for `str` fields, which take the text as is.
        default_path: str or Path. The pipeline's default YAML file for this model, or `None`.

    Returns:
        An instance of `config_cls`.

    Raises:
        UserError: unreadable or invalid YAML, an unknown key, a value of the wrong type, or a
            value that the dataclass' own `__post_init__` rejects (`ValueError`).
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls must be a dataclass. Received: {config_cls!r}")
    data: dict[str, Any] = {}
    for source in (default_path, path):
        if source is not None:
            _merge(data, _read_yaml(Path(source)), str(source))
    source_name = str(path) if path is not None else "configuration"
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
        raw = False
    else:
        items = list(parse_overrides(overrides).items())
        raw = True
    for dotted, value in items:
        field_type = _field_type_for(config_cls, dotted)
        if raw:
            value = _parse_override_value(value, field_type)
        _set_dotted(data, dotted, value)
    return _build(config_cls, data, prefix="", source=source_name)


def config_to_dict(config) -> dict[str, Any]:
    """Return the configuration as plain dicts/lists/scalars (tuples become lists)."""

    def convert(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(config)


def dump_config(config) -> str:
    """Return the configuration as YAML text, keys in field order (what `--print-config` shows)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)


def save_config(config, path: str | Path) -> Path:
    """Write the resolved configuration as YAML to `path` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config), encoding="utf-8")
    return path


def flatten_config(config, sep: str = ".") -> dict[str, Any]:
    """Return `{"optim.learning_rate": 0.001, ...}`: the configuration with dotted keys."""
    flat: dict[str, Any] = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{sep}{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", config_to_dict(config))
    return flat


# --------------------------------------------------------------------------------------------
# Internals.


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise UserError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must contain a mapping of keys to values")
    return data


def _merge(base: dict, update: dict, source: str) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source)
        else:
            base[key] = value


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _known(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _field_type_for(config_cls, dotted: str):
    cls = config_cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i])
            scope = f" under '{where}'" if where else ""
            raise UserError(f"unknown config key '{dotted}'{scope} (known keys: {_known(cls)})")
        field_type = _hints(cls)[part]
        if i == len(parts) - 1:
            return field_type
        inner = _unwrap_optional(field_type)
        if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
            raise UserError(
                f"unknown config key '{dotted}': '{'.'.join(parts[: i + 1])}' has no sub-keys"
            )
        cls = inner
    return None


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_override_value(text: str, field_type):
    inner = _unwrap_optional(field_type)
    if inner is str or (
        typing.get_origin(inner) is typing.Literal
        and all(isinstance(a, str) for a in typing.get_args(inner))
    ):
        if text.strip() in ("null", "~", "None") and inner is not field_type:
            return None
        return text
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _build(cls, data, prefix: str, source: str):
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise UserError(
                f"{source}: unknown config key '{prefix}{key}' (known keys: {_known(cls)})"
            )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}", source)
        else:
            inner = _unwrap_optional(hints[name])
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                field = next(f for f in dataclasses.fields(cls) if f.name == name)
                if field.default is None:
                    continue
                kwargs[name] = _build(inner, {}, f"{prefix}{name}.", source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        where = prefix.rstrip(".")
        scope = f" in '{where}'" if where else ""
        raise UserError(f"{source}: invalid configuration{scope}: {error}") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, source: str):
    def fail(expected=None):
        raise UserError(
            f"{source}: config key '{key}' expects {expected or _type_name(tp)}, got {value!r}"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except UserError:
                continue
        fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            fail("one of " + ", ".join(repr(a) for a in typing.get_args(tp)))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(f"a list ({_type_name(tp)})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                fail(f"a list of {len(args)} values")
            return tuple(
                _coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))
            )
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, f"{key}.", source)
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            fail("a path")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        fail()
    return value
