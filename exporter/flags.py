"""Options declared once: a dataclass field carries its flag's help, choices and group, and argparse
arguments are made from the fields. A default that a recipe gives is read from recipes/defaults.toml
when the help is made, so the help cannot drift from the recipes.
"""

from __future__ import annotations

import argparse
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from exporter.pipeline.recipes import RECIPES_DIR


@dataclass(frozen=True)
class Flag:
    help: str
    metavar: str | None = None
    choices: Sequence[Any] | None = None
    group: str | None = None  # the --help section ("int8", "TensorRT")
    recipe: str | None = None  # "calibration.method": the recipe's key that gives the default
    name: str | None = None  # the flag, where not --field-name
    inverted: bool = False  # a true field set false by the flag (--skip-memory-check)


def option(help: str, default: Any = None, factory: Callable[[], Any] | None = None, **flag: Any) -> Any:
    """A declared field with `default` (a list: a fresh one each time), or made by `factory`."""
    metadata = {"flag": Flag(help, **flag)}
    if isinstance(default, list):
        return field(default_factory=list, metadata=metadata)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def recipe_default(key: str) -> Any:
    """A value of recipes/defaults.toml by dotted key (None where it sets none)."""
    value: Any = tomllib.loads((RECIPES_DIR / "defaults.toml").read_text())
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if key.startswith("shape_limits.") and isinstance(value, list):
        value = value[-1]  # the flag sets the max
    return value


def _kind(hint: Any) -> tuple[type, bool]:
    """The flag's value type, and whether None is allowed (`int | None` -> (int, True))."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return typing.get_origin(hint) or hint, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, groups: dict[str, Any]) -> None:
    """An argument per declared field of `cls`, in its group, with its default said in its help."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag: Flag | None = f.metadata.get("flag")
        if flag is None:
            continue
        target = groups[flag.group] if flag.group else parser
        kind, optional = _kind(hints[f.name])
        arguments: dict[str, Any] = {"dest": f.name, "help": flag.help + _default_text(f, flag)}
        if kind is bool and flag.inverted:
            arguments.update(action="store_false")
        elif kind is bool:
            arguments.update(action=argparse.BooleanOptionalAction if optional else "store_true")
        elif kind is list:
            arguments.update(action="append", metavar=flag.metavar)
        else:
            arguments.update(type=kind, metavar=flag.metavar, choices=flag.choices)
        if f.default is MISSING and f.default_factory is MISSING:
            arguments["required"] = True
        elif f.default_factory is not MISSING:
            arguments["default"] = f.default_factory()
        else:
            arguments["default"] = f.default
        target.add_argument(flag.name or f"--{f.name.replace('_', '-')}", **arguments)


def _default_text(f: Field, flag: Flag) -> str:
    """What the help says of the default: the recipe's (with the value recipes/defaults.toml gives), or the field's."""
    if flag.recipe:
        value = recipe_default(flag.recipe)
        return f" (default: the recipe's{'' if value is None else f', {value} in recipes/defaults.toml'})"
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if "(default:" in flag.help or flag.inverted or default in (None, False, MISSING, []):
        return ""
    return f" (default: {default})"
