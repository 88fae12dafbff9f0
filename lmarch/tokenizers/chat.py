"""Chat templates: turn a list of messages into the one prompt string a chat model was tuned on.

A chat model learned its conversations in one exact layout, e.g. SmolLM2's ChatML::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant

Model files carry that layout as a Jinja2 template (``tokenizer.chat_template`` in a GGUF,
``chat_template`` in a ``tokenizer_config.json``). :func:`render_chat` renders one the way
``transformers``' ``apply_chat_template`` does, so prompts match the reference to the character:
``trim_blocks`` and ``lstrip_blocks`` on, the ``loopcontrols`` extension (``{% break %}``), a
``tojson`` filter that leaves non-ASCII text alone, and the helpers templates call:
``raise_exception(message)`` and ``strftime_now(format)``.

A template is data that arrived with a downloaded file, so it is treated as untrusted code: it
runs in Jinja2's ``ImmutableSandboxedEnvironment`` (no attributes starting with ``_``, no calls
to unsafe methods, no mutation of lists and dicts passed in), ``namespace`` objects refuse
``_``-prefixed names, and everything the template sees is first rebuilt from plain JSON-like
values, so it never holds a Python object with methods of its own. Any failure, a sandbox
violation included, becomes one :class:`~lmarch.errors.LmarchError`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmarch.errors import LmarchError

__all__ = ["render_chat"]


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render ``messages`` with the chat ``template``.

    Args:
        template: the Jinja2 chat template (e.g. GGUF metadata ``tokenizer.chat_template``).
        messages: the conversation, each a mapping such as ``{"role": "user", "content": "Hi"}``.
        add_generation_prompt: end with the opening of an assistant turn, for the model to
            continue (the template decides what that is).
        **extra: further template variables. ``transformers`` passes the tokenizer's special
            token strings, so give ``bos_token=tok.bos_token, eos_token=tok.eos_token`` for
            templates that write them; ``tools``, ``documents`` and the like go here too.

    Returns:
        The prompt text. Special tokens appear in it as text (``<|im_start|>``) and are parsed
        back to their ids by the tokenizer's ``encode``.

    Raises:
        LmarchError: the template does not compile, fails while rendering (including its own
            ``raise_exception``), or tries something the sandbox forbids; or the inputs are not
            plain data.
    """
    if not isinstance(template, str):
        raise LmarchError(f"chat template must be a string, got {type(template).__name__}")
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise LmarchError("messages must be a list of {'role': ..., 'content': ...} mappings")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise LmarchError(f"message {i} is a {type(message).__name__}, not a mapping")
    variables = {key: _plain(value, key) for key, value in extra.items()}
    variables["messages"] = _plain(list(messages), "messages")
    variables["add_generation_prompt"] = bool(add_generation_prompt)
    compiled = _compile(template)
    try:
        return compiled.render(**variables)
    except jinja2.TemplateError as exc:
        raise LmarchError(f"chat template error: {exc.message or exc}") from exc
    except Exception as exc:  # the template is untrusted code: any failure is its failure
        raise LmarchError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The compiled template (cached: a chat renders the same template every turn)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _dict
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise LmarchError(f"chat template does not compile{where}: {exc.message or exc}") from exc


def _raise_exception(message: str) -> None:
    """What templates call to reject a conversation (e.g. roles not alternating)."""
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """Today's date for templates that print it into the system prompt."""
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON without Jinja's HTML escaping (which would turn ``<`` into ``\\u003c``)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """``dict(...)`` for templates, as a plain function (no class to climb from)."""
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` that refuses attribute names starting with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a chat template may not set {name!r} (names starting with '_' are refused)"
        )


def _plain(value: Any, where: str) -> Any:
    """``value`` rebuilt from str, int, float, bool, None, lists, tuples and str-keyed dicts."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)  # subclasses (enums) carry methods of their own
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise LmarchError(
        f"{where} is a {type(value).__name__}; chat template inputs must be plain data "
        "(str, int, float, bool, None, lists and dicts of them)"
    )
