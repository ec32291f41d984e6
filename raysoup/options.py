"""Typed options objects that also drive the command line and config validation.

An options class is a dataclass whose fields carry ``help`` (and optionally ``choices``)
in their metadata. :func:`add_arguments` turns it into argparse flags
(``field_name`` -> ``--field-name``) and :func:`from_mapping` builds it from a dict
(YAML, JSON, or parsed flags), rejecting unknown keys and wrong types with a message
that names the key, the value and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from raysoup.errors import BadInputError
from raysoup.io import storage

OptionsT = TypeVar("OptionsT")


class OptionsError(BadInputError):
    """An option has an unknown name, a wrong type or an impossible value."""


def option(
    default: Any = dataclasses.MISSING, help: str = "", choices: tuple = (), **kw: Any
) -> Any:
    """A dataclass field with CLI help. Mutable defaults are copied per instance."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata=metadata, **kw
        )
    return dataclasses.field(default=default, metadata=metadata, **kw)


# A field annotated ``Path | str`` is a *location*: a local path, or a URI such as
# ``s3://bucket/runs`` (see ``raysoup.io.storage``), which stays a string because ``Path``
# would collapse its ``//``.
LOCATION = Path | str


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        args = [a for a in members if a is not type(None)]
        optional = len(args) < len(members)
        if len(args) == 1:
            return args[0], optional
        if set(args) == {Path, str}:
            return LOCATION, optional
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) ``value`` to the annotated type ``tp``."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise OptionsError(f"option {name!r} must not be empty (expected {_describe(base)})")
    origin = typing.get_origin(base)
    if base is Path:
        if not isinstance(value, (str, Path)):
            raise OptionsError(f"option {name!r}={value!r}: expected a path")
        return Path(value)
    if base is LOCATION:
        if not isinstance(value, (str, Path)):
            raise OptionsError(f"option {name!r}={value!r}: expected a path or a URI")
        return value if storage.has_scheme(value) else Path(value)
    if base is bool:
        if not isinstance(value, bool):
            raise OptionsError(f"option {name!r}={value!r}: expected true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionsError(f"option {name!r}={value!r}: expected an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionsError(f"option {name!r}={value!r}: expected a number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise OptionsError(f"option {name!r}={value!r}: expected a string")
        return value
    if origin is list:
        (item_type,) = typing.get_args(base) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise OptionsError(f"option {name!r}={value!r}: expected a list")
        return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin is dict or base is dict:
        if not isinstance(value, Mapping):
            raise OptionsError(f"option {name!r}={value!r}: expected a mapping")
        return dict(value)
    return value


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_mapping(cls: type[OptionsT], data: Mapping[str, Any], where: str = "options") -> OptionsT:
    """Build options class ``cls`` from ``data``; every problem names the key."""
    if not isinstance(data, Mapping):
        raise OptionsError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise OptionsError(f"{where}: unknown option(s) {unknown}; known options: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        value = _coerce(name, value, hints[name])
        choices = fields[name].metadata.get("choices") or ()
        if choices and value is not None and value not in choices:
            raise OptionsError(
                f"{where}: option {name!r}={value!r}: expected one of {list(choices)}"
            )
        values[name] = value
    missing = [
        n
        for n, f in fields.items()
        if n not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise OptionsError(f"{where}: missing required option(s) {missing}")
    return cls(**values)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls``; flags left unset do not override defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _strip_optional(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default_text = "" if required else f" (default: {_default_of(f)!r})"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f.metadata.get("help", "") + default_text,
            "required": required,
        }
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            kwargs.update(nargs="+", type=item if item in (int, float) else str)
        elif typing.get_origin(base) is dict or base is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs["type"] = base if base in (int, float) else str
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
        parser.add_argument(flag, **kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
