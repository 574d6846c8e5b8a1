"""Generic machinery of recipe dataclasses (``prune.recipe``): fields declared with :func:`option`,
validated from their type annotation, ``choices`` and ``check``, converted to and from plain mappings.

A field's ``metadata`` holds ``help`` (one line, for ``--help`` and errors), ``choices``, ``check``
(``value -> problem or None``) and ``cli`` (False: no command-line flag). Nothing here knows which
options exist; :mod:`prune.recipe` declares them.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

__all__ = ["Fields", "RecipeError", "option"]


class RecipeError(ValueError):
    """An unknown key or a bad value in a recipe; the message names it and lists the valid ones."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    check: Callable[[Any], str | None] | None = None,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A recipe field: its default, its ``--help`` text, and how it is validated.

    Args:
        default: the default value (the one place it is written).
        help: one line for ``--help`` and the docs.
        choices: the valid values, listed in errors and in ``--help``.
        check: ``value -> problem or None`` for what the type and choices do not say (ranges).
        cli: False keeps the field out of the command line (values a flag cannot spell).
        default_factory: for mutable or nested defaults.
    """
    metadata = {"help": help, "choices": choices, "check": check, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Fields:
    """Generic validation, dict conversion and defaults of a recipe dataclass (its fields say it all)."""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in cls.fields()]

    def validate(self) -> None:
        """Raise :class:`RecipeError` naming the first bad value and what is valid."""
        hints = typing.get_type_hints(type(self))
        for f in self.fields():
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name])
            choices = f.metadata.get("choices")
            if problem is None and choices is not None and value is not None and value not in choices:
                problem = f"must be one of {list(choices)}"
            check = f.metadata.get("check")
            if problem is None and check is not None and value is not None and not callable(value):
                problem = check(value)
            if problem is not None:
                where = f"{type(self).__name__}.{f.name}"
                raise RecipeError(f"{where}={value!r}: {problem}. Help: {f.metadata.get('help', '')}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe"):
        """Build from a mapping (a parsed file); unknown keys are refused with the list of valid ones."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where} must be a mapping of option: value, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise RecipeError(
                f"unknown key(s) {unknown} in {where}; valid keys of {cls.__name__}: {cls.keys()}"
            )
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            nested = _dataclass_of(hints[key])
            values[key] = nested.from_dict(value, f"{where}.{key}") if nested and value is not None else value
        return cls(**values)

    def to_dict(self, *, strict: bool = True) -> dict[str, Any]:
        """Plain values (nested recipes as mappings). A callable value cannot be written to a file:
        ``strict`` raises, otherwise it becomes its name (for provenance in a saved header)."""
        out = {}
        for f in self.fields():
            value = getattr(self, f.name)
            if isinstance(value, Fields):
                value = value.to_dict(strict=strict)
            elif callable(value):
                if strict:
                    raise RecipeError(
                        f"{f.name}={value!r} is a Python callable: a recipe file cannot hold it. Save the "
                        "recipe with a named value instead."
                    )
                value = f"<callable {getattr(value, '__qualname__', repr(value))}>"
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a user chose)."""
        default = type(self)()
        return {k: v for k, v in self.to_dict(strict=False).items() if default.to_dict(strict=False)[k] != v}


def _dataclass_of(hint: Any) -> type | None:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, Fields):
            return candidate
    return None


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint``, or None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    for kind in options:
        if kind is Any or kind is type(None) and value is None:
            return None
        origin = typing.get_origin(kind) or kind
        if origin is bool and isinstance(value, bool):
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if origin is str and isinstance(value, str):
            return None
        if origin in (dict, Mapping) and isinstance(value, Mapping):
            return None
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            return None
        if origin in (Callable, typing.Callable) or getattr(origin, "__name__", "") == "Callable":
            if callable(value):
                return None
        if isinstance(origin, type) and issubclass(origin, Fields) and isinstance(value, origin):
            return None
    names = [getattr(k, "__name__", None) or str(k) for k in options]
    return f"must be of type {' or '.join(names).replace('NoneType', 'None')}"


_UnionType = type(int | None)
