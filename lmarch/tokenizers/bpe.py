r"""Byte-level byte-pair encoding (BPE), trained and applied by hand.

Byte-pair encoding was a compression scheme before Sennrich, Haddow and Birch (2016, "Neural
Machine Translation of Rare Words with Subword Units") turned it into a way to build a subword
vocabulary: start from single symbols, count how often every pair of neighbouring symbols occurs
in the training words, fuse the most frequent pair into a new symbol, and repeat. Each fusion is a
*merge*; the ordered list of merges is the tokenizer. Frequent words end up as one token, rare
words fall apart into frequent pieces, and nothing is ever out of vocabulary.

GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") made two
choices that this module follows exactly, so that its files load into the ``tokenizers`` library:

1. **Bytes, not characters.** Text is encoded as UTF-8 and the base vocabulary is the 256 byte
   values, so any string can be tokenized with no unknown token. To keep tokens printable (and
   the merges file line-based), every byte is shown as one Unicode character by
   :func:`bytes_to_unicode`: the printable Latin-1 bytes stand for themselves and the other 68
   (control bytes, space, ...) are moved to code points 256 and up; a space becomes ``"Ġ"``
   (U+0120) and a newline ``"Ċ"`` (U+010A).
2. **Pre-tokenization.** Before BPE sees it, text is cut by the regular expression
   :data:`GPT2_SPLIT_PATTERN` into English contractions, runs of letters, runs of digits and runs
   of other symbols, each optionally led by one space, and runs of whitespace. Merges never
   cross these pieces, so ``"dog."`` and ``"dog!"`` share the token for ``" dog"``, and a word's
   leading space becomes part of it.

Training (:meth:`ByteLevelBPETokenizer.train`) counts the pre-tokenized pieces once
(piece -> frequency); each distinct piece is a *word*, a list of byte ids. The merge loop itself
is :func:`lmarch.tokenizers.merges.iter_merges`, shared with WordPiece: it updates pair counts
incrementally, so a step costs time proportional to the words it touches, not to the corpus.
The pair chosen is the one with the highest count; **ties go to the pair whose (left, right)
token strings, as written in the merges file, sort first** (plain ``str`` order), so training is
deterministic.

Encoding (:meth:`ByteLevelBPETokenizer.encode`) cuts out special tokens by exact match, splits the
rest with the same regular expression, and within each piece repeatedly applies the
earliest-learned merge that is present until none applies. Results are cached per piece, since
the same words recur constantly in real text.

The regular expression needs the ``regex`` package (``\p{L}``, ``\p{N}``). Its Unicode tables can
be newer than those of the ``tokenizers`` library, so letters assigned in the latest Unicode
versions may be split differently by the two; everything older tokenizes identically.

**Vocabularies trained elsewhere.** A released model's vocabulary (read from a GGUF file, say, by
:mod:`lmarch.tokenizers.gguf_vocab`) differs from one trained here in five ways, all of which the
constructor takes as arguments:

- ids are whatever the file says, not "bytes first, then merges in order";
- the split regex is the one the vocabulary was trained with (``pattern``): SmolLM2 isolates
  every digit, Llama 3 caps digit runs at three, and so on. Text the pattern does not match is
  kept as pieces of its own, so no pattern can lose characters;
- besides *special tokens* (control tokens such as ``<|im_start|>``, dropped by
  ``decode(..., skip_special_tokens=True)``) there may be *added tokens* (user-defined ones such
  as ``<think>``), matched whole in the text like special tokens but always decoded;
- some vocabularies (Llama 3's) look a whole pre-token up in the vocabulary before running any
  merge (``ignore_merges``), which matters for the few words the merges do not rebuild;
- a byte that never occurred in the training text may have no token at all (SmolLM2 lacks 21
  control bytes). With ``allow_missing_bytes`` such bytes are dropped before merging, as the
  ``tokenizers`` library does for a BPE model without an unknown token (llama.cpp drops them
  too), so they vanish from the round trip; otherwise a vocabulary must hold all 256.

The ids of the beginning- and end-of-sequence tokens, and whether the model wants a BOS in front of
every prompt, travel with the tokenizer too, and everything is saved to and loaded from the same
JSON file: optional fields written only when they differ from the defaults, so files of
tokenizers trained here look exactly as they always have.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import operator
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import regex

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_json_file, write_json_file
from lmarch.tokenizers.encoder_input import EncoderInputMixin
from lmarch.tokenizers.merges import iter_merges, merge_pair

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
"""GPT-2's pre-tokenization regex (also the ``tokenizers`` ByteLevel pre-tokenizer's)."""

_CACHE_LIMIT = 200_000
_LONG_PIECE = 64  # bytes; longer pieces use the heap-based merge loop


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte value to the printable character that stands for it.

    Bytes that are visible Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the remaining 68 bytes take code points 256, 257, ... in increasing byte order.
    """
    visible = set(range(ord("!"), ord("~") + 1))
    visible |= set(range(ord("¡"), ord("¬") + 1))
    visible |= set(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in visible:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {char: byte for byte, char in _BYTE_TO_CHAR.items()}
# str.translate table: byte-level symbol -> the character whose code point is that byte, so
# that ``token.translate(_TO_LATIN1).encode("latin-1")`` spells a token in raw bytes at C speed
_TO_LATIN1 = {ord(char): byte for char, byte in _CHAR_TO_BYTE.items()}


def compile_split_pattern(pattern: str) -> regex.Pattern[str]:
    """Compile a pre-tokenization regex, rejecting what would make ``findall`` misbehave.

    A capturing group would make ``findall`` return the group instead of the whole match, so
    patterns must use ``(?:...)`` / ``(?i:...)`` groups only.
    """
    try:
        compiled = regex.compile(pattern)
    except (regex.error, TypeError) as exc:
        raise LmarchError(
            f"split pattern {pattern!r} is not a valid regular expression: {exc}"
        ) from exc
    if compiled.groups:
        raise LmarchError(
            f"split pattern {pattern!r} has a capturing group",
            hint="write groups as (?:...) so that every match is a whole piece",
        )
    return compiled


def split_pieces(split: regex.Pattern[str], text: str) -> list[str]:
    """Cut ``text`` into pre-tokens with ``split``; stretches it does not match become pieces too.

    The patterns of real vocabularies match every character, so the common path is one
    ``findall``; the slower gap-keeping path runs only when the lengths do not add up.
    """
    pieces = split.findall(text)
    if sum(map(len, pieces)) == len(text):
        return pieces
    pieces, end = [], 0
    for match in split.finditer(text):
        if match.start() > end:
            pieces.append(text[end : match.start()])
        pieces.append(match.group())
        end = match.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def _special_splitter(special_tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern whose ``split`` keeps special tokens as separate items (longest match first)."""
    ordered = sorted(special_tokens, key=lambda tok: (-len(tok), tok))
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(tok) for tok in ordered) + ")")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector while building large tables of tuples.

    Each ~700 new container objects start a collection, and the tables (~10^5 key and value
    tuples for a real vocabulary's merges) make those passes slower as they grow: paused, a
    49,152-token vocabulary builds ~1.5x faster. Nothing built here holds a cycle; the
    collector runs as usual afterwards (it is resumed only if it was running before)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ByteLevelBPETokenizer(EncoderInputMixin):
    """GPT-2-style byte-level BPE tokenizer (see the module docstring for the algorithm).

    As an encoder's tokenizer (RoBERTa), ``encode_pair`` / ``encode_batch`` build
    ``<s> A </s>`` or ``<s> A </s> </s> B </s>`` with one token type, taking the BOS token as
    ``cls_id``, the EOS token as ``sep_id`` and the padding token as ``pad_id``, as fairseq's
    vocabularies (RoBERTa's, BART's) do.

    Args:
        vocab: byte-level token string -> id, holding at least the 256 single-byte symbols.
        merges: ordered pairs of token strings; the first pair is applied first.
        special_tokens: special token text -> id (e.g. ``{"<|endoftext|>": 4352}``). These are
            matched verbatim in the input and never split, and ``decode`` can skip them.
        added_tokens: more tokens matched verbatim, text -> id, that ``decode`` always keeps
            (GGUF's user-defined tokens).
        pattern: the pre-tokenization regex (default GPT-2's); no capturing groups.
        ignore_merges: look each pre-token up whole in ``vocab`` before merging (Llama 3).
        allow_missing_bytes: accept a vocabulary without some of the 256 byte symbols; those
            bytes are dropped when encoding.
        bos_token_id, eos_token_id, pad_token_id: ids of those roles, if the vocabulary has them.
        add_bos_token: whether the model expects a BOS in front of every prompt
            (``encode(text, add_bos=tok.add_bos_token)``).

    Together, ``vocab``, ``special_tokens`` and ``added_tokens`` must use each id in
    ``0 .. vocab_size - 1`` exactly once.
    """

    pair_separators = 2  # RoBERTa: <s> A </s> </s> B </s>
    second_segment_type = 0

    @gc_paused()  # real vocabularies: ~10^5 table entries at once
    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Mapping[str, int] | None = None,
        *,
        added_tokens: Mapping[str, int] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
        ignore_merges: bool = False,
        allow_missing_bytes: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
    ) -> None:
        special_tokens = dict(special_tokens or {})
        added_tokens = dict(added_tokens or {})
        self._vocab = dict(vocab)
        self._special = special_tokens
        self._added = added_tokens
        both = sorted(set(special_tokens) & set(added_tokens))
        if both:
            raise LmarchError(f"tokens both special and added: {both[:5]}")
        if "" in special_tokens or "" in added_tokens:
            raise LmarchError("special and added tokens must be non-empty strings")
        _check_ids(self._vocab, {**special_tokens, **added_tokens})
        self._pattern = pattern
        self._split = compile_split_pattern(pattern)
        self._ignore_merges = bool(ignore_merges)
        missing = [c for c in _BYTE_TO_CHAR.values() if c not in self._vocab]
        self._allow_missing_bytes = bool(allow_missing_bytes)
        if missing and not allow_missing_bytes:
            raise LmarchError(f"vocab lacks {len(missing)} of the 256 byte symbols: {missing[0]!r}")
        if "" in self._vocab or not set("".join(self._vocab)) <= _CHAR_TO_BYTE.keys():
            for token in self._vocab:
                if not token or any(c not in _CHAR_TO_BYTE for c in token):
                    raise LmarchError(f"vocab token {token!r} is not in the byte-level alphabet")

        self._id_to_token: list[str] = [""] * (
            len(self._vocab) + len(special_tokens) + len(added_tokens)
        )
        for table in (self._vocab, special_tokens, added_tokens):
            for token, idx in table.items():
                self._id_to_token[idx] = token
        roles = {"bos": bos_token_id, "eos": eos_token_id, "pad": pad_token_id}
        for role, idx in roles.items():
            if idx is not None and not (type(idx) is int and 0 <= idx < len(self._id_to_token)):
                raise LmarchError(
                    f"{role}_token_id {idx!r} is not in 0..{len(self._id_to_token) - 1}"
                )
        self._bos_id = bos_token_id
        self._eos_id = eos_token_id
        self._pad_id = pad_token_id
        self._add_bos = bool(add_bos_token)

        # (left id, right id) -> (rank, merged id): everything encoding needs about the merges.
        self._merges, self._merge_list = _merge_table(self._vocab, merges)

        # -1 marks a byte without a token (only with allow_missing_bytes).
        self._byte_ids = [self._vocab.get(_BYTE_TO_CHAR[b], -1) for b in range(256)]
        self._has_missing_bytes = bool(missing)
        # Decoding joins raw bytes per id; special and added tokens decode to their own text.
        self._id_bytes = _id_bytes(self._vocab, {**special_tokens, **added_tokens})
        # What skip_special_tokens drops: control tokens and the BOS/EOS/padding roles.
        self._skip_ids = frozenset(special_tokens.values()) | frozenset(
            idx for idx in roles.values() if idx is not None
        )
        self._verbatim = {**special_tokens, **added_tokens}
        self._special_split = _special_splitter(self._verbatim)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        text: str | Iterable[str],
        vocab_size: int | None = None,
        num_merges: int | None = None,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        show_progress: bool = False,
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> ByteLevelBPETokenizer:
        """Learn merges from ``text`` (one string, or an iterable of documents).

        Give either ``vocab_size`` (256 byte symbols + merges + special tokens) or ``num_merges``.
        Training stops early if every word has become a single token. Special tokens found in
        the text are cut out before counting, so no merge ever spans one; they take the ids after
        the merges, in the order given. ``pattern`` is the pre-tokenization regex, kept by the
        tokenizer for encoding.
        """
        special_tokens = (
            [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
        )
        if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
            raise LmarchError(f"special tokens must be distinct and non-empty: {special_tokens}")
        if (vocab_size is None) == (num_merges is None):
            raise LmarchError("give exactly one of vocab_size and num_merges")
        if num_merges is None:
            assert vocab_size is not None
            num_merges = vocab_size - 256 - len(special_tokens)
            if num_merges < 0:
                raise LmarchError(
                    f"vocab_size {vocab_size} is below the 256 byte symbols plus "
                    f"{len(special_tokens)} special tokens"
                )
        if num_merges < 0:
            raise LmarchError(f"num_merges must be >= 0, got {num_merges}")

        split = compile_split_pattern(pattern)
        documents = [text] if isinstance(text, str) else text
        piece_counts = _count_pieces(documents, _special_splitter(special_tokens), split)
        merges = _learn_merges(piece_counts, num_merges, show_progress)

        vocab = {_BYTE_TO_CHAR[b]: b for b in range(256)}
        for left, right in merges:
            vocab.setdefault(left + right, len(vocab))
        specials = {tok: len(vocab) + i for i, tok in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern=pattern)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids for ``text``.

        Special and added tokens written in the text (exact matches, longest first) become their
        single id, unless ``parse_special`` is False, in which case they are tokenized as the plain
        text they are (use that for text from an untrusted user inside a chat). ``add_bos``
        puts the BOS id first; pass ``add_bos=tok.add_bos_token`` to do what the model expects.
        """
        ids: list[int] = []
        if add_bos:
            if self._bos_id is None:
                raise LmarchError("add_bos=True, but this tokenizer has no BOS token")
            ids.append(self._bos_id)
        if self._special_split is None or not parse_special:
            ids.extend(self._encode_ordinary(text))
            return ids
        for i, chunk in enumerate(self._special_split.split(text)):
            if i % 2:  # split() puts captured separators (special tokens) at odd positions
                ids.append(self._verbatim[chunk])
            elif chunk:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in split_pieces(self._split, text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        """BPE on one pre-token: keep applying the lowest-ranked merge present."""
        try:
            raw = piece.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LmarchError(f"text is not valid Unicode (lone surrogate?): {exc}") from exc
        if self._ignore_merges:
            whole = self._vocab.get("".join([_BYTE_TO_CHAR[b] for b in raw]))
            if whole is not None:
                return [whole]
        byte_ids = self._byte_ids
        word = [byte_ids[b] for b in raw]
        if self._has_missing_bytes:
            word = [i for i in word if i >= 0]
        if len(word) > _LONG_PIECE:
            return self._encode_long_piece(word)
        merges = self._merges
        no_merge = (len(merges), -1)
        while len(word) > 1:
            best = min(pairwise(word), key=lambda pair: merges.get(pair, no_merge)[0])
            if best not in merges:
                break
            word = merge_pair(word, best[0], best[1], merges[best][1])
        return word

    def _encode_long_piece(self, word: list[int]) -> list[int]:
        """The same BPE for long pieces in O(n log n), with a heap over positions.

        Rescanning the whole piece for every merge is quadratic, which a single long run of
        letters or symbols (a minified file, a base64 blob) would turn into a stall. Here the
        symbols form a linked list and a heap holds ``(rank, position)`` of every mergeable
        neighbour pair; equal ranks merge leftmost first, which for merges learned by BPE gives
        the same tokens as merging every occurrence at once.
        """
        merges = self._merges
        n = len(word)
        nxt = list(range(1, n + 1))  # n marks the end
        prv = list(range(-1, n - 1))  # -1 marks the start
        alive = [True] * n
        heap = [(merges[pair][0], i) for i, pair in enumerate(pairwise(word)) if pair in merges]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j == n or merges.get((word[i], word[j]), (-1,))[0] != rank:
                continue  # stale: a neighbour changed since this entry was pushed
            word[i] = merges[(word[i], word[j])][1]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                right = merges.get((word[i], word[nxt[i]]))
                if right is not None:
                    heapq.heappush(heap, (right[0], i))
            if prv[i] >= 0:
                left = merges.get((word[prv[i]], word[i]))
                if left is not None:
                    heapq.heappush(heap, (left[0], prv[i]))
        return [sym for sym, keep in zip(word, alive, strict=True) if keep]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``: the exact inverse of :meth:`encode` on any valid Unicode string.

        Byte sequences that are not valid UTF-8 (a multi-byte character cut in two) come out as
        U+FFFD replacement characters. With ``skip_special_tokens`` the special (control) tokens
        and the BOS, EOS and padding tokens are left out; added tokens are always kept.
        """
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        table = self._id_bytes
        try:
            if ids and min(ids) < 0:
                raise IndexError
            if skip_special_tokens:
                skip = self._skip_ids
                data = b"".join([table[i] for i in ids if i not in skip])
            else:
                data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError) as exc:
            bad = next(i for i in ids if not (type(i) is int and 0 <= i < len(table)))
            raise LmarchError(f"token id {bad!r} is not in 0..{len(table) - 1}") from exc
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ lookups

    @property
    def vocab_size(self) -> int:
        """Number of ids: byte symbols, merged tokens and special tokens."""
        return len(self._id_to_token)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(self._special)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added (matched whole, never skipped) token text -> id."""
        return dict(self._added)

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex."""
        return self._pattern

    @property
    def ignore_merges(self) -> bool:
        """Whether a pre-token found whole in the vocabulary skips the merges."""
        return self._ignore_merges

    @property
    def allow_missing_bytes(self) -> bool:
        """Whether bytes without a token are accepted (and dropped when encoding)."""
        return self._allow_missing_bytes

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if any."""
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, if any (the one that stops generation)."""
        return self._eos_id

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, if any."""
        return self._pad_id

    @property
    def cls_id(self) -> int | None:  # type: ignore[override]
        """The token that opens an encoder's input: the BOS token (RoBERTa's ``<s>``)."""
        return self._bos_id

    @property
    def sep_id(self) -> int | None:  # type: ignore[override]
        """The token that closes each segment of an encoder's input: the EOS token (``</s>``)."""
        return self._eos_id

    @property
    def pad_id(self) -> int | None:  # type: ignore[override]
        """Same as :attr:`pad_token_id` (the name the encoder tasks use)."""
        return self._pad_id

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens (never masked or replaced by masked-LM training)."""
        return set(self._special.values())

    @property
    def mask_id(self) -> int | None:
        """Id of the special token ``<mask>`` (RoBERTa's masked-LM token), if there is one."""
        return self._special.get("<mask>")

    @property
    def add_bos_token(self) -> bool:
        """Whether the model expects its BOS token in front of every prompt."""
        return self._add_bos

    @property
    def bos_token(self) -> str | None:
        """Text of the BOS token, if any."""
        return None if self._bos_id is None else self._id_to_token[self._bos_id]

    @property
    def eos_token(self) -> str | None:
        """Text of the EOS token, if any."""
        return None if self._eos_id is None else self._id_to_token[self._eos_id]

    @property
    def pad_token(self) -> str | None:
        """Text of the padding token, if any."""
        return None if self._pad_id is None else self._id_to_token[self._pad_id]

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The merges in the order they were learned (and are applied)."""
        return list(self._merge_list)

    @property
    def vocab(self) -> dict[str, int]:
        """Byte-level token string -> id (special tokens not included)."""
        return dict(self._vocab)

    def token_to_id(self, token: str) -> int | None:
        """Id of a byte-level token string, or a special or added token; None if there is none."""
        idx = self._vocab.get(token)
        return self._verbatim.get(token) if idx is None else idx

    def id_to_token(self, idx: int) -> str | None:
        """Token string for ``idx`` (byte-level form, or a special's text); None if out of range."""
        return self._id_to_token[idx] if 0 <= idx < len(self._id_to_token) else None

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file (``{"type": "byte_bpe", ...}``)."""
        path = Path(path)
        data = {
            "type": "byte_bpe",
            "vocab": self._vocab,
            "merges": [f"{a} {b}" for a, b in self._merge_list],
            "special_tokens": self._special,
        }
        # Optional fields, written only when not at their defaults (older readers knew none).
        optional: dict[str, Any] = {
            "added_tokens": self._added or None,
            "pattern": None if self._pattern == GPT2_SPLIT_PATTERN else self._pattern,
            "ignore_merges": self._ignore_merges or None,
            "allow_missing_bytes": self._allow_missing_bytes or None,
            "bos_token_id": self._bos_id,
            "eos_token_id": self._eos_id,
            "pad_token_id": self._pad_id,
            "add_bos_token": self._add_bos or None,
        }
        data.update({key: value for key, value in optional.items() if value is not None})
        write_json_file(path, data)

    @classmethod
    def load(cls, path: str | Path) -> ByteLevelBPETokenizer:
        """Read a file written by :meth:`save`; a malformed file raises :class:`LmarchError`."""
        path = Path(path)
        data = read_json_file(path)
        try:
            vocab, merges, special, options = _parse_file(data)
            return cls(vocab, merges, special, **options)
        except LmarchError as exc:
            raise LmarchError(f"bad byte-level BPE file {path}: {exc}") from exc

    def to_hf_tokenizer(self) -> Any:
        """The same tokenizer as a ``tokenizers.Tokenizer`` (for parity checks, fast encoding)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        vocab = dict(self._vocab)
        vocab.update(self._verbatim)
        bpe = models.BPE(
            vocab=vocab, merges=list(self._merge_list), ignore_merges=self._ignore_merges
        )
        hf = Tokenizer(bpe)
        if self._pattern == GPT2_SPLIT_PATTERN:
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(self._pattern), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(tok, special=True) for tok in self._special])
        hf.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in self._added])
        return hf


# ---------------------------------------------------------------------- training internals


def _count_pieces(
    documents: Iterable[str], special_split: re.Pattern[str] | None, split: regex.Pattern[str]
) -> Counter[str]:
    """Pre-token -> number of occurrences over all documents (special tokens skipped)."""
    counts: Counter[str] = Counter()
    for doc in documents:
        chunks = [doc] if special_split is None else special_split.split(doc)[::2]
        for chunk in chunks:
            counts.update(split_pieces(split, chunk))
    return counts


def _learn_merges(
    piece_counts: Mapping[str, int], num_merges: int, show_progress: bool
) -> list[tuple[str, str]]:
    """The first ``num_merges`` merges of :func:`lmarch.tokenizers.merges.iter_merges` over the
    pieces' UTF-8 bytes; returns merges as pairs of token strings."""
    tokens = [_BYTE_TO_CHAR[b] for b in range(256)]  # id -> token string, grows with each merge
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, freq in piece_counts.items():
        word = list(piece.encode("utf-8"))
        if len(word) > 1:  # a single byte has no pairs to contribute
            words.append(word)
            freqs.append(freq)

    merges: list[tuple[str, str]] = []
    progress = None
    if show_progress:
        from rich.progress import Progress

        progress = Progress()
        progress.start()
        task = progress.add_task("BPE merges", total=num_merges)
    try:
        for merge in iter_merges(words, freqs, tokens):
            if len(merges) == num_merges:
                break
            merges.append((merge.left, merge.right))
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return merges


# ---------------------------------------------------------------------- construction


def _merge_table(
    vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]
) -> tuple[dict[tuple[int, int], tuple[int, int]], list[tuple[str, str]]]:
    """(left id, right id) -> (rank, merged id) for ``merges`` in rank order, and the merges as
    a list of string pairs; a merge whose parts or result are not in ``vocab``, or that appears
    twice, is refused by rank.

    Built with C-level maps over the whole list (a GGUF or tokenizer.json vocabulary holds
    ~10^5 merges, loaded on every model load); any failure reruns the loop below, which names
    the first offending merge."""
    pairs = merges if isinstance(merges, list) else list(merges)
    if pairs and set(map(len, pairs)) == {2}:
        lefts, rights = (list(side) for side in zip(*pairs))
        if set(map(type, lefts)) | set(map(type, rights)) == {str}:
            get = vocab.get
            left_ids = list(map(get, lefts))
            right_ids = list(map(get, rights))
            merged_ids = list(map(get, map(operator.add, lefts, rights)))
            if None not in left_ids and None not in right_ids and None not in merged_ids:
                table = dict(zip(zip(left_ids, right_ids), zip(range(len(pairs)), merged_ids)))
                if len(table) == len(pairs):
                    return table, list(zip(lefts, rights))
    table = {}
    for rank, pair in enumerate(pairs):
        left, right = pair
        merged = left + right
        for part in (left, right, merged):
            if part not in vocab:
                raise LmarchError(f"merge {rank} ({left} {right}) uses {part!r}, not in vocab")
        key = (vocab[left], vocab[right])
        if key in table:
            raise LmarchError(f"merge {rank} ({left} {right}) appears twice")
        table[key] = (rank, vocab[merged])
    return table, [(str(a), str(b)) for a, b in pairs]


def _id_bytes(vocab: Mapping[str, int], verbatim: Mapping[str, int]) -> list[bytes]:
    """The raw bytes of every id (``vocab`` and the special and added tokens ``verbatim``
    together use each id once): a byte-level token spelled back in bytes, a special or added
    token as its own UTF-8 text.

    The byte-level tokens are translated in one string (each of their symbols is one byte) and
    cut at their lengths, rather than translated one by one."""
    out = [b""] * (len(vocab) + len(verbatim))
    for token, idx in verbatim.items():
        out[idx] = token.encode()
    tokens = list(vocab)
    blob = "".join(tokens).translate(_TO_LATIN1).encode("latin-1")
    ends = list(itertools.accumulate(map(len, tokens)))
    pieces = map(blob.__getitem__, map(slice, [0, *ends[:-1]], ends))
    for idx, piece in zip(vocab.values(), pieces):
        out[idx] = piece
    return out


# ---------------------------------------------------------------------- file checks


def _check_ids(vocab: Mapping[str, int], special: Mapping[str, int]) -> None:
    ids = list(vocab.values()) + list(special.values())
    if not set(map(type, ids)) <= {int}:  # exact type: a bool is not an id
        raise LmarchError("token ids must be integers")
    overlap = set(vocab) & set(special)
    if overlap:
        raise LmarchError(f"special tokens also in vocab: {sorted(overlap)[:5]}")
    if sorted(ids) != list(range(len(ids))):
        raise LmarchError(f"token ids must be 0..{len(ids) - 1}, each used once")


def _parse_file(
    data: Any,
) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], dict[str, Any]]:
    """(vocab, merges, special tokens, keyword options) from a parsed JSON file."""
    if not isinstance(data, dict) or data.get("type") != "byte_bpe":
        raise LmarchError('not a byte-level BPE tokenizer (expected "type": "byte_bpe")')
    vocab = data.get("vocab")
    merges = data.get("merges")
    special = data.get("special_tokens", {})
    added = data.get("added_tokens", {})
    for name, value in (("vocab", vocab), ("special_tokens", special), ("added_tokens", added)):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise LmarchError(f'"{name}" must be an object of token -> id')
    options: dict[str, Any] = {"added_tokens": added}
    expected = {
        "pattern": (str,),
        "ignore_merges": (bool,),
        "allow_missing_bytes": (bool,),
        "bos_token_id": (int,),
        "eos_token_id": (int,),
        "pad_token_id": (int,),
        "add_bos_token": (bool,),
    }
    for key, types in expected.items():
        if key in data:
            value = data[key]
            if type(value) not in types:  # (bool is an int subclass: compare exact types)
                raise LmarchError(f'"{key}" must be of type {types[0].__name__}, got {value!r}')
            options[key] = value
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise LmarchError('"merges" must be a list of "left right" strings')
    pairs: list[tuple[str, str]] = []
    for i, line in enumerate(merges):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise LmarchError(f"merge {i} {line!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return vocab, pairs, special, options
