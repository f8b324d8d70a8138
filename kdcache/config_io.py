"""Loading typed job configs: YAML files and `key.sub=value` overrides into the config dataclasses of
:mod:`kdcache.config`, with every value coerced to its field's type and every refusal one line naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from kdcache.errors import BadInputError

__all__ = ["ConfigValueError", "apply_override", "from_dict", "load_config", "to_dict"]


class ConfigValueError(ValueError):
    """A value a config dataclass refuses in `__post_init__` ("X must be Y, got Z").

    Raised as a ValueError from Python; `from_dict` (YAML files, `--set`) turns it into a BadInputError naming the
    key's full path, e.g. "config key 'loss.alpha' must be in [0, 1], got 1.5".
    """

    def __init__(self, key: str, requirement: str, value: Any):
        super().__init__(f"{key} must be {requirement}, got {value!r}")
        self.key, self.requirement, self.value = key, requirement, value


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _bad(where: str, requirement: str, value: Any) -> BadInputError:
    return BadInputError(f"config key '{where}' must be {requirement}, got {value!r}")


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    """bool, int, float or str: check the value and convert what YAML leaves ambiguous ("3e-4" as a string)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(where, "true or false", value)
    if isinstance(value, bool):
        raise _bad(where, {int: "an integer", float: "a number", str: "a string"}[tp], value)
    if tp is int:
        if isinstance(value, int):
            return value
        raise _bad(where, "an integer", value)
    if tp is float:
        if isinstance(value, (int, float, str)):  # strings too: YAML 1.1 reads "3e-4" (no dot) as one
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(where, "a number", value)
    if isinstance(value, (str, int, float)):
        return str(value)
    raise _bad(where, "a string", value)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except BadInputError as exc:
            errors.append(str(exc))
    raise BadInputError(errors[0] if errors else f"config key '{where}': bad value {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp` (simple types only) and convert what YAML leaves ambiguous."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise _bad(where, "a mapping", value)
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"yes", "no"} <= set(allowed):  # YAML 1.1 reads yes/no/on/off as booleans
            value = "yes" if value else "no"
        if value not in allowed:
            raise _bad(where, f"one of {list(allowed)}", value)
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise _bad(where, "a list", value)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _bad(where, "a mapping", value)
        return dict(value)
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, where)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys with the list of known ones."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise BadInputError(f"unknown config key '{path}'; known keys here: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigValueError as exc:
        path = f"{where}.{exc.key}" if where else exc.key
        raise BadInputError(f"config key '{path}' must be {exc.requirement}, got {exc.value!r}") from None


def to_dict(config: Any) -> dict:
    """A plain nested dict of a config dataclass (for manifests and saved run configs)."""
    return dataclasses.asdict(config)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in assignment:
        raise BadInputError(f"override '{assignment}' must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BadInputError(f"override '{assignment}': '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:  # e.g. a tag (`!!python/object:...`), which safe_load refuses to construct
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise BadInputError(f"override '{assignment}': the value is not plain YAML ({problem}); give a number, "
                            "a string, a list or a mapping, and quote a string that starts with ! or another "
                            "YAML symbol") from None


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read a YAML job spec (optional), apply overrides in order, and build the typed config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise BadInputError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BadInputError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise BadInputError(f"config file {path} must hold a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls, data)
