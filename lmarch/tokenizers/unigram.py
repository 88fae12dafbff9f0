r"""The Unigram tokenizer (Kudo 2018, "Subword Regularization"), as SentencePiece applies it.

A Unigram model gives each piece :math:`x` of its vocabulary a log-probability
:math:`\log p(x)` and segments a text :math:`X` into the pieces of highest total score,

.. math:: x^* = \arg\max_{x \in S(X)} \sum_i \log p(x_i),

over every segmentation :math:`S(X)` the vocabulary allows. :meth:`UnigramTokenizer.encode`
finds it with the Viterbi algorithm over the lattice of pieces matching at each position of the
normalised text (:mod:`~lmarch.tokenizers.unigram_normalize`: ``▁`` marks a space), exactly as
sentencepiece 0.2's ``unigram::Model::EncodeOptimized`` does, down to its float32 sums and its
tie-breaking (the first candidate found keeps a tie). Where no piece covers a character, the
unknown piece stands for it with the score ``min score - 10``; consecutive unknowns become one
unknown id, or, with byte fallback, each is spelled as its UTF-8 bytes ``<0xNN>``.
User-defined symbols always win where they occur (score ``len * max(FLT_MIN, max score) - 0.1``);
control symbols (``<s>``, ``[CLS]`` ...) are never matched in text. Training (the EM algorithm
with pruning) lives in :mod:`~lmarch.tokenizers.unigram_train`.
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_tokenizer_file, write_json_file
from lmarch.tokenizers.encoder_input import EncoderInputMixin
from lmarch.tokenizers.sentencepiece_model import (
    BYTE,
    CONTROL,
    NORMAL,
    PIECE_TYPES,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    CharsMap,
    read_sentencepiece_model,
    utf8_char_length,
)
from lmarch.tokenizers.unigram_normalize import SPACE_SYMBOL, SentencePieceNormalizer

FLT_MIN = 1.1754943508222875e-38  # the smallest normal float32, sentencepiece's start for max score
UNK_PENALTY = 10.0
_ROLE_DEFAULTS = {
    "unk": ("<unk>",),
    "pad": ("<pad>", "[PAD]"),
    "bos": ("<s>",),
    "eos": ("</s>",),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}
_CACHE_LIMIT = 100_000
_CACHE_TEXT = 512  # texts up to this many characters are remembered


def _float32(x: float) -> float:
    return array("f", [x])[0]


def _byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


class UnigramTokenizer(EncoderInputMixin):
    """A SentencePiece Unigram model: Viterbi encoding, decoding, files (module docstring).

    Args:
        pieces: ``(piece, score, type)`` in id order; ``type`` a name of
            :data:`~lmarch.tokenizers.sentencepiece_model.PIECE_TYPES` or its number. Exactly
            one piece is ``unknown``.
        byte_fallback: spell uncovered characters as ``<0xNN>`` pieces (all 256 must exist).
        normalization: ``"charsmap"`` (sentencepiece's precompiled rules in ``charsmap``),
            ``"nfkc"`` (:func:`~lmarch.tokenizers.unigram_normalize.nfkc_rule`) or
            ``"identity"``.
        add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces,
            treat_whitespace_as_suffix: sentencepiece's whitespace settings.
        unk_surface: what :meth:`decode` writes for an unknown id.
        roles: token text for ``pad``, ``cls``, ``sep``, ``mask``, ``bos``, ``eos`` (``unk`` is
            the unknown piece); a role left out takes the first of its usual names present.
    """

    def __init__(
        self,
        pieces: Sequence[tuple[str, float, int | str]],
        *,
        byte_fallback: bool = False,
        normalization: str = "nfkc",
        charsmap: bytes | None = None,
        add_dummy_prefix: bool = True,
        remove_extra_whitespaces: bool = True,
        escape_whitespaces: bool = True,
        treat_whitespace_as_suffix: bool = False,
        unk_surface: str = " \u2047 ",
        roles: dict[str, str] | None = None,
    ) -> None:
        self._pieces: list[str] = []
        self._scores: list[float] = []
        self._types: list[int] = []
        for i, entry in enumerate(pieces):
            try:
                piece, score, kind = entry
                kind = PIECE_TYPES[kind] if isinstance(kind, str) else int(kind)
                score = _float32(float(score))
            except (TypeError, ValueError, KeyError):
                raise LmarchError(f"piece {i} is not (text, score, type): {entry!r}") from None
            if not isinstance(piece, str) or not piece or kind not in PIECE_TYPES.values():
                raise LmarchError(f"piece {i} is not (text, score, type): {entry!r}")
            self._pieces.append(piece)
            self._scores.append(score)
            self._types.append(kind)
        unknown = [i for i, t in enumerate(self._types) if t == UNKNOWN]
        if len(unknown) != 1:
            raise LmarchError(f"a Unigram model needs exactly one unknown piece, found {unknown}")
        self.unk_id: int = unknown[0]
        self._ids: dict[str, int] = {}
        for i, piece in enumerate(self._pieces):
            if piece in self._ids:
                raise LmarchError(f"piece {piece!r} appears twice (ids {self._ids[piece]}, {i})")
            self._ids[piece] = i
        self.byte_fallback = bool(byte_fallback)
        self._byte_ids: list[int] = []
        if self.byte_fallback:
            missing = [b for b in range(256) if self._ids.get(_byte_piece(b)) is None]
            if missing:
                raise LmarchError(f"byte fallback needs <0x{missing[0]:02X}> in the vocabulary")
            self._byte_ids = [self._ids[_byte_piece(b)] for b in range(256)]
        elif BYTE in self._types:
            raise LmarchError("byte pieces are found although byte_fallback is off")
        self._byte_value = {i: b for b, i in enumerate(self._byte_ids)}
        self.normalization = normalization
        self.charsmap_bytes = bytes(charsmap or b"")
        if normalization == "charsmap" and not self.charsmap_bytes:
            normalization = "identity"  # sentencepiece's empty table changes nothing
        try:
            table = CharsMap(self.charsmap_bytes) if normalization == "charsmap" else None
            users = [p for p, t in zip(self._pieces, self._types, strict=True) if t == USER_DEFINED]
            self.normalizer = SentencePieceNormalizer(
                table,
                normalization,
                users,
                add_dummy_prefix=add_dummy_prefix,
                remove_extra_whitespaces=remove_extra_whitespaces,
                escape_whitespaces=escape_whitespaces,
                treat_whitespace_as_suffix=treat_whitespace_as_suffix,
            )
        except ValueError as exc:
            raise LmarchError(f"bad normalisation settings: {exc}") from None
        self.unk_surface = unk_surface
        self._build_lattice_trie()
        self._set_roles(roles or {})
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ setup

    def _build_lattice_trie(self) -> None:
        """A byte trie of the pieces the lattice may use (normal, user-defined; unused ones
        are walked through but never taken), with each piece's score as the lattice sees it."""
        normal = [s for s, t in zip(self._scores, self._types, strict=True) if t == NORMAL]
        self.min_score = min(normal, default=0.0)
        self.max_score = max([FLT_MIN, *normal])
        self._unk_score = _float32(self.min_score - UNK_PENALTY)
        root: dict[int, Any] = {}
        for i, (piece, kind) in enumerate(zip(self._pieces, self._types, strict=True)):
            if kind not in (NORMAL, USER_DEFINED, UNUSED):
                continue
            node = root
            encoded = piece.encode()
            for byte in encoded:
                node = node.setdefault(byte, {})
            if kind == USER_DEFINED:  # float32 product, then a double subtraction
                node[-1] = (i, _float32(len(encoded) * self.max_score) - 0.1)
            elif kind == NORMAL:
                node[-1] = (i, self._scores[i])
        self._trie = root

    def _set_roles(self, roles: dict[str, str]) -> None:
        names = {"unk": self._pieces[self.unk_id]}
        for role, defaults in _ROLE_DEFAULTS.items():
            if role == "unk":
                continue
            given = roles.get(role)
            if given is not None:
                if given not in self._ids:
                    raise LmarchError(f"the {role} token {given!r} is not in the vocabulary")
                names[role] = given
            else:
                found = [n for n in defaults if n in self._ids]
                if found:
                    names[role] = found[0]
        self._roles = names
        ids = {role: self._ids[name] for role, name in names.items()}
        self.pad_id: int | None = ids.get("pad")
        self.cls_id: int | None = ids.get("cls")
        self.sep_id: int | None = ids.get("sep")
        self.mask_id: int | None = ids.get("mask")
        self.bos_id: int | None = ids.get("bos")
        self.eos_id: int | None = ids.get("eos")
        self.special_ids: set[int] = {
            i for i, t in enumerate(self._types) if t in (CONTROL, UNKNOWN)
        } | set(ids.values())

    # ------------------------------------------------------------------ encoding

    def _viterbi(self, data: bytes) -> list[tuple[int, int, int]]:
        """The best path over ``data`` as ``(start, end, id)`` spans (id ``unk_id`` for a
        character no piece covers)."""
        size = len(data)
        best = array("f", bytes(4 * (size + 1)))  # float32 sums, as sentencepiece keeps them
        starts = [-1] * (size + 1)
        ids = [-1] * (size + 1)
        trie, unk_id, unk_score = self._trie, self.unk_id, self._unk_score
        rounded = array("f", [0.0])
        start = 0
        while start < size:
            here = best[start]
            lead = data[start]
            mblen = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            mblen = min(mblen, size - start)
            single = False
            node = trie
            pos = start
            while pos < size:
                node = node.get(data[pos])
                if node is None:
                    break
                pos += 1
                hit = node.get(-1)
                if hit is not None:
                    idx, score = hit
                    candidate = score + here  # a double, compared with the stored float32
                    if starts[pos] == -1 or candidate > best[pos]:
                        best[pos] = candidate
                        starts[pos] = start
                        ids[pos] = idx
                    if pos - start == mblen:
                        single = True
            if not single:
                end = start + mblen
                rounded[0] = unk_score + here  # float32 + float32 in float32
                candidate = rounded[0]
                if starts[end] == -1 or candidate > best[end]:
                    best[end] = candidate
                    starts[end] = start
                    ids[end] = unk_id
            start += mblen
        path = []
        end = size
        while end > 0:
            path.append((starts[end], end, ids[end]))
            end = starts[end]
        path.reverse()
        return path

    def encode_pieces_bytes(self, text: str) -> list[tuple[bytes, int]]:
        """``(normalised bytes, id)`` of each token of ``text`` (before byte fallback, with runs
        of unknowns merged)."""
        data = self.normalizer.normalize(text)
        out: list[tuple[bytes, int]] = []
        unk = self.unk_id
        for start, end, idx in self._viterbi(data):
            if idx == unk and out and out[-1][1] == unk and not self.byte_fallback:
                out[-1] = (out[-1][0] + data[start:end], unk)
            else:
                out.append((data[start:end], idx))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS or CLS/SEP added), as sentencepiece gives them."""
        cached = self._cache.get(text)
        if cached is not None:
            return list(cached)
        ids: list[int] = []
        unk = self.unk_id
        for piece, idx in self.encode_pieces_bytes(text):
            if idx == unk and self.byte_fallback:
                ids.extend(self._byte_ids[b] for b in piece)
            else:
                ids.append(idx)
        if len(text) <= _CACHE_TEXT:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[text] = ids
            return list(ids)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The piece strings of :meth:`encode`."""
        return [self._pieces[i] for i in self.encode(text)]

    def word_ids(self, text: str) -> list[int]:
        """For each id of ``encode(text)``, the index of the word it belongs to (for whole-word
        masking): a piece starting with ``▁`` begins a new word (ending with it, under
        ``treat_whitespace_as_suffix``, closes one); every other piece, byte pieces included,
        continues the current word."""
        suffix = self.normalizer.treat_whitespace_as_suffix
        out: list[int] = []
        word = -1
        close = True
        for i in self.encode(text):
            piece = self._pieces[i]
            normal = self._types[i] in (NORMAL, USER_DEFINED)
            if suffix:
                if close:
                    word += 1
                close = normal and piece.endswith(SPACE_SYMBOL)
            elif word < 0 or (normal and piece.startswith(SPACE_SYMBOL)):
                word += 1
            out.append(word)
        return out

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``, as sentencepiece's ``DecodeIds``: ``▁`` back to spaces, control
        pieces dropped, an unknown id written as ``unk_surface``, runs of byte pieces joined as
        UTF-8 (a malformed byte becomes U+FFFD). While nothing has been written yet, a leading
        ``▁`` (the dummy prefix) is dropped from the next piece, and with
        ``remove_extra_whitespaces`` that goes on for as long as the output stays empty. With
        ``skip_special_tokens=False`` control pieces are written out as their text."""
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        size = len(self._pieces)
        bad = [i for i in ids if not (type(i) is int and 0 <= i < size)]
        if bad:
            raise LmarchError(f"token id {bad[0]!r} is not in 0..{size - 1}")
        norm = self.normalizer
        strips = norm.add_dummy_prefix or norm.remove_extra_whitespaces
        out: list[str] = []
        pending = bytearray()
        at_start, stripped = True, False
        for i in ids:
            kind = self._types[i]
            if kind == BYTE:
                pending.append(self._byte_value[i])
                continue
            if pending:  # bytes are written as they are, without the space rule
                out.append(_decode_bytes(bytes(pending)))
                pending.clear()
            if stripped or (out and out[-1]):
                at_start = False
            stripped = False
            piece = self._pieces[i]
            if kind == CONTROL:
                if not skip_special_tokens:
                    out.append(piece)
            elif kind == UNKNOWN:
                out.append(self.unk_surface)
            else:
                if at_start and strips and piece.startswith(SPACE_SYMBOL):
                    piece = piece[1:]
                    stripped = not norm.remove_extra_whitespaces
                out.append(piece.replace(SPACE_SYMBOL, " "))
        if pending:
            out.append(_decode_bytes(bytes(pending)))
        return "".join(out)

    # ------------------------------------------------------------------ lookups

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special ones included."""
        return len(self._pieces)

    @property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        return dict(self._ids)

    @property
    def pieces(self) -> list[tuple[str, float, str]]:
        """``(piece, score, type name)`` in id order."""
        names = {v: k for k, v in PIECE_TYPES.items()}
        return [
            (p, s, names[t])
            for p, s, t in zip(self._pieces, self._scores, self._types, strict=True)
        ]

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None if it is not a piece."""
        return self._ids.get(token)

    def id_to_token(self, idx: int) -> str | None:
        """Piece for ``idx``, or None if out of range."""
        return self._pieces[idx] if 0 <= idx < len(self._pieces) else None

    # ------------------------------------------------------------------ files

    def _settings(self) -> dict[str, Any]:
        norm = self.normalizer
        return {
            "byte_fallback": self.byte_fallback,
            "normalization": self.normalization,
            "charsmap": base64.b64encode(self.charsmap_bytes).decode("ascii"),
            "add_dummy_prefix": norm.add_dummy_prefix,
            "remove_extra_whitespaces": norm.remove_extra_whitespaces,
            "escape_whitespaces": norm.escape_whitespaces,
            "treat_whitespace_as_suffix": norm.treat_whitespace_as_suffix,
            "unk_surface": self.unk_surface,
            "roles": {k: v for k, v in self._roles.items() if k != "unk"},
        }

    def save(self, path: str | Path) -> None:
        """Write one JSON file: ``{"type": "unigram", "pieces": [[piece, score, type] ...],
        ...settings}``; scores are float32 values, so they read back exactly."""
        data = {"type": "unigram", "pieces": [list(p) for p in self.pieces], **self._settings()}
        write_json_file(path, data, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> UnigramTokenizer:
        """Read a file written by :meth:`save`; a malformed one raises :class:`LmarchError`."""
        path = Path(path)
        data = read_tokenizer_file(path, "unigram", "Unigram tokenizer")
        types = {
            "byte_fallback": bool, "normalization": str, "charsmap": str,
            "add_dummy_prefix": bool, "remove_extra_whitespaces": bool,
            "escape_whitespaces": bool, "treat_whitespace_as_suffix": bool,
            "unk_surface": str, "roles": dict,
        }  # fmt: skip
        options: dict[str, Any] = {}
        for key, kind in types.items():
            if key in data:
                if not isinstance(data[key], kind):
                    raise LmarchError(f'{path}: "{key}" has the wrong type: {data[key]!r}')
                options[key] = data[key]
        pieces = data.get("pieces")
        if not isinstance(pieces, list):
            raise LmarchError(f'{path}: "pieces" must be a list of [piece, score, type]')
        try:
            options["charsmap"] = base64.b64decode(options.get("charsmap", ""), validate=True)
            return cls(pieces, **options)
        except (LmarchError, ValueError) as exc:
            raise LmarchError(f"bad Unigram tokenizer file {path}: {exc}") from None

    @classmethod
    def from_sentencepiece(
        cls, path: str | Path, roles: dict[str, str] | None = None
    ) -> UnigramTokenizer:
        """The tokenizer of a sentencepiece ``.model`` file (a ``ModelProto``); a file that is
        not a sentencepiece Unigram model raises one :class:`LmarchError`."""
        model = read_sentencepiece_model(path)
        try:
            return cls(
                model.pieces,
                byte_fallback=model.byte_fallback,
                normalization="charsmap",
                charsmap=model.precompiled_charsmap,
                add_dummy_prefix=model.add_dummy_prefix,
                remove_extra_whitespaces=model.remove_extra_whitespaces,
                escape_whitespaces=model.escape_whitespaces,
                treat_whitespace_as_suffix=model.treat_whitespace_as_suffix,
                unk_surface=model.unk_surface,
                roles=roles,
            )
        except LmarchError as exc:
            raise LmarchError(f"{path} is not a usable sentencepiece model: {exc}") from None

    @classmethod
    def train(cls, text: str, vocab_size: int, **options: Any) -> UnigramTokenizer:
        """Train a vocabulary on ``text``: see :func:`lmarch.tokenizers.unigram_train.train_unigram`."""
        from lmarch.tokenizers.unigram_train import train_unigram

        return train_unigram(text, vocab_size, **options)


def _decode_bytes(data: bytes) -> str:
    """UTF-8 with each malformed byte read as U+FFFD, as sentencepiece decodes byte pieces."""
    out, pos = [], 0
    while pos < len(data):
        length = utf8_char_length(data, pos)
        if length:
            out.append(data[pos : pos + length].decode("utf-8"))
            pos += length
        else:
            out.append("\ufffd")
            pos += 1
    return "".join(out)


__all__ = ["UnigramTokenizer"]
