"""Command-line flags generated from recipe dataclass fields (``prune.recipe``).

Each field becomes ``--field-name``: booleans as ``--flag/--no-flag``, fields with ``choices`` list
them, ``None`` is spelled ``none`` where the field allows it, and a mapping or list is given as JSON.
The help text is the field's ``metadata["help"]`` with its default. Flags default to "not given", so
that the layers stay apart: the recipe's defaults < ``--recipe FILE`` < the flags on the line.
A field with ``cli=False`` in its metadata has no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any


def _options(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return typing.get_args(hint)
    return (hint,)


def _parser(name: str, hint: Any):
    """The ``type=`` callable of a flag: the string as the first annotated type that takes it."""
    kinds = [typing.get_origin(k) or k for k in _options(hint)]

    def parse(text: str) -> Any:
        if type(None) in kinds and text.lower() in ("none", "null"):
            return None
        if any(k in (dict, Mapping, list, tuple) for k in kinds) and text[:1] in "{[":
            try:
                return json.loads(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({err})") from None
        for kind in kinds:
            if kind is bool and text.lower() in ("true", "false", "yes", "no"):
                return text.lower() in ("true", "yes")
            if kind is int:
                try:
                    return int(text)
                except ValueError:
                    continue
            if kind is float:
                try:
                    return float(text)
                except ValueError:
                    continue
            if kind is str:
                return text
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid {name}")

    parse.__name__ = name  # argparse names the type in its error
    return parse


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str, prefix: str) -> None:
    """Add one flag per field of the dataclass ``cls`` to a new argument group of ``parser``."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = _default(field)
        text = field.metadata.get("help", "")
        if "default" not in text:  # a help text that explains its default says it better
            text += f" (default: {default})"
        text = text.replace("%", "%%")
        dest = f"{prefix}{field.name}"
        if hints[field.name] is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, dest=dest, help=text
            )
            continue
        choices = field.metadata.get("choices")
        group.add_argument(
            flag,
            type=_parser(field.name, hints[field.name]),
            choices=choices,
            default=None,
            dest=dest,
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else field.name.upper(),
            help=text,
        )


def given(args: argparse.Namespace, cls: type, prefix: str) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags left out are not in the result)."""
    values = vars(args)
    return {
        f.name: values[prefix + f.name]
        for f in dataclasses.fields(cls)
        if values.get(prefix + f.name) is not None
    }
