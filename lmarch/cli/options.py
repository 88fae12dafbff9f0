"""Command-line options made from config dataclasses: one source of names, defaults and help.

A field ``max_new_tokens: int = 128`` becomes ``--max-new-tokens N`` (type ``int``, default 128),
with the field's help (:func:`lmarch.settings.field_help`). Only fields of a scalar type
(``int``, ``float``, ``str``, ``bool``, optionally ``| None``) become options; a ``bool`` becomes
a ``--name / --no-name`` pair. Ranges are not checked here but by the config's
own ``__post_init__`` once the options are parsed, so the command line and the library refuse the
same values with the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from lmarch.settings import build_config, field_help, scalar_type

UNSET = None  # the default of an option whose value comes from elsewhere (a preset, a run)


def option_name(field_name: str) -> str:
    """``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + field_name.replace("_", "-")


def option_fields(cls: type, exclude: Iterable[str] = ()) -> list[tuple[dataclasses.Field, type]]:
    """``cls``'s fields that can be options, with their scalar type (``list`` for a
    ``tuple[str, ...]``, given by repeating the option)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kind = list if hint == tuple[str, ...] else scalar_type(hint)
        if f.init and kind is not None and f.name not in exclude:
            out.append((f, kind))
    return out


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: Mapping[str, Any] | None = None,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, Iterable[str]] | None = None,
    unset: bool = False,
) -> list[str]:
    """Add one option per scalar field of dataclass ``cls`` to ``parser``; return their names.

    ``defaults`` overrides the dataclass defaults for this command (``lmarch generate`` decodes
    greedily, say); ``unset=True`` gives every option the default ``None``, meaning "keep the
    value from elsewhere" (a preset's, a resumed run's), with the dataclass default in the help.
    ``aliases`` adds other spellings (``{"learning_rate": ["--lr"]}``).
    """
    defaults = dict(defaults or {})
    aliases = dict(aliases or {})
    names = []
    for f, kind in option_fields(cls, exclude):
        default = defaults.get(f.name, _default_of(f))
        text = field_help(cls, f)
        value_text = "unset" if default in (None, (), []) else default
        shown = f"{cls.__name__} default: {value_text}" if unset else f"default: {value_text}"
        text = f"{text} ({shown})" if text else f"({shown})"
        text = text.replace("%", "%%")  # argparse formats help with %
        flags = [option_name(f.name), *aliases.get(f.name, ())]
        value = UNSET if unset else default
        if kind is list:
            parser.add_argument(
                *flags, dest=f.name, action="append", default=None if unset else [],
                metavar="TEXT", help=text,
            )  # fmt: skip
        elif kind is bool:
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=value,
                help=text,
            )  # fmt: skip
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[kind]
            parser.add_argument(
                *flags, dest=f.name, type=kind, default=value, metavar=metavar, help=text
            )
        names.append(f.name)
    return names


def add_union_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    classes: Mapping[str, type],
    *,
    exclude: Iterable[str] = (),
) -> list[str]:
    """One option per scalar field found in any of ``classes`` (``{owner name: dataclass}``,
    e.g. the model families), default ``None`` ("the preset's value"); the help names the
    owners that have the field, with each owner's own help. A field that two classes type
    differently is a bug, refused here."""
    kinds: dict[str, type] = {}
    owners: dict[str, list[str]] = {}
    for owner, cls in classes.items():
        for f, kind in option_fields(cls, exclude):
            if kinds.setdefault(f.name, kind) is not kind:
                raise TypeError(f"field {f.name} has two types: {kinds[f.name]} and {kind}")
            text = field_help(cls, f)
            owners.setdefault(f.name, []).append(f"{owner}: {text}" if text else owner)
    for name, kind in kinds.items():
        text = f"{'; '.join(owners[name])} (default: the preset's)".replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                option_name(name), dest=name, action=argparse.BooleanOptionalAction, help=text
            )
        elif kind is not list:
            metavar = {int: "N", float: "X", str: "TEXT"}[kind]
            parser.add_argument(option_name(name), dest=name, type=kind, metavar=metavar, help=text)
    return list(kinds)


def given_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that were given (not left at ``None``)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def config_from_args(cls: type, args: argparse.Namespace, names: Iterable[str]) -> Any:
    """``cls`` built from the parsed options ``names`` (see :func:`lmarch.settings.build_config`)."""
    return build_config(cls, {n: getattr(args, n) for n in names})
