r"""WordPiece: BERT's subword tokenizer, trained and applied by hand.

WordPiece (Schuster & Nakajima 2012, "Japanese and Korean Voice Search"; Wu et al. 2016,
"Google's Neural Machine Translation System") splits each word into pieces from a fixed
vocabulary. A piece that continues a word carries the prefix ``"##"``: with ``un``, ``##aff``
and ``##able`` in the vocabulary, ``"unaffable"`` becomes ``un ##aff ##able``. BERT (Devlin et
al. 2019) uses it on words produced by :mod:`lmarch.tokenizers.bert_normalize`.

**Encoding** is greedy longest-match-first, left to right: at each position take the longest
vocabulary entry that matches there (with ``"##"`` in front unless it is the start of the word)
and move past it. If at some position nothing matches, the *whole word* becomes ``[UNK]`` (not
just the stuck part); so does any word longer than ``max_input_chars_per_word`` characters (100).
Greedy matching is not guaranteed to find a split when one exists (``"abc"`` with ``ab``,
``a``, ``##bc`` but no ``##c`` fails), which is the price of its speed.

**Special tokens** (``[CLS]``, ``[SEP]``, ``[MASK]`` ...) written in the input text are matched
verbatim before normalisation, longest first, and become their own id. :meth:`encode` adds none;
``encode_pair`` (from :class:`~lmarch.tokenizers.encoder_input.EncoderInputMixin`) builds BERT's
input ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` with token type ids 0 for the first segment
and 1 for the second.

**Training** (:meth:`WordPieceTokenizer.train`) follows the ``tokenizers`` library rather than
the original likelihood criterion: the original picks, at each step, the pair of pieces whose
fusion most increases the likelihood of the training data under a unigram model, a score of
``count(ab) / (count(a) count(b))``; here, as in BPE, the most frequent neighbouring pair is fused,
with ``"##"`` marking every piece that does not start a word (so ``h`` + ``##e`` gives ``he`` and
``##e`` + ``##r`` gives ``##er``). The loop keeps pair counts, an index from pairs to the words
holding them, and a lazily corrected max-heap, so each merge costs time in proportion to the words
it touches (see :mod:`lmarch.tokenizers.wordpiece_train`). Only the vocabulary is kept:
WordPiece encoding does not replay the merges. Measured on this project's 2-core machine, shared
with other jobs (load average about 7): the 38 Shakespeare plays (4.8 M characters) train to a
2,000-token vocabulary in 3.2-3.8 s of wall time (1.6 s of CPU time) and to 8,000 tokens in
4.5-6.2 s (2.3 s of CPU time, 0.7 s of which normalise and count the words).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_json_file, read_tokenizer_file, write_json_file
from lmarch.tokenizers.bert_normalize import (
    _ASCII_WORDS,
    BertNormalizer,
    _word_pattern,
    bert_pre_tokenize,
)
from lmarch.tokenizers.encoder_input import EncoderInputMixin
from lmarch.tokenizers.wordpiece_files import (
    read_vocab_lines,
    tokenizer_json_options,
    tokens_in_id_order,
)
from lmarch.tokenizers.wordpiece_train import learn_wordpiece_pieces

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens, in the order its vocabularies list them."""

_ROLE_ORDER = ("pad", "unk", "cls", "sep", "mask")
_CACHE_LIMIT = 200_000
# Substrings of the decoded pieces that lose their space, as the ``tokenizers`` WordPiece decoder
# does with ``cleanup``: it looks at one piece (with its leading space) at a time.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","))


def _word_matches(text: str) -> Iterable[re.Match[str]]:
    """The words of :func:`bert_pre_tokenize` as regex matches, so their places are known."""
    return (_ASCII_WORDS if text.isascii() else _word_pattern()).finditer(text)


class WordPieceTokenizer(EncoderInputMixin):
    """BERT's WordPiece tokenizer (see the module docstring for the algorithm).

    Args:
        vocab: the tokens in id order (a list), or token -> id using ids ``0 .. n-1`` once each.
            Continuation pieces start with ``continuing_subword_prefix``.
        unk_token: what an unknown word becomes; must be in ``vocab``.
        special_tokens: tokens matched verbatim in raw text and dropped by ``decode``; all must
            be in ``vocab``. By default, those of :data:`BERT_SPECIAL_TOKENS` present in it.
        pad_token, cls_token, sep_token, mask_token: the roles (ids become ``pad_id`` ...,
            ``None`` where the vocabulary lacks the token).
        continuing_subword_prefix: the mark of a piece that continues a word.
        max_input_chars_per_word: longer words become ``unk_token`` whole.
        lowercase, strip_accents, handle_chinese_chars, clean_text: the
            :class:`~lmarch.tokenizers.bert_normalize.BertNormalizer` steps (uncased BERT:
            all on, ``strip_accents=None`` following ``lowercase``).
    """

    def __init__(
        self,
        vocab: Sequence[str] | Mapping[str, int],
        *,
        unk_token: str = "[UNK]",
        special_tokens: Iterable[str] | None = None,
        pad_token: str = "[PAD]",
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        mask_token: str = "[MASK]",
        continuing_subword_prefix: str = "##",
        max_input_chars_per_word: int = 100,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        handle_chinese_chars: bool = True,
        clean_text: bool = True,
    ) -> None:
        self._tokens = tokens_in_id_order(vocab)
        self._ids = {token: i for i, token in enumerate(self._tokens)}
        if unk_token not in self._ids:
            raise LmarchError(f"unknown-word token {unk_token!r} is not in the vocabulary")
        if special_tokens is None:
            special_tokens = [t for t in BERT_SPECIAL_TOKENS if t in self._ids]
        self._special = list(dict.fromkeys(special_tokens))
        missing = [t for t in self._special if t not in self._ids]
        if missing or "" in self._special:
            raise LmarchError(f"special tokens must be non-empty and in the vocabulary: {missing}")
        if not continuing_subword_prefix or not isinstance(continuing_subword_prefix, str):
            raise LmarchError("continuing_subword_prefix must be a non-empty string")
        if type(max_input_chars_per_word) is not int or max_input_chars_per_word < 1:
            raise LmarchError(f"max_input_chars_per_word must be >= 1: {max_input_chars_per_word}")
        self._prefix = continuing_subword_prefix
        self._max_chars = max_input_chars_per_word
        self._normalizer = BertNormalizer(
            lowercase=bool(lowercase),
            strip_accents=None if strip_accents is None else bool(strip_accents),
            handle_chinese_chars=bool(handle_chinese_chars),
            clean_text=bool(clean_text),
        )
        self._roles = {
            "unk": unk_token,
            "pad": pad_token,
            "cls": cls_token,
            "sep": sep_token,
            "mask": mask_token,
        }
        self.unk_id: int = self._ids[unk_token]
        self.pad_id: int | None = self._ids.get(pad_token)
        self.cls_id: int | None = self._ids.get(cls_token)
        self.sep_id: int | None = self._ids.get(sep_token)
        self.mask_id: int | None = self._ids.get(mask_token)
        self.special_ids: set[int] = {self._ids[t] for t in self._special}
        self._special_split = (
            re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len)[::-1])) + ")")
            if self._special
            else None
        )
        # The longest piece that can match at a word start / inside a word, in characters.
        plen = len(self._prefix)
        self._longest_start = max(
            (len(t) for t in self._tokens if not t.startswith(self._prefix)), default=0
        )
        self._longest_inside = max(
            (len(t) - plen for t in self._tokens if t.startswith(self._prefix)), default=0
        )
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS,
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        continuing_subword_prefix: str = "##",
        max_input_chars_per_word: int = 100,
        unk_token: str = "[UNK]",
    ) -> WordPieceTokenizer:
        """Learn a WordPiece vocabulary of ``vocab_size`` tokens from ``texts``.

        Texts are normalised and split into words as BERT does (special tokens in them are
        skipped). The vocabulary is the special tokens (ids ``0 ..``, in the order given), every
        character of the words in both forms (``c`` and ``##c``, so no seen character is
        unknown at any position), then the pieces made by the most frequent pair merges (see
        the module docstring), stopping at ``vocab_size`` or when no pair occurs at least
        ``min_frequency`` times. Words longer than ``max_input_chars_per_word`` are not counted.
        The alphabet is always kept, even if it alone exceeds ``vocab_size``.
        """
        special = list(special_tokens)
        if len(set(special)) != len(special) or "" in special:
            raise LmarchError(f"special tokens must be distinct and non-empty: {special}")
        if unk_token not in special:
            raise LmarchError(f"the unknown-word token {unk_token!r} must be a special token")
        if type(min_frequency) is not int or min_frequency < 0:
            raise LmarchError(f"min_frequency must be an integer >= 0, got {min_frequency!r}")
        normalizer = BertNormalizer(lowercase=lowercase, strip_accents=strip_accents)
        splitter = re.compile("|".join(map(re.escape, sorted(special, key=len)[::-1])))
        counts: Counter[str] = Counter()
        for text in [texts] if isinstance(texts, str) else texts:
            for chunk in splitter.split(text):
                counts.update(bert_pre_tokenize(normalizer.normalize(chunk)))
        for word in [w for w in counts if len(w) > max_input_chars_per_word]:
            del counts[word]
        learned = learn_wordpiece_pieces(
            counts, vocab_size - len(special), min_frequency, continuing_subword_prefix
        )
        vocab = special + [t for t in learned if t not in set(special)]
        return cls(
            vocab,
            unk_token=unk_token,
            special_tokens=special,
            continuing_subword_prefix=continuing_subword_prefix,
            max_input_chars_per_word=max_input_chars_per_word,
            lowercase=lowercase,
            strip_accents=strip_accents,
        )

    # ------------------------------------------------------------------ encoding

    def _words(self, text: str) -> list[str | int]:
        """BERT's words of ``text``, with the id of each special token found in it in its place."""
        out: list[str | int] = []
        chunks = [text] if self._special_split is None else self._special_split.split(text)
        for i, chunk in enumerate(chunks):
            if i % 2:  # split() puts the captured special tokens at odd positions
                out.append(self._ids[chunk])
            elif chunk:
                out.extend(bert_pre_tokenize(self._normalizer.normalize(chunk)))
        return out

    def _encode_word(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces of one word; ``[UNK]`` alone if it cannot be done."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        n = len(word)
        ids = []
        if n > self._max_chars:
            ids.append(self.unk_id)
        else:
            vocab, prefix, start = self._ids, self._prefix, 0
            while start < n:
                longest = self._longest_inside if start else self._longest_start
                for end in range(min(n, start + longest), start, -1):
                    piece = word[start:end] if start == 0 else prefix + word[start:end]
                    idx = vocab.get(piece)
                    if idx is not None:
                        ids.append(idx)
                        start = end
                        break
                else:
                    ids = [self.unk_id]
                    break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without ``[CLS]``/``[SEP]`` (special tokens in it are kept)."""
        ids: list[int] = []
        for word in self._words(text):
            if isinstance(word, int):
                ids.append(word)
            else:
                ids.extend(self._encode_word(word))
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode` plus, for each token, the span ``(start, end)`` of ``text`` (Python
        character indices) it was read from, as the ``tokenizers`` library reports offsets.

        Normalisation works one character at a time (cleaning, CJK spacing, accent stripping
        and lower-casing all do), so each normalised character is traced to the original one
        it came from; a word's pieces take consecutive slices of its normalised characters
        (the ``"##"`` is not in the text), and a word that became ``[UNK]`` spans the whole word.
        Extractive question answering needs this to turn token positions into answer text.
        """
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        if self._special_split is None:
            chunks = [(0, text, False)]
        else:
            chunks, at = [], 0
            for i, part in enumerate(self._special_split.split(text)):
                chunks.append((at, part, bool(i % 2)))  # captured specials sit at odd places
                at += len(part)
        for base, chunk, special in chunks:
            if special:
                ids.append(self._ids[chunk])
                offsets.append((base, base + len(chunk)))
                continue
            normal = self._normalizer.normalize(chunk) if chunk.isascii() else None
            if normal is not None and len(normal) == len(chunk):  # ASCII kept one to one
                origin: Sequence[int] = range(base, base + len(chunk))
            else:
                pieces, origin = [], []
                for k, char in enumerate(chunk):
                    out = self._normalizer.normalize(char)
                    pieces.append(out)
                    origin.extend([base + k] * len(out))
                normal = "".join(pieces)
            for match in _word_matches(normal):
                start = match.start()
                word_ids = self._encode_word(match.group())
                if word_ids == [self.unk_id] and self._tokens[self.unk_id] != match.group():
                    ids.append(self.unk_id)
                    offsets.append((origin[start], origin[match.end() - 1] + 1))
                    continue
                for idx in word_ids:
                    token = self._tokens[idx]
                    length = len(token) - (len(self._prefix) if start > match.start() else 0)
                    ids.append(idx)
                    offsets.append((origin[start], origin[start + length - 1] + 1))
                    start += length
        return ids, offsets

    def tokenize(self, text: str) -> list[str]:
        """The token strings of :meth:`encode` (continuation pieces keep their ``"##"``)."""
        return [self._tokens[i] for i in self.encode(text)]

    def word_ids(self, text: str) -> list[int]:
        """For each token of ``encode(text)``, the index of the word it belongs to.

        Words are counted from 0 in the order of :func:`bert_pre_tokenize` (a special token in
        the text counts as a word); all pieces of one word share its index, which is what
        whole-word masking needs.
        """
        out: list[int] = []
        for index, word in enumerate(self._words(text)):
            count = 1 if isinstance(word, int) else len(self._encode_word(word))
            out.extend([index] * count)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``: pieces joined, ``"##"`` pieces glued to the one before.

        Words are separated by one space, except that no space is left before ``.``, ``?``,
        ``!`` and ``,`` (as the ``tokenizers`` WordPiece decoder cleans up). Normalisation is not
        undone: an uncased tokenizer gives lower-case text without accents.
        """
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        tokens = self._tokens
        try:
            if ids and min(ids) < 0:
                raise IndexError
            pieces = [tokens[i] for i in ids if not (skip_special_tokens and i in self.special_ids)]
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (type(i) is int and 0 <= i < len(tokens)))
            raise LmarchError(f"token id {bad!r} is not in 0..{len(tokens) - 1}") from None
        out = []
        prefix = self._prefix
        for i, piece in enumerate(pieces):
            if i:
                piece = piece[len(prefix) :] if piece.startswith(prefix) else " " + piece
            for dirty, clean in _CLEANUP:
                piece = piece.replace(dirty, clean)
            out.append(piece)
        return "".join(out)

    # ------------------------------------------------------------------ lookups

    @property
    def vocab_size(self) -> int:
        """Number of tokens (special tokens included)."""
        return len(self._tokens)

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id."""
        return dict(self._ids)

    @property
    def special_tokens(self) -> list[str]:
        """The special tokens, in the order given."""
        return list(self._special)

    @property
    def normalizer(self) -> BertNormalizer:
        """The normalisation applied before pre-tokenisation."""
        return self._normalizer

    @property
    def continuing_subword_prefix(self) -> str:
        """The mark of a piece that continues a word (``"##"``)."""
        return self._prefix

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None if it is not in the vocabulary."""
        return self._ids.get(token)

    def id_to_token(self, idx: int) -> str | None:
        """Token string for ``idx``, or None if out of range."""
        return self._tokens[idx] if 0 <= idx < len(self._tokens) else None

    # ------------------------------------------------------------------ files

    def _settings(self) -> dict[str, Any]:
        norm = self._normalizer
        return {
            "unk_token": self._roles["unk"],
            "special_tokens": list(self._special),
            "pad_token": self._roles["pad"],
            "cls_token": self._roles["cls"],
            "sep_token": self._roles["sep"],
            "mask_token": self._roles["mask"],
            "continuing_subword_prefix": self._prefix,
            "max_input_chars_per_word": self._max_chars,
            "lowercase": norm.lowercase,
            "strip_accents": norm.strip_accents,
            "handle_chinese_chars": norm.handle_chinese_chars,
            "clean_text": norm.clean_text,
        }

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file (``{"type": "wordpiece", "vocab": [...], ...}``)."""
        write_json_file(path, {"type": "wordpiece", "vocab": self._tokens, **self._settings()})

    def save_vocab(self, path: str | Path) -> None:
        """Write BERT's ``vocab.txt``: one token per line, in id order (settings not included)."""
        path = Path(path)
        if any(t != t.strip() or "\n" in t or "\r" in t for t in self._tokens):
            raise LmarchError(
                "a token with surrounding or line-breaking whitespace cannot go in vocab.txt"
            )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(t + "\n" for t in self._tokens), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> WordPieceTokenizer:
        """Read a file written by :meth:`save`; a malformed file raises one :class:`LmarchError`."""
        path = Path(path)
        data = read_tokenizer_file(path, "wordpiece", "WordPiece tokenizer")
        types = {
            "unk_token": str, "pad_token": str, "cls_token": str, "sep_token": str,
            "mask_token": str, "continuing_subword_prefix": str, "max_input_chars_per_word": int,
            "lowercase": bool, "strip_accents": (bool, type(None)),
            "handle_chinese_chars": bool, "clean_text": bool, "special_tokens": list,
        }  # fmt: skip
        options = {}
        for key, kind in types.items():
            if key in data:
                if not isinstance(data[key], kind) or (kind is int and type(data[key]) is bool):
                    raise LmarchError(f'{path}: "{key}" has the wrong type: {data[key]!r}')
                options[key] = data[key]
        try:
            return cls(data.get("vocab"), **options)  # type: ignore[arg-type]
        except LmarchError as exc:
            raise LmarchError(f"bad WordPiece tokenizer file {path}: {exc}") from None

    @classmethod
    def from_vocab_file(cls, path: str | Path, **options: Any) -> WordPieceTokenizer:
        """A tokenizer for BERT's ``vocab.txt`` (one token per line, id = line number).

        ``options`` are the constructor's keyword arguments (``lowercase=False`` for a cased
        model, and so on).
        """
        path = Path(path)
        try:
            return cls(read_vocab_lines(path), **options)
        except LmarchError as exc:
            raise LmarchError(f"bad vocabulary file {path}: {exc}") from None

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> WordPieceTokenizer:
        """A tokenizer for a Hugging Face ``tokenizer.json`` holding a WordPiece model.

        Reads the vocabulary and its settings, the ``BertNormalizer`` flags, the special tokens
        (added tokens marked special) and the ``[CLS]``/``[SEP]`` names from the BERT
        post-processor. Truncation and padding settings in the file are ignored (pass
        ``max_length`` when encoding). Anything else BERT does not use raises :class:`LmarchError`.
        """
        path = Path(path)
        data = read_json_file(path)
        try:
            return cls(**tokenizer_json_options(data))
        except (LmarchError, TypeError, AttributeError, KeyError, ValueError) as exc:
            raise LmarchError(
                f"unsupported or malformed WordPiece tokenizer file {path}: {exc}"
            ) from None

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> WordPieceTokenizer:
        """The tokenizer of a Hugging Face model folder: ``tokenizer.json`` if present, else
        ``vocab.txt`` with the casing and role tokens of ``tokenizer_config.json``."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        if not (folder / "vocab.txt").is_file():
            raise LmarchError(f"no tokenizer.json or vocab.txt in {folder}")
        config_path = folder / "tokenizer_config.json"
        config = read_json_file(config_path) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise LmarchError(f"{config_path}: expected a JSON object")
        options: dict[str, Any] = {
            "lowercase": bool(config.get("do_lower_case", True)),
            "strip_accents": config.get("strip_accents"),
            "handle_chinese_chars": bool(config.get("tokenize_chinese_chars", True)),
        }
        for role in _ROLE_ORDER:
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                options[f"{role}_token"] = value
        present = set(read_vocab_lines(folder / "vocab.txt"))
        names = [options.get(f"{role}_token", f"[{role.upper()}]") for role in _ROLE_ORDER]
        options["special_tokens"] = [name for name in names if name in present]
        return cls.from_vocab_file(folder / "vocab.txt", **options)

    def to_hf_tokenizer(self) -> Any:
        """The same tokenizer as a ``tokenizers.Tokenizer`` (BertNormalizer, BertPreTokenizer,
        WordPiece model and decoder, ``[CLS] $A [SEP] $B [SEP]`` post-processor)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
        from tokenizers.processors import TemplateProcessing

        norm = self._normalizer
        hf = Tokenizer(
            models.WordPiece(
                vocab=dict(self._ids),
                unk_token=self._roles["unk"],
                continuing_subword_prefix=self._prefix,
                max_input_chars_per_word=self._max_chars,
            )
        )
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=norm.clean_text,
            handle_chinese_chars=norm.handle_chinese_chars,
            strip_accents=norm.strip_accents,
            lowercase=norm.lowercase,
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix=self._prefix, cleanup=True)
        hf.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in self._special]
        )
        if self.cls_id is not None and self.sep_id is not None:
            cls, sep = self._roles["cls"], self._roles["sep"]
            hf.post_processor = TemplateProcessing(
                single=f"{cls} $A {sep}",
                pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, self.cls_id), (sep, self.sep_id)],
            )
        return hf
