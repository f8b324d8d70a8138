"""Typed JSON records for the cache's own files, checked field by field when read and written back unchanged.

Modelled on zarr-python's metadata classes (`zarr.core.metadata.v3.ArrayV3Metadata`): a record is a frozen
dataclass; `from_dict` parses each field of a JSON mapping against its annotation and refuses a damaged one with a
one-line `CacheFormatError` naming the field ("sparsifier.k must be an integer, got '8'"); `to_dict` gives the
mapping back, so `R.from_dict(d).to_dict() == d` and a file read and rewritten keeps its bytes.

Annotations understood: Record subclasses, `X | None`, `Literal[...]`, `tuple[X, ...]` (a JSON list),
`dict[str, X]`, a bare `dict` (any JSON mapping, kept as it is), `bool`, `int`, `float` and `str`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Self

from kdcache.errors import CacheFormatError


class FieldError(CacheFormatError):
    """One field of a record holds a value of the wrong type or range: "X must be Y, got Z"."""

    def __init__(self, field: str, expected: str, value: Any):
        self.field, self.expected, self.value = field, expected, value
        super().__init__(f"{field} must be {expected}, got {_show(value)}")

    def under(self, where: str) -> FieldError:
        """The same error with the field named from an enclosing record (`where`)."""
        return FieldError(_join(where, self.field), self.expected, self.value)


def omitted_when_none() -> Any:
    """A field whose key is left out of the JSON while its value is None, and that reads as None when absent."""
    return dataclasses.field(default=None, metadata={"omitted_when_none": True})


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of the cache's typed records; subclasses are frozen dataclasses and may check ranges in __post_init__
    (raising FieldError with the field's own name: `from_dict` adds where the record sits in the file)."""

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        """Parse a JSON mapping; unknown keys, missing keys and values of the wrong type raise CacheFormatError."""
        if not isinstance(data, dict):
            raise FieldError(where or cls.__name__, "a mapping", data)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise CacheFormatError(
                f"{_join(where, str(unknown[0]))} is not a known key; known keys here: {', '.join(sorted(fields))}"
            )
        hints = _hints(cls)
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = parse_value(data[name], hints[name], _join(where, name))
            elif not f.metadata.get("omitted_when_none"):
                raise CacheFormatError(f"{_join(where, name)} is missing")
        try:
            return cls(**kwargs)
        except FieldError as exc:
            raise exc.under(where) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON mapping of this record (a new one: changing it leaves the record alone)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omitted_when_none"):
                continue
            out[f.name] = dump_value(value)
        return out


def parse_value(value: Any, tp: Any, where: str) -> Any:
    """Check one JSON value against annotation `tp` and convert it (lists to tuples, records to Record objects)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value, where)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if value is None:
            return None
        (inner,) = args  # only `X | None` unions are used
        return parse_value(value, inner, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise FieldError(where, "one of " + ", ".join(repr(a) for a in allowed), value)
        return value
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise FieldError(where, "a list", value)
        return tuple(parse_value(item, item_tp, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise FieldError(where, "a mapping with string keys", value)
        if tp is dict:
            return dict(value)
        item_tp = typing.get_args(tp)[1]
        return {key: parse_value(item, item_tp, f"{where}[{key!r}]") for key, item in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FieldError(where, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FieldError(where, "an integer", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise FieldError(where, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise FieldError(where, "a string", value)
    raise TypeError(f"{where}: annotation {tp!r} is not supported by kdcache.store.schema")  # a bug, not bad data


def dump_value(value: Any) -> Any:
    """The JSON form of a parsed value: records to mappings, tuples to lists, mappings copied."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [dump_value(item) for item in value]
    if isinstance(value, dict):
        return {key: dump_value(item) for key, item in value.items()}
    return value


def check_at_least(record: Record, name: str, minimum: int) -> None:
    """__post_init__ helper: refuse an integer field below `minimum`."""
    value = getattr(record, name)
    if value < minimum:
        raise FieldError(name, f"at least {minimum}", value)
