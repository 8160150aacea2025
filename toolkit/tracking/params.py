"""Turning a resolved configuration into MLflow parameters.

MLflow parameters are flat string pairs with limits: keys of at most 250 characters drawn from
letters, digits, `_ - . / ` and space; values of at most 6000 characters; 100 parameters per
request. `flatten_config` gives dotted keys (`model.num_heads`), `to_mlflow_params` applies the
limits (the full config is also logged as a file, so a truncated value loses nothing).
"""

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping

MAX_KEY_LENGTH = 250
MAX_VALUE_LENGTH = 6000
TRUNCATION_MARK = "...[truncated]"

_INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def config_to_dict(config):
    """Returns a plain nested dict from a dict, a dataclass or an object with `to_dict()`.

    Args:
        config: Mapping, dataclass instance, object with `to_dict()`/`as_dict()`, or `None`.

    Returns:
        dict.
    """
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    for name in ("to_dict", "as_dict"):
        method = getattr(config, name, None)
        if callable(method):
            return dict(method())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        "config must be a mapping, a dataclass or have to_dict(). "
        f"Received: config of type {type(config).__name__}"
    )


def flatten_config(config, sep="."):
    """Flattens a nested configuration into `{dotted.key: value}`.

    Mappings and dataclasses recurse (`{"model": {"heads": 4}}` -> `{"model.heads": 4}`); lists
    and tuples of mappings recurse with the index as key part (`layers.0.units`); other lists are
    kept whole and rendered as JSON by `to_mlflow_params`. An empty mapping stays as `{}`.

    Args:
        config: Mapping, dataclass or object with `to_dict()`. The resolved configuration.
        sep: str. Separator between key parts. Defaults to `"."`.

    Returns:
        dict mapping dotted keys to leaf values.

    Example:

    >>> flatten_config({"model": {"num_heads": 4, "kernels": [3, 3]}, "lr": 0.001})
    {'model.num_heads': 4, 'model.kernels': [3, 3], 'lr': 0.001}
    """
    flat = {}

    def visit(prefix, value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if not value and prefix:
                flat[prefix] = {}
            for key, item in value.items():
                visit(f"{prefix}{sep}{key}" if prefix else str(key), item)
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
            for index, item in enumerate(value):
                visit(f"{prefix}{sep}{index}" if prefix else str(index), item)
        else:
            flat[prefix] = value

    visit("", config_to_dict(config))
    return flat


def _render(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def _sanitize_key(key):
    key = _INVALID_KEY_CHARS.sub("_", key)
    if len(key) > MAX_KEY_LENGTH:
        # Keep the key unique after cutting it: the tail is a hash of the full key.
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        key = key[: MAX_KEY_LENGTH - 9] + "~" + digest
    return key


def to_mlflow_params(config):
    """Returns `{key: str}` pairs that MLflow accepts, from a (nested) configuration.

    Keys are the dotted keys of `flatten_config` with characters MLflow rejects replaced by `_`
    and keys longer than 250 characters shortened (with a hash, so they stay distinct). Values
    are strings (lists and dicts as JSON); values longer than 6000 characters are cut and end in
    `...[truncated]`.

    Args:
        config: Mapping, dataclass or object with `to_dict()`.

    Returns:
        dict[str, str].
    """
    params = {}
    for key, value in flatten_config(config).items():
        text = _render(value)
        if len(text) > MAX_VALUE_LENGTH:
            text = text[: MAX_VALUE_LENGTH - len(TRUNCATION_MARK)] + TRUNCATION_MARK
        params[_sanitize_key(key)] = text
    return params
