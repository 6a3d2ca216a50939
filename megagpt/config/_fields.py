"""Shared machinery of the config sections: building dataclasses from dicts with clear errors, type coercion."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _section_from_dict(cls, values: dict[str, Any], section: str):
    """Build dataclass ``cls`` from ``values``, naming unknown keys (with close matches) and missing ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{section}: expected a JSON object (dict), got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}{_did_you_mean(unknown[0], known)}; "
                         f"allowed keys are {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{section}: missing required key(s) {missing}")
    return cls(**values)


def _check_positive_int(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{section}.{name} must be a positive integer, got {value!r}")


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a JSON object"
    return str(hint)


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint ``hint``; JSON lists become tuples, ints become floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        for option in options:
            try:
                return _coerce(where, value, option)
            except ValueError as err:
                if option is not type(None):
                    error = err
        if value is not None and len(options) == 2 and type(None) in options:
            raise error  # "X or null": the error of X says more than "must be X or null"
    elif hint is Any:
        return value
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
            raise ValueError(f"{where} must be a list of {len(args)} entries, got {list(value)!r}")
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise AssertionError(f"unhandled type hint {hint} for {where}")
    raise ValueError(f"{where} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


class _Section:
    """Mixin for the sections: type-check and normalise every field, then run ``_check``."""

    SECTION = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f"{self.SECTION}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Per-section value checks (ranges, choices); types are already right here."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a plain dict; unknown keys raise ValueError naming them."""
        return _section_from_dict(cls, values, cls.SECTION)

    def to_dict(self) -> dict[str, Any]:
        """The user inputs as a JSON-serialisable dict (round-trips through ``from_dict``)."""
        return _jsonable(dataclasses.asdict(self))

    def _choice(self, name: str, allowed: tuple) -> None:
        if getattr(self, name) not in allowed:
            raise ValueError(f"{self.SECTION}.{name}={getattr(self, name)!r} is not one of {list(allowed)}")

    def _at_least(self, name: str, low: float, high: float | None = None) -> None:
        value = getattr(self, name)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{self.SECTION}.{name} must be {bound}, got {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def read_json_file(path, what: str):
    """Parse a JSON file, turning a missing file or bad JSON into a ValueError naming ``what`` and the path."""
    import json
    from pathlib import Path
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a leading BOM is a marker, not data
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None
