r"""Byte-level BPE vocabularies stored in GGUF metadata, rebuilt as :class:`ByteLevelBPETokenizer`.

A GGUF file (llama.cpp's single-file model format) carries no ``tokenizer.json``. For a
byte-level BPE model (``tokenizer.ggml.model == "gpt2"``, the family of GPT-2, Llama 3,
SmolLM2, Qwen2, ...) its metadata holds:

``tokenizer.ggml.tokens``
    every token string; a token's position in the list is its id. Ordinary tokens are spelled
    in GPT-2's byte alphabet (a space is ``"Ġ"``), exactly as in a ``vocab.json``.
``tokenizer.ggml.token_type``
    one llama.cpp token type per token: 1 normal, 2 unknown, 3 control (``<|im_start|>``),
    4 user-defined (``<think>``), 5 unused, 6 byte. Control tokens become our *special*
    tokens and user-defined ones our *added* tokens: both are matched whole where they are
    written in the text; only control tokens are dropped by ``skip_special_tokens``.
``tokenizer.ggml.merges``
    the merges in priority order, ``"left right"``.
``tokenizer.ggml.pre``
    the *name* of the pre-tokenizer (the split regex), not the regex itself: llama.cpp keeps
    a table from names to regexes in ``llama-vocab.cpp``. :data:`PRE_TOKENIZERS` is our copy
    of the part of that table we support.
``tokenizer.ggml.{bos,eos,padding}_token_id``, ``tokenizer.ggml.add_bos_token``
    the roles and whether a prompt starts with BOS.

A released vocabulary need not hold all 256 byte symbols (SmolLM2 has no token for 21 bytes,
control characters and bytes that never occur in UTF-8); such bytes are dropped when encoding,
as ``transformers`` and llama.cpp do.

**SmolLM2's pre-tokenizer** (``"smollm"``, shared with StarCoder, Refact, Command-R and
CodeShell) is two passes in llama.cpp: first every number character ``\p{N}`` is cut out on its
own, then GPT-2's regex runs on the stretches between. The published ``tokenizer.json`` says the
same thing in the ``tokenizers`` library's words: ``Digits(individual_digits=True)`` followed by
``ByteLevel(use_regex=True)``. :data:`SMOLLM_SPLIT_PATTERN` is one regex with the same result:
``\p{N}`` as the first alternative, no ``" ?\p{N}+"`` branch, and GPT-2's "whitespace not
followed by a non-space" lookahead widened to also stop in front of a digit (a pass-two stretch
ends there), so ``"\n\n1"`` splits as ``"\n\n" "1"``, not ``"\n" "\n" "1"``.

(``transformers``' GGUF loader, at least up to 5.24, knows no ``"smollm"`` entry and falls back to
plain GPT-2 splitting. Since SmolLM2's merges never join a digit to anything, the two agree
except where two or more whitespace characters stand right before a digit; there we follow the
model's own tokenizer and llama.cpp. ``tokenizer_from_gguf(meta, pre="gpt2")`` reproduces the
``transformers`` behaviour exactly, should it be wanted.)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import (
    GPT2_SPLIT_PATTERN,
    ByteLevelBPETokenizer,
    bytes_to_unicode,
    gc_paused,
)

__all__ = [
    "LLAMA3_SPLIT_PATTERN",
    "PRE_TOKENIZERS",
    "QWEN2_SPLIT_PATTERN",
    "SMOLLM_SPLIT_PATTERN",
    "PreTokenizer",
    "tokenizer_from_gguf",
]

SMOLLM_SPLIT_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
"""SmolLM2 / StarCoder: single digits, then GPT-2's pieces (see the module docstring)."""

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3: case-insensitive contractions, one leading non-letter on words, digits in threes."""

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2: Llama 3's regex with single digits."""


@dataclass(frozen=True)
class PreTokenizer:
    """How a family of vocabularies splits text before BPE.

    Attributes:
        pattern: the split regex.
        ignore_merges: whether a pre-token found whole in the vocabulary skips the merges.
        add_bos: llama.cpp's default for ``add_bos_token`` when the file does not say.
    """

    pattern: str
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2 = PreTokenizer(GPT2_SPLIT_PATTERN)
_SMOLLM = PreTokenizer(SMOLLM_SPLIT_PATTERN)
_LLAMA3 = PreTokenizer(LLAMA3_SPLIT_PATTERN, ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer(QWEN2_SPLIT_PATTERN)

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # "default" is what llama.cpp's converter writes when it does not recognise a vocabulary;
    # like transformers, we read it as GPT-2's regex.
    "default": _GPT2,
    "gpt2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "refact": _SMOLLM,
    "command-r": _SMOLLM,
    "codeshell": _SMOLLM,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2,
}
"""``tokenizer.ggml.pre`` name -> pre-tokenizer (a subset of llama.cpp's table)."""

# llama.cpp token types (llama_token_type)
_CONTROL = 3
_USER_DEFINED = 4
_ODD_KINDS = frozenset({_CONTROL, _USER_DEFINED})  # the token types kept out of the BPE vocab

_ALPHABET = frozenset(bytes_to_unicode().values())
_BYTE_TO_CHAR = bytes_to_unicode()


@gc_paused()  # ~10^5 strings, pairs and dict entries: see gc_paused
def tokenizer_from_gguf(
    metadata: Mapping[str, Any], pre: str | None = None
) -> ByteLevelBPETokenizer:
    """Build the byte-level BPE tokenizer a GGUF file's metadata describes.

    Args:
        metadata: the file's key/value metadata as plain Python values (e.g.
            ``lmarch.weights.gguf.read_gguf(path).metadata``); only ``tokenizer.*`` keys are read.
        pre: a pre-tokenizer name overriding ``tokenizer.ggml.pre`` (a key of
            :data:`PRE_TOKENIZERS`).

    Returns:
        A tokenizer whose ids are the file's, with control tokens as special tokens,
        user-defined tokens as added tokens, and BOS/EOS/padding ids and ``add_bos_token`` set.

    Raises:
        LmarchError: the vocabulary is not byte-level BPE, its pre-tokenizer is unknown, or the
            metadata is inconsistent (lengths, ids, merges, duplicate tokens).
    """
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise LmarchError(
            f"tokenizer.ggml.model is {model!r}: only byte-level BPE vocabularies ('gpt2') "
            "can be read as a ByteLevelBPETokenizer"
        )
    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    merge_lines = _string_list(metadata, "tokenizer.ggml.merges")
    types = _int_list(metadata.get("tokenizer.ggml.token_type"), "tokenizer.ggml.token_type")
    if types is None:
        types = [1] * len(tokens)
    if len(types) != len(tokens):
        raise LmarchError(
            f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )

    name = pre if pre is not None else metadata.get("tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise LmarchError(
            f"unknown pre-tokenizer {name!r} (tokenizer.ggml.pre)",
            hint="known: " + ", ".join(sorted(PRE_TOKENIZERS)),
        )

    vocab, special, added = _token_tables(tokens, types)
    merges = _merge_pairs(merge_lines)

    add_bos = metadata.get("tokenizer.ggml.add_bos_token", spec.add_bos)
    if not isinstance(add_bos, bool):
        raise LmarchError(f"tokenizer.ggml.add_bos_token must be a bool, got {add_bos!r}")
    try:
        return ByteLevelBPETokenizer(
            vocab,
            merges,
            special,
            added_tokens=added,
            pattern=spec.pattern,
            ignore_merges=spec.ignore_merges,
            allow_missing_bytes=True,
            bos_token_id=_optional_id(metadata, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_optional_id(metadata, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_optional_id(metadata, "tokenizer.ggml.padding_token_id"),
            add_bos_token=add_bos,
        )
    except LmarchError as exc:
        raise LmarchError(f"GGUF vocabulary is inconsistent: {exc}", hint=exc.hint) from exc


def _token_tables(
    tokens: list[str], types: list[int]
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(vocab, special, added): normal tokens in the byte alphabet, control tokens, and
    user-defined tokens, each text -> id in id order; a text twice is refused by its ids.

    The common case (every token already in the byte alphabet, no text twice) is checked on
    the whole list at once; anything else goes through the loop, which names the culprit."""
    odd = list(itertools.compress(range(len(types)), map(_ODD_KINDS.__contains__, types)))
    if set("".join(tokens)) <= _ALPHABET:
        vocab = dict(zip(tokens, range(len(tokens))))
        if len(vocab) == len(tokens):
            special = {tokens[i]: i for i in odd if types[i] == _CONTROL}
            added = {tokens[i]: i for i in odd if types[i] == _USER_DEFINED}
            for i in odd:
                del vocab[tokens[i]]
            return vocab, special, added
    vocab, special, added = {}, {}, {}
    seen: dict[str, int] = {}
    for idx, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == _CONTROL:
            table, key = special, token
        elif kind == _USER_DEFINED:
            table, key = added, token
        else:
            # A normal token outside the byte alphabet is raw text; spell it in bytes (as
            # transformers does) so that BPE can reach it.
            table = vocab
            key = token if set(token) <= _ALPHABET else _spell_bytes(token)
        if key in seen:
            raise LmarchError(f"token {token!r} appears twice (ids {seen[key]} and {idx})")
        seen[key] = idx
        table[key] = idx
    return vocab, special, added


def _merge_pairs(lines: list[str]) -> list[tuple[str, str]]:
    """``"left right"`` lines -> (left, right) pairs. Split all at once when every line holds
    exactly one space between two non-empty tokens (the joined text then alternates " " and
    "\n" separators, which splitting and re-joining checks); otherwise line by line, naming the
    first bad one."""
    joined = "\n".join(lines)
    if joined.count("\n") == len(lines) - 1:  # no line holds a newline of its own
        parts = joined.replace("\n", " ").split(" ")
        if len(parts) == 2 * len(lines) and "" not in parts:
            pairs = list(zip(parts[0::2], parts[1::2]))
            if "\n".join(map(" ".join, pairs)) == joined:
                return pairs
    merges: list[tuple[str, str]] = []
    for rank, line in enumerate(lines):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise LmarchError(f"merge {rank} {line!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _spell_bytes(text: str) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8", errors="replace"))


def _string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise LmarchError(f"GGUF metadata has no {key}")
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise LmarchError(f"{key} must be an array of strings")
    # exact types first, at C speed (a vocabulary's ~10^5 strings); subclasses are fine too
    if not set(map(type, value)) <= {str} and not all(isinstance(item, str) for item in value):
        raise LmarchError(f"{key} must be an array of strings")
    return list(value)


def _int_list(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays from other readers
        value = value.tolist()
    if not isinstance(value, Sequence) or (
        not set(map(type, value)) <= {int}  # exact ints first, at C speed
        and not all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    ):
        raise LmarchError(f"{key} must be an array of integers")
    return list(value)


def _optional_id(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise LmarchError(f"{key} must be an integer, got {value!r}")
    return value
