"""Config loading shared by every CLI: a YAML file that must hold a mapping, and the type
check of its values against the dataclass they configure."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import HgkdError


def load_mapping(path: str, label: str) -> dict[str, Any]:
    """Read YAML at ``path``; any problem is one HgkdError line starting with ``label`` (which names the file)."""
    try:
        blob = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise HgkdError(f"{label}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise HgkdError(f"{label}: invalid YAML {_where(err)}") from None
    if blob is None:
        return {}
    if not isinstance(blob, dict):
        raise HgkdError(f"{label}: expected a mapping of key: value")
    return blob


def _where(err: yaml.YAMLError) -> str:
    """``at line L, column C (problem)`` from a YAML error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return f"({problem})"
    return f"at line {mark.line + 1}, column {mark.column + 1} ({problem})"


def checked_values(cls: type, blob: dict[str, Any], source: str) -> dict[str, Any]:
    """``blob`` with each value checked against ``cls``'s field type (a dataclass).

    A number written in a form YAML 1.1 reads as text (``8e-4``) becomes a float for a
    float field, a lone string a one-item list for a list field; any other mismatch is one HgkdError line naming ``source`` and the key.
    """
    hints = typing.get_type_hints(cls)
    out = dict(blob)
    for key, value in blob.items():
        expected = hints.get(key)
        if expected is None or _matches(value, expected) or (value is None and expected is str):
            continue  # None for a text field: an option not given (click's default)
        if typing.get_origin(expected) is list and isinstance(value, str) and _matches([value], expected):
            out[key] = [value]  # one data pattern written without brackets
            continue
        if _accepts(expected, float) and isinstance(value, str):
            try:
                out[key] = float(value)
                continue
            except ValueError:
                pass
        raise HgkdError(f"{source}: {key}: expected {_describe(expected)}, got {value!r}")
    return out


def _accepts(expected: Any, kind: type) -> bool:
    return expected is kind or kind in typing.get_args(expected)


def _matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if not args or Ellipsis in args:
            return True
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(expected: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return "a list"
    if origin is tuple:
        return f"a list of {len(args)}" if args and Ellipsis not in args else "a list"
    if origin is dict:
        return "a mapping"
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def unknown_keys(keys: list[str] | set[str], known: list[str] | tuple[str, ...] | set[str]) -> str:
    """``unknown key 'chekpoint' (did you mean 'checkpoint'?)``: the phrase for misspelt keys."""
    import difflib

    parts = []
    for key in sorted(keys):
        close = difflib.get_close_matches(str(key), list(known), n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}; known: {', '.join(sorted(known))}"


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (a factory's fresh value): CLI options
    read their defaults here, so each default is written once, on its config dataclass."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")
