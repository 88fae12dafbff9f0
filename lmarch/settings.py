"""Settings as config dataclass fields: their help, their scalar type, and text parsed into them.

Every config (a model's, training's, sampling's) is a dataclass; its fields are the settings a
user can give, by keyword, in a TOML file, as ``--set KEY=VALUE`` or as a command-line option
(:mod:`lmarch.cli.options`). A field's help is its ``metadata["help"]`` (see :func:`setting`) or
else the comment that ends its line in the class's source, so a config documented either way
documents its option too. Ranges are checked by each config's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import types
import typing
from functools import cache
from typing import Any

from lmarch.errors import LmarchError

_SCALARS = (int, float, str, bool)


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help text its command-line option shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def scalar_type(hint: Any) -> type | None:
    """``int`` for ``int`` or ``int | None``; None for anything that is not one scalar type."""
    if hint in _SCALARS:
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0]
    return None


@cache
def _field_comments(cls: type) -> dict[str, str]:
    """The comment ending each field's line in ``cls``'s source: ``name: int = 1  # help``."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    line_name: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and tok.string in names and row not in line_name:
            if tok.line.strip().startswith(tok.string + ":"):
                line_name[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_name:
            comments[line_name[row]] = tok.string.lstrip("#").strip()
    return comments


def field_help(cls: type, field: dataclasses.Field) -> str:
    """The help of ``field`` of ``cls``: its ``metadata["help"]``, else its line's comment."""
    return field.metadata.get("help") or _field_comments(cls).get(field.name, "")


def field_names(cls: type) -> set[str]:
    """Names of a dataclass's fields."""
    return {f.name for f in dataclasses.fields(cls)}


def coerce_value(cls: type, key: str, raw: str) -> Any:
    """Parse the text ``raw`` (``--set KEY=VALUE``) as the type of field ``key`` of ``cls``."""
    hint = typing.get_type_hints(cls)[key]
    kind = scalar_type(hint)
    text = raw.strip()
    if kind is not hint and text.lower() in ("none", "null"):
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if kind is float:
            return float(text)
    except ValueError:
        name = getattr(kind, "__name__", str(hint))
        raise LmarchError(f"bad value {raw!r} for {key} (expected {name})") from None
    return text


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``; a value its ``__post_init__`` refuses (``ValueError``) is reported as
    the :class:`LmarchError` it is (one line, exit 2 on the command line)."""
    try:
        return cls(**values)
    except LmarchError:
        raise
    except (ValueError, TypeError) as exc:
        raise LmarchError(f"{cls.__name__}: {exc}") from None


def route_settings(overrides: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Split ``--set`` overrides among config dataclasses: each key goes to the first of
    ``classes`` that has a field of that name, a string parsed by that field's type; a key none
    has is refused, listing the valid ones. Returns one dict per class, in order."""
    keys = [field_names(cls) for cls in classes]
    routed: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in overrides.items():
        owner = next((i for i, names in enumerate(keys) if key in names), None)
        if owner is None:
            valid = ", ".join(sorted(set().union(*keys)))
            raise LmarchError(f"unknown setting {key!r}", hint=f"valid keys: {valid}")
        cls = classes[owner]
        routed[owner][key] = coerce_value(cls, key, value) if isinstance(value, str) else value
    return routed
