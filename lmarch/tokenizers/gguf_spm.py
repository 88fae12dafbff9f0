r"""SentencePiece BPE vocabularies from GGUF metadata (``tokenizer.ggml.model == "llama"``), as
Gemma's files carry them, rebuilt the way ``transformers`` rebuilds them.

SentencePiece's BPE (Sennrich et al. 2016, as Kudo & Richardson 2018 implement it) keeps no
merge list: starting from single characters, it repeatedly joins the adjacent pair whose joined
piece ranks best, until no joined pair is in the vocabulary,

.. math:: (a, b)^* = \arg\min_{(a, b):\ ab \in V} \operatorname{rank}(ab),

and spells a character the vocabulary lacks as its UTF-8 bytes ``<0xNN>`` (byte fallback).
Text is normalised first by writing each space as ``▁``; Gemma adds no dummy prefix.

A GGUF stores the pieces, a score per piece and a llama.cpp type per piece, but for Gemma the
scores do not follow the order in which the pieces were learned: the *position* in the list
does. ``transformers`` (5.x, ``integrations/gguf``) therefore ranks a joined piece by its id and,
for two ways of making the same piece, prefers the longer left part; :meth:`encode` does the same
and gives its ids. Pieces of spaces only are stored as real spaces (``"  "``) and looked up as
``"▁▁"``, so they are respelled on load. Control pieces (type 3: ``<bos>``,
``<start_of_turn>``) and user-defined ones (type 4: runs of ``\n``) are matched whole in the
text first, the longest at the leftmost place; only control pieces are dropped by
``decode(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_tokenizer_file, write_json_file

SPACE = "\u2581"
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# Gemma's turn layout, for files that carry no chat template (the base 270M's GGUF has none):
# "<start_of_turn>user\n{text}<end_of_turn>\n" per turn, the assistant's role named "model", a
# system message written at the top of the first user turn. BOS is added by the caller.
GEMMA_TURN_TEMPLATE = (
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages and "
    "messages[0]['role'] == 'system' else '' -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) "
    "+ '\\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)


def _respell(token: str) -> str:
    """A piece of spaces only, stored with real spaces, as the ``▁`` run it is looked up as."""
    return SPACE * len(token) if token and not token.strip(" ") and " " in token else token


class SentencePieceBPETokenizer:
    """SentencePiece BPE with byte fallback over a vocabulary in id order (module docstring).

    Args:
        tokens: every piece, its position its id (spaces as stored in a GGUF).
        types: llama.cpp's type per piece (1 normal, 2 unknown, 3 control, 4 user-defined,
            5 unused, 6 byte).
        unk_token_id, bos_token_id, eos_token_id, pad_token_id: the roles.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        types: Sequence[int],
        *,
        unk_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        if len(tokens) != len(types):
            raise LmarchError(f"{len(types)} token types for {len(tokens)} tokens")
        # (a vocabulary holds ~10^5 pieces, Gemma's 262,144: the tables are built with C-level
        # maps over the whole list, Python loops only over the few pieces that need them)
        self._tokens = list(tokens)
        exact_ints = set(map(type, types)) <= {int}
        self._types = list(types) if exact_ints else [int(t) for t in types]
        self._pieces = list(self._tokens)
        longest = max(map(len, self._tokens), default=0)
        runs = {" " * n for n in range(1, longest + 1)}  # the pieces _respell changes
        for i in itertools.compress(range(len(self._tokens)), map(runs.__contains__, self._tokens)):
            self._pieces[i] = _respell(self._tokens[i])
        # a piece written twice keeps its last id, as a dict built in id order does
        self._vocab = dict(zip(self._pieces, range(len(self._pieces))))
        self._bytes = [self._vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self.unk_token_id, self.bos_token_id = unk_token_id, bos_token_id
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        ids = range(len(self._types))
        self._special = set(itertools.compress(ids, map(_CONTROL.__eq__, self._types)))
        odd = itertools.compress(ids, map((_CONTROL, _USER_DEFINED).__contains__, self._types))
        whole = {
            self._tokens[i]: i
            for i in odd
            if self._types[i] == _CONTROL or self._tokens[i] in self._vocab
        }
        self._whole = whole
        self._whole_lengths = sorted({len(t) for t in whole}, reverse=True)
        starts = "".join(sorted({t[0] for t in whole if t}))
        self._whole_start = re.compile(f"[{re.escape(starts)}]") if starts else None

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self._tokens)

    @property
    def pad_id(self) -> int | None:
        """The padding id, if the vocabulary has one."""
        return self.pad_token_id

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece as stored (``"  "``) or as looked up (``"▁▁"``)."""
        return self._whole.get(token, self._vocab.get(_respell(token)))

    def id_to_token(self, idx: int) -> str | None:
        """The piece of an id as the file stores it."""
        return self._tokens[idx] if 0 <= idx < len(self._tokens) else None

    def _split_whole(self, text: str) -> list[tuple[str, int | None]]:
        """Text cut around control / user-defined pieces: (piece, id) for those, (text, None)
        between them; at each place the longest piece that matches wins."""
        if self._whole_start is None:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        pos = done = 0
        while (m := self._whole_start.search(text, pos)) is not None:
            i = m.start()
            hit = next(
                (text[i : i + n] for n in self._whole_lengths if text[i : i + n] in self._whole),
                None,
            )
            if hit is None:
                pos = i + 1
                continue
            if i > done:
                out.append((text[done:i], None))
            out.append((hit, self._whole[hit]))
            pos = done = i + len(hit)
        if done < len(text):
            out.append((text[done:], None))
        return out

    def _symbols(self, text: str) -> list[str]:
        """Characters, each one the vocabulary lacks spelled as its bytes (or ``<unk>``)."""
        symbols: list[str] = []
        for ch in text:
            if ch in self._vocab:
                symbols.append(ch)
                continue
            ids = [self._bytes[b] for b in ch.encode("utf-8")]
            if all(i is not None for i in ids):
                symbols.extend(self._pieces[i] for i in ids)  # type: ignore[index]
            elif self.unk_token_id is None:
                raise LmarchError(f"character {ch!r} has no piece and the vocabulary no <unk>")
            elif not symbols or symbols[-1] is not None:
                symbols.append(None)  # type: ignore[arg-type]  # consecutive unknowns fuse
        return symbols

    def _bpe(self, symbols: list[str]) -> list[int]:
        """Join adjacent pairs best rank first (leftmost on a tie) until none joins."""
        vocab, n = self._vocab, len(symbols)
        nxt, prev = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap: list[tuple[int, int, int, str, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            left, right = symbols[i], symbols[j] if j != -1 else None
            if left is None or right is None:
                return
            rank = vocab.get(left + right)
            if rank is not None:
                heapq.heappush(heap, (rank, -len(left), i, left, right))

        for i in range(n - 1):
            push(i)
        while heap:
            _, _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if j == -1 or symbols[i] != left or symbols[j] != right:
                continue  # a stale pair: one side was joined to something else meanwhile
            symbols[i], symbols[j] = left + right, ""
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            if prev[i] != -1:
                push(prev[i])
            push(i)
        ids: list[int] = []
        i = 0
        while i != -1:
            s = symbols[i]
            ids.append(self.unk_token_id if s is None else vocab[s])  # type: ignore[arg-type]
            i = nxt[i]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS: the caller adds it where the model wants one)."""
        ids: list[int] = []
        for piece, idx in self._split_whole(text):
            if idx is not None:
                ids.append(idx)
            elif piece:
                ids.extend(self._bpe(self._symbols(piece.replace(" ", SPACE))))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: ``▁`` back to spaces, runs of byte pieces back to UTF-8 (a byte
        that makes no character becomes U+FFFD), control pieces dropped unless asked for."""
        out: list[str] = []
        pending = bytearray()
        for idx in ids:
            idx = int(idx)
            if not 0 <= idx < len(self._tokens):
                raise LmarchError(f"token id {idx} is outside the vocabulary of {self.vocab_size}")
            if skip_special_tokens and idx in self._special:
                continue
            piece = self._pieces[idx]
            m = _BYTE_PIECE.fullmatch(piece) if self._types[idx] == _BYTE else None
            if m is not None:
                pending.append(int(m.group(1), 16))
                continue
            if pending:
                out.append(_decode_bytes(bytes(pending)))
                pending.clear()
            out.append(piece.replace(SPACE, " "))
        if pending:
            out.append(_decode_bytes(bytes(pending)))
        return "".join(out)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as one JSON file (``"type": "sentencepiece_bpe"``)."""
        write_json_file(
            path,
            {
                "type": "sentencepiece_bpe",
                "tokens": self._tokens,
                "types": self._types,
                "unk_token_id": self.unk_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
            },
            indent=None,
        )

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceBPETokenizer:
        """Read a file :meth:`save` wrote."""
        data = read_tokenizer_file(path, "sentencepiece_bpe", "SentencePiece BPE tokenizer")
        try:
            return cls(
                data["tokens"],
                data["types"],
                **{k: data.get(k) for k in ("unk_token_id", "bos_token_id", "eos_token_id")},
                pad_token_id=data.get("pad_token_id"),
            )
        except (KeyError, TypeError) as exc:
            raise LmarchError(f"{path}: damaged SentencePiece BPE tokenizer ({exc})") from exc


def _decode_bytes(data: bytes) -> str:
    """UTF-8 where it is valid; each byte of an invalid stretch becomes U+FFFD, as the
    ``tokenizers`` ByteFallback decoder writes it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def spm_tokenizer_from_gguf(metadata: Mapping[str, Any]) -> SentencePieceBPETokenizer:
    """The SentencePiece BPE tokenizer a GGUF file's ``tokenizer.ggml.*`` metadata describes
    (``tokenizer.ggml.model == "llama"``)."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise LmarchError(f"tokenizer.ggml.model is {model!r}, not a SentencePiece ('llama') one")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or (
        not set(map(type, tokens)) <= {str} and not all(isinstance(t, str) for t in tokens)
    ):
        raise LmarchError("GGUF metadata tokenizer.ggml.tokens must be an array of strings")
    types = metadata.get("tokenizer.ggml.token_type")
    if hasattr(types, "tolist"):
        types = types.tolist()
    if types is None:
        types = [1] * len(tokens)
    if not isinstance(types, list) or (
        not set(map(type, types)) <= {int} and not all(isinstance(t, int) for t in types)
    ):
        raise LmarchError("GGUF metadata tokenizer.ggml.token_type must be an array of integers")
    roles: dict[str, int | None] = {}
    for role, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens)):
            raise LmarchError(f"tokenizer.ggml.{key}_token_id={value!r} is not a token id")
        roles[f"{role}_token_id"] = value
    return SentencePieceBPETokenizer(tokens, types, **roles)


__all__ = ["GEMMA_TURN_TEMPLATE", "SentencePieceBPETokenizer", "spm_tokenizer_from_gguf"]
