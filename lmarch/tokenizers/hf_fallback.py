"""A fallback: the ``tokenizers`` library's own implementation behind lmarch's tokenizer interface.

lmarch writes its tokenizers out (byte-level BPE, WordPiece) so that they can be read and
checked. For a ``tokenizer.json`` that none of them reads exactly — ALBERT's SentencePiece-style
Unigram model with its normaliser, Metaspace pre-tokenizer and ``[CLS] $A [SEP]`` template is the
case this exists for — :class:`HFTokenizersFallback` hands the file to
``tokenizers.Tokenizer`` and only adapts the calls. Nothing here tokenizes by itself: the ids are
the library's, special tokens included, and so is the truncation of pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_tokenizer_file, write_json_file
from lmarch.tokenizers.encoder_input import EncoderInputMixin

ROLES = ("cls", "sep", "pad", "mask", "unk")
# Names tried, in order, for a role that tokenizer_config.json does not name (BERT's, then fairseq's)
_ROLE_DEFAULTS = {
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "pad": ("[PAD]", "<pad>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>"),
}


class HFTokenizersFallback(EncoderInputMixin):
    """A ``tokenizers.Tokenizer`` (the Hugging Face library's implementation, not lmarch's) with
    lmarch's tokenizer interface and the encoder input API.

    Used only where lmarch has no written-out reader for a ``tokenizer.json`` (the Unigram model
    of ALBERT, for one). :meth:`encode` returns the ids without special tokens;
    :meth:`encode_pair` lets the library's post-processor add them, and ``encode_batch`` (from
    :class:`~lmarch.tokenizers.encoder_input.EncoderInputMixin`) pads its rows.

    Args:
        tokenizer: the library's tokenizer; its own truncation and padding settings are turned
            off (pass ``max_length`` to :meth:`encode_pair` instead).
        roles: token text for ``"cls"``, ``"sep"``, ``"pad"``, ``"mask"``, ``"unk"`` (any may be
            missing); a role's id is ``None`` where its token is not in the vocabulary.
    """

    def __init__(self, tokenizer: Any, roles: dict[str, str] | None = None) -> None:
        self._hf = tokenizer
        self._hf.no_truncation()
        self._hf.no_padding()
        roles = dict(roles or {})
        for role, names in _ROLE_DEFAULTS.items():
            if role not in roles:
                found = [n for n in names if tokenizer.token_to_id(n) is not None]
                if found:
                    roles[role] = found[0]
        self._roles = {r: t for r, t in roles.items() if r in ROLES and isinstance(t, str)}
        ids = {r: tokenizer.token_to_id(t) for r, t in self._roles.items()}
        self.cls_id: int | None = ids.get("cls")
        self.sep_id: int | None = ids.get("sep")
        self.pad_id: int | None = ids.get("pad")
        self.mask_id: int | None = ids.get("mask")
        self.unk_id: int | None = ids.get("unk")

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> HFTokenizersFallback:
        """``folder/tokenizer.json``, with the role tokens ``tokenizer_config.json`` names."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        config_path = folder / "tokenizer_config.json"
        config: Any = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise LmarchError(f"cannot read {config_path}: {exc}") from exc
        if not isinstance(config, dict):
            raise LmarchError(f"{config_path}: expected a JSON object")
        roles = {}
        for role in ROLES:
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                roles[role] = value
        return cls(_library_tokenizer(path=path), roles)

    # ------------------------------------------------------------------ the Tokenizer protocol

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self._hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the template's special tokens."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``, by the library's decoder."""
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        size = self.vocab_size
        bad = [i for i in ids if not (type(i) is int and 0 <= i < size)]
        if bad:
            raise LmarchError(f"token id {bad[0]!r} is not in 0..{size - 1}")
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Write one JSON file: ``{"type": "hf_tokenizers", "roles": ..., "tokenizer": ...}``
        with the library's own ``tokenizer.json`` content inside."""
        path = Path(path)
        data = {
            "type": "hf_tokenizers",
            "roles": self._roles,
            "tokenizer": json.loads(self._hf.to_str()),
        }
        write_json_file(path, data)

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizersFallback:
        """Read a file written by :meth:`save`; a malformed file raises :class:`LmarchError`."""
        path = Path(path)
        data = read_tokenizer_file(path, "hf_tokenizers", "fallback tokenizer")
        roles = data.get("roles") or {}
        if not isinstance(roles, dict) or not isinstance(data.get("tokenizer"), dict):
            raise LmarchError(f'{path}: "roles" and "tokenizer" must be JSON objects')
        return cls(_library_tokenizer(text=json.dumps(data["tokenizer"]), where=path), roles)

    # ------------------------------------------------------------------ encoder input

    def encode_pair(
        self, text: str, pair: str | None = None, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """``(input ids, token type ids)`` of one segment or a pair with the template's special
        tokens; with ``max_length`` (special tokens counted) cut longest first by the library."""
        if max_length is None:
            encoding = self._hf.encode(text, pair)
        else:
            if max_length < self._hf.num_special_tokens_to_add(pair is not None):
                raise LmarchError(f"max_length {max_length} leaves no room besides the specials")
            self._hf.enable_truncation(max_length, strategy="longest_first")
            try:
                encoding = self._hf.encode(text, pair)
            finally:
                self._hf.no_truncation()
        return list(encoding.ids), list(encoding.type_ids)

    # ------------------------------------------------------------------ lookups

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None if it is not in the vocabulary."""
        return self._hf.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        """Token string for ``idx``, or None if out of range."""
        return self._hf.id_to_token(idx)

    def to_hf_tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._hf


def _library_tokenizer(
    path: Path | None = None, text: str | None = None, where: Path | None = None
) -> Any:
    """A ``tokenizers.Tokenizer`` from a file or a JSON string, errors as one LmarchError."""
    from tokenizers import Tokenizer

    where = where or path
    try:
        if path is not None:
            if not path.is_file():
                raise LmarchError(f"no tokenizer.json at {path}")
            return Tokenizer.from_file(str(path))
        return Tokenizer.from_str(text or "")
    except LmarchError:
        raise
    except Exception as exc:  # the library raises its own exception type for a bad file
        raise LmarchError(f"the tokenizers library cannot read {where}: {exc}") from exc


__all__ = ["HFTokenizersFallback"]
