"""Unigram tokenizers from Hugging Face files: a ``tokenizer.json`` of model type ``Unigram``, or
the ``spiece.model`` that ALBERT and T5 folders ship.

A Unigram ``tokenizer.json`` converted from a sentencepiece model (T5's, for one) spells the same
pipeline in the ``tokenizers`` library's terms: a ``Precompiled`` normaliser holding the charsmap
(sometimes followed by ``Replace(" {2,}", " ")``), a ``Metaspace`` pre-tokenizer (after a
``WhitespaceSplit`` or not) whose ``prepend_scheme`` is the dummy prefix, and the pieces with their
scores. That file is read here back into sentencepiece's settings, so it encodes as the
sentencepiece model does. A pipeline with other steps (ALBERT's lower-casing and accent
stripping as separate normalisers, say) is refused by name; :mod:`lmarch.tokenizers.hf_json`
then hands the file to the ``tokenizers`` library instead.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_json_file
from lmarch.tokenizers.unigram import UnigramTokenizer

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_ROLES = ("pad", "cls", "sep", "mask", "bos", "eos")


def _normalizer_settings(spec: Any, where: Path) -> dict[str, Any]:
    """The charsmap and ``remove_extra_whitespaces`` a ``tokenizers`` normaliser stands for."""
    steps = (
        []
        if spec is None
        else spec.get("normalizers", [])
        if spec.get("type") == "Sequence"
        else [spec]
    )
    out: dict[str, Any] = {"normalization": "identity", "charsmap": b""}
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Precompiled" and out["normalization"] == "identity":
            blob = step.get("precompiled_charsmap") or ""
            try:
                raw = bytes(blob) if isinstance(blob, list) else base64.b64decode(blob)
            except (ValueError, TypeError) as exc:
                raise LmarchError(f"{where}: unreadable precompiled_charsmap ({exc})") from None
            out.update(normalization="charsmap", charsmap=raw)
        elif (
            kind == "Replace"
            and step.get("pattern") == {"Regex": " {2,}"}
            and step.get("content") in (" ", "\u2581")
        ):
            out["remove_extra_whitespaces"] = True
        else:
            raise LmarchError(
                f"{where}: the normaliser step {json.dumps(step)[:80]} is not one lmarch's "
                "Unigram tokenizer reproduces"
            )
    return out


def _pre_tokenizer_settings(spec: Any, where: Path) -> dict[str, Any]:
    """Dummy prefix and whitespace settings of a ``Metaspace`` (after ``WhitespaceSplit``)."""
    if not isinstance(spec, dict):
        raise LmarchError(f"{where}: a Unigram tokenizer.json without a Metaspace pre-tokenizer")
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds not in (["Metaspace"], ["WhitespaceSplit", "Metaspace"]):
        raise LmarchError(f"{where}: pre-tokenizer {kinds} is not read (Metaspace expected)")
    meta = steps[-1]
    if meta.get("replacement", "\u2581") != "\u2581":
        raise LmarchError(f"{where}: Metaspace replacement {meta.get('replacement')!r} is not ▁")
    scheme = meta.get("prepend_scheme")
    if scheme is None:  # files written before prepend_scheme existed
        scheme = "always" if meta.get("add_prefix_space", True) else "never"
    if scheme not in ("always", "first", "never"):
        raise LmarchError(f"{where}: unknown Metaspace prepend_scheme {scheme!r}")
    return {
        "add_dummy_prefix": scheme != "never",
        "remove_extra_whitespaces": kinds[0] == "WhitespaceSplit",
    }


def unigram_from_tokenizer_json(
    path: str | Path, roles: dict[str, str] | None = None
) -> UnigramTokenizer:
    """Our tokenizer for a ``tokenizer.json`` whose model is ``Unigram`` (module docstring).

    Added tokens marked special become control pieces (never matched in text, dropped by
    ``decode``), other added tokens user-defined ones; ``<0xNN>`` pieces are the byte pieces
    when the model has ``byte_fallback``. An unsupported pipeline raises :class:`LmarchError`.
    """
    path = Path(path)
    data = read_json_file(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "Unigram":
        raise LmarchError(f"{path}: not a Unigram tokenizer.json")
    vocab, unk_id = model.get("vocab"), model.get("unk_id")
    if not isinstance(vocab, list) or type(unk_id) is not int or not 0 <= unk_id < len(vocab):
        raise LmarchError(f"{path}: a Unigram model needs a vocab list and an unk_id in it")
    byte_fallback = bool(model.get("byte_fallback", False))
    added = {t.get("id"): t for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    pieces = []
    for i, entry in enumerate(vocab):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise LmarchError(f"{path}: vocab entry {i} is not [piece, score]")
        piece, score = entry
        if i == unk_id:
            kind = "unknown"
        elif byte_fallback and _BYTE_PIECE.fullmatch(piece):
            kind = "byte"
        elif i in added:
            kind = "control" if added[i].get("special") else "user_defined"
        else:
            kind = "normal"
        pieces.append((piece, score, kind))
    settings = _pre_tokenizer_settings(data.get("pre_tokenizer"), path)
    norm = _normalizer_settings(data.get("normalizer"), path)
    if norm.pop("remove_extra_whitespaces", False):
        settings["remove_extra_whitespaces"] = True
    try:
        return UnigramTokenizer(
            pieces, byte_fallback=byte_fallback, roles=roles, **settings, **norm
        )
    except LmarchError as exc:
        raise LmarchError(f"{path}: {exc}") from None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    config = read_json_file(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise LmarchError(f"{path}: expected a JSON object")
    return config


def _config_roles(config: dict[str, Any]) -> dict[str, str]:
    """Role tokens ``tokenizer_config.json`` names (``cls_token`` ...)."""
    roles = {}
    for role in _ROLES:
        value = config.get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            roles[role] = value
    return roles


def unigram_tokenizer_from_hf_folder(folder: str | Path) -> UnigramTokenizer:
    """The Unigram tokenizer of a Hugging Face folder (T5, mT5, ALBERT ...): ``tokenizer.json``
    when it holds a Unigram model lmarch reads, else ``spiece.model``; roles from
    ``tokenizer_config.json`` (those naming tokens outside the vocabulary are left out)."""
    folder = Path(folder)
    config = _read_config(folder)
    roles = _config_roles(config)
    if (folder / "tokenizer.json").is_file():
        tok = unigram_from_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "spiece.model").is_file():
        if config.get("do_lower_case") or config.get("keep_accents") is False:
            # ALBERT's tokenizer lower-cases and strips accents before sentencepiece runs
            raise LmarchError(
                f"{folder}: tokenizer_config.json asks to lower-case or strip accents before "
                "sentencepiece, which lmarch does not do for a bare spiece.model",
                hint="save the tokenizer with its tokenizer.json (save_pretrained) beside it",
            )
        tok = UnigramTokenizer.from_sentencepiece(folder / "spiece.model")
    else:
        raise LmarchError(f"no tokenizer.json or spiece.model in {folder}")
    roles = {r: t for r, t in roles.items() if tok.token_to_id(t) is not None}
    if roles:
        tok._set_roles(roles)
    return tok


__all__ = ["unigram_from_tokenizer_json", "unigram_tokenizer_from_hf_folder"]
