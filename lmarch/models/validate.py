"""Range checks for the Config dataclasses: a bad value is refused where it is set, naming the
field and its valid range, instead of failing later as a shape error or a NaN loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lmarch.errors import LmarchError


class ConfigError(LmarchError, ValueError):
    """A config field outside its valid range. An :class:`LmarchError` (the command line prints
    one line, exit 2) and a ``ValueError`` (what a dataclass check conventionally raises).
    ``field`` names the offending field (loaders translate it to the file's own key)."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, low: int = 1) -> None:
    """``value`` must be an integer >= ``low``."""
    if not _is_int(value) or value < low:
        raise ConfigError(f"{owner}.{name} must be an integer >= {low}, got {value!r}", name)


def check_optional_int(owner: str, name: str, value: Any, low: int = 1) -> None:
    """``value`` must be None or an integer >= ``low``."""
    if value is not None:
        check_int(owner, name, value, low)


def check_fraction(owner: str, name: str, value: Any) -> None:
    """``value`` must be a probability in [0, 1) (a dropout rate)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(f"{owner}.{name} must be in [0, 1), got {value!r}", name)


def check_positive(owner: str, name: str, value: Any) -> None:
    """``value`` must be a finite number > 0 (an epsilon, a RoPE base)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value < float("inf"):
        raise ConfigError(f"{owner}.{name} must be a number > 0, got {value!r}", name)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}", name)


def check_flash_dropout(owner: str, attention: str, dropout: float) -> None:
    """The written-out flash attention has no attention dropout: refuse it with dropout > 0."""
    if attention == "flash" and dropout > 0:
        raise ConfigError(
            f"{owner}.attention='flash' has no attention dropout; set dropout=0 "
            f"(got {dropout}) or use attention='sdpa'",
            "attention",
        )


def check_bool(owner: str, name: str, value: Any) -> None:
    """``value`` must be True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}", name)


def check_divides(owner: str, name: str, value: int, by_name: str, by: int) -> None:
    """``value`` must be a multiple of ``by``."""
    if value % by:
        raise ConfigError(
            f"{owner}.{name} ({value}) must be a multiple of {by_name} ({by}), got remainder "
            f"{value % by}",
            name,
        )
