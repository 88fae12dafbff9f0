"""Checking and reading WordPiece vocabularies: lists, ``vocab.txt`` and ``tokenizer.json``.

A Hugging Face ``tokenizer.json`` for BERT holds a ``WordPiece`` model (vocabulary, unknown
token, continuation prefix, longest word), a ``BertNormalizer`` with its four flags, a
``BertPreTokenizer``, the special tokens as "added tokens", and a post-processor whose template
is ``[CLS] $A [SEP]`` / ``[CLS] $A [SEP] $B:1 [SEP]:1``. :func:`tokenizer_json_options` turns that
into :class:`~lmarch.tokenizers.wordpiece.WordPieceTokenizer` arguments and refuses anything else.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError


def read_vocab_lines(path: Path) -> list[str]:
    """The lines of a ``vocab.txt``, trailing whitespace removed (the token of id ``i`` is line i)."""
    try:
        return [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LmarchError(f"cannot read vocabulary file {path}: {exc}") from exc


def tokens_in_id_order(vocab: Sequence[str] | Mapping[str, int] | Any) -> list[str]:
    """The tokens of a list or a token -> id mapping, checked: ids 0..n-1, no repeats."""
    if isinstance(vocab, Mapping):
        ids = list(vocab.values())
        if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(ids))):
            raise LmarchError(f"vocabulary ids must be 0..{len(ids) - 1}, each used once")
        tokens = [""] * len(ids)
        for token, idx in vocab.items():
            tokens[idx] = token
    elif isinstance(vocab, Sequence) and not isinstance(vocab, str):
        tokens = list(vocab)
    else:
        raise LmarchError("the vocabulary must be a list of tokens or an object of token -> id")
    if not all(isinstance(t, str) and t for t in tokens):
        raise LmarchError("vocabulary tokens must be non-empty strings")
    if len(set(tokens)) != len(tokens):
        dup = next(t for t, c in Counter(tokens).items() if c > 1)
        raise LmarchError(f"token {dup!r} appears twice in the vocabulary")
    return tokens


def tokenizer_json_options(data: Any) -> dict[str, Any]:
    """Constructor arguments for a parsed ``tokenizer.json`` (raises on what BERT lacks)."""
    if not isinstance(data, dict):
        raise LmarchError("expected a JSON object")
    model = data.get("model") or {}
    if model.get("type") != "WordPiece":
        raise LmarchError(f"model type {model.get('type')!r} is not WordPiece")
    options: dict[str, Any] = {
        "vocab": model["vocab"],
        "unk_token": model.get("unk_token", "[UNK]"),
        "continuing_subword_prefix": model.get("continuing_subword_prefix", "##"),
        "max_input_chars_per_word": model.get("max_input_chars_per_word", 100),
    }
    norm = data.get("normalizer")
    if norm is None:
        options.update(
            lowercase=False, strip_accents=False, handle_chinese_chars=False, clean_text=False
        )
    elif norm.get("type") == "BertNormalizer":
        options.update(
            lowercase=norm.get("lowercase", True),
            strip_accents=norm.get("strip_accents"),
            handle_chinese_chars=norm.get("handle_chinese_chars", True),
            clean_text=norm.get("clean_text", True),
        )
    else:
        raise LmarchError(f"unsupported normalizer {json.dumps(norm)[:100]}")
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict) or pre.get("type") != "BertPreTokenizer":
        raise LmarchError(f"unsupported pre_tokenizer {json.dumps(pre)[:100]}")
    special = []
    for token in data.get("added_tokens") or []:
        if (
            not token.get("special")
            or token.get("normalized")
            or token.get("lstrip")
            or token.get("rstrip")
            or token.get("single_word")
        ):
            raise LmarchError(
                f"unsupported added token {json.dumps(token)[:100]} (only plain special tokens are read)"
            )
        if options["vocab"].get(token["content"]) != token["id"]:
            raise LmarchError(
                f"added token {token['content']!r} has an id not in the WordPiece vocab"
            )
        special.append(token["content"])
    options["special_tokens"] = special
    options.update(bert_template_roles(data.get("post_processor")))
    pad = (data.get("padding") or {}).get("pad_token")
    if isinstance(pad, str):
        options["pad_token"] = pad
    return options


def bert_template_roles(post: Any) -> dict[str, str]:
    """``cls_token`` and ``sep_token`` from a BERT post-processor (``{}`` when there is none)."""
    if post is None:
        return {}
    if post.get("type") == "BertProcessing":
        return {"cls_token": post["cls"][0], "sep_token": post["sep"][0]}
    if post.get("type") == "TemplateProcessing":

        def shape(items: list[dict]) -> list[tuple[str, int]]:
            return [
                (item["SpecialToken"]["id"], item["SpecialToken"]["type_id"]) if "SpecialToken" in item
                else ("$" + item["Sequence"]["id"], item["Sequence"]["type_id"])
                for item in items
            ]  # fmt: skip

        single, pair = shape(post["single"]), shape(post["pair"])
        if len(single) == 3 and single[1] == ("$A", 0):
            cls, sep = single[0][0], single[2][0]
            want_single = [(cls, 0), ("$A", 0), (sep, 0)]
            want_pair = [*want_single, ("$B", 1), (sep, 1)]
            if single == want_single and pair == want_pair:
                return {"cls_token": cls, "sep_token": sep}
    raise LmarchError(f"unsupported post_processor {json.dumps(post)[:120]} (BERT's template only)")
