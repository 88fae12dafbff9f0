"""Word-vector files: the word2vec text and binary formats and GloVe's text format.

The three layouts, as the original tools write them (Mikolov et al.'s ``word2vec.c``,
Pennington et al.'s ``glove.c``) and as gensim reads them:

- **word2vec text**: a header line ``"V d"``, then ``V`` lines ``word v1 ... vd`` (decimal
  numbers, single spaces).
- **word2vec binary**: the same header line, then for each word its UTF-8 bytes, one space, and
  ``d`` little-endian float32 numbers (``4 d`` bytes). ``word2vec.c`` writes a newline after each
  vector, gensim does not; a reader strips newlines at the start of a word, so both read alike.
- **GloVe text**: the word2vec text rows without the header line.

Reading follows gensim 4.4's ``KeyedVectors.load_word2vec_format`` exactly where the file is well
formed: a line is stripped of trailing whitespace (``\\r\\n`` endings read too) and split at
single spaces; numbers become float32 as ``numpy.float32(text)`` makes them (through float64); a
word seen twice keeps its first vector. Where gensim would stop with a bare exception, a count or a
number that does not fit, or ignore data after the declared count, this module raises one
:class:`~lmarch.errors.LmarchError` naming the file and the line (text) or byte offset (binary).
Blank lines in text files are skipped.

Writing goes through a temporary file renamed into place. Numbers in text files are written in
the shortest form that reads back to the same float32 (numpy's ``str``), so a text round trip is
exact. Words must be non-empty and hold no ASCII whitespace: such a word cannot be read back from
any of the three layouts.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lmarch.classic.vectors import WordVectors
from lmarch.errors import LmarchError, LmarchNotice
from lmarch.weights.safetensors_io import atomic_write

FORMATS = ("word2vec-text", "word2vec-binary", "glove")
"""The layouts :func:`read_vectors` and :func:`write_vectors` know, by name."""

_FORMAT_HINT = (
    "expected a word2vec text or binary file (header 'COUNT DIM') or GloVe text "
    "('word v1 ... vd' rows, no header)"
)
_ASCII_SPACE = frozenset(" \t\n\r\v\f")
_BLOCK_ROWS = 4096  # text rows converted to numbers at a time


class HasWordVectors(Protocol):
    """Anything with a word list and a [V, d] tensor, as :class:`WordVectors` has."""

    words: Sequence[str]
    vectors: torch.Tensor


# --- detection ----------------------------------------------------------------------------------


def _parse_header(line: bytes) -> tuple[int, int] | None:
    """``(V, d)`` when ``line`` is a word2vec header (two non-negative integers), else None."""
    parts = line.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def _is_text_row(line: bytes, dim: int | None) -> bool:
    """Whether ``line`` reads as ``word v1 ... vd`` (``dim`` numbers when given, at least one
    otherwise)."""
    try:
        parts = line.decode("utf-8", errors="replace").rstrip().split(" ")
        numbers = [float(p) for p in parts[1:] if p]
    except ValueError:
        return False
    return len(numbers) > 0 and (dim is None or len(numbers) == dim)


def detect_format(path: str | Path) -> str:
    """The layout of the vector file at ``path``: ``"word2vec-text"``, ``"word2vec-binary"`` or
    ``"glove"``, judged from its first two lines.

    A first line of two integers is a word2vec header; the record after it is text when it
    splits into a word and ``d`` decimal numbers, binary otherwise. A first line that is itself a
    row of a word and numbers makes a GloVe file. Anything else raises :class:`LmarchError`.
    """
    path = Path(path)
    with _open(path) as f:
        first = f.readline(1 << 20)
        second = f.readline(1 << 20)
    if not first.strip():
        raise LmarchError(f"{path} is empty, not a vector file", hint=_FORMAT_HINT)
    header = _parse_header(first)
    if header is not None:
        return "word2vec-text" if _is_text_row(second, header[1]) else "word2vec-binary"
    if _is_text_row(first, None):
        return "glove"
    raise LmarchError(
        f"{path}, line 1: neither a word2vec header nor a 'word v1 ... vd' row",
        hint=_FORMAT_HINT,
    )


def _open(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise LmarchError(f"vector file not found: {path}") from None
    except OSError as exc:
        raise LmarchError(f"cannot read {path}: {exc.strerror or exc}") from exc


# --- reading ------------------------------------------------------------------------------------


def read_vector_arrays(
    path: str | Path,
    format: str = "auto",
    *,
    errors: str = "strict",
    limit: int | None = None,
) -> tuple[list[str], torch.Tensor]:
    """The words and float32 ``[V, d]`` vectors of a vector file, in file order.

    ``format`` is one of :data:`FORMATS` or ``"auto"`` (:func:`detect_format`). ``errors`` is how
    bytes that are not UTF-8 in a word are handled (``"strict"`` refuses them; ``"replace"`` or
    ``"ignore"`` read files whose words ``word2vec.c`` cut inside a character, as gensim's
    ``unicode_errors``). ``limit`` reads only the first that many vectors.
    """
    path = Path(path)
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise LmarchError(
            f"unknown vector format {format!r}", hint=f"one of auto, {', '.join(FORMATS)}"
        )
    with _open(path) as f:
        data = f.read()
    if format == "word2vec-binary":
        words, array = _read_binary(path, data, errors, limit)
    else:
        words, array = _read_text(path, data, format == "word2vec-text", errors, limit)
    return _drop_duplicates(path, words, array)


def read_vectors(
    path: str | Path,
    format: str = "auto",
    *,
    errors: str = "strict",
    limit: int | None = None,
) -> WordVectors:
    """A vector file as :class:`~lmarch.classic.vectors.WordVectors` (see
    :func:`read_vector_arrays` for the options)."""
    words, vectors = read_vector_arrays(path, format, errors=errors, limit=limit)
    return WordVectors(words, vectors)


def _decode(path: Path, raw: bytes, errors: str, where: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise LmarchError(
            f"{path}, {where}: a word is not valid UTF-8 ({raw[:40]!r})",
            hint="read it with errors='replace' (word2vec.c may cut a word inside a character)",
        ) from exc


def _check_header(path: Path, header: tuple[int, int], size: int, min_row: int) -> None:
    count, dim = header
    if count == 0 or dim == 0:
        raise LmarchError(f"{path}: its header declares {count} vectors of dimension {dim}")
    # each row holds at least its numbers, so a header larger than the file is damage, caught
    # before anything of that size is allocated
    if count * (dim * min_row + 2) > size:
        raise LmarchError(
            f"{path}: its header declares {count} vectors of dimension {dim}, more than its "
            f"{size} bytes can hold (truncated or not a vector file)",
            hint=_FORMAT_HINT,
        )


def _read_text(
    path: Path, data: bytes, has_header: bool, errors: str, limit: int | None
) -> tuple[list[str], np.ndarray]:
    lines = data.split(b"\n")
    start, count, dim = 0, None, None
    if has_header:
        header = _parse_header(lines[0])
        if header is None:
            raise LmarchError(
                f"{path}, line 1: not a word2vec header 'COUNT DIM'", hint=_FORMAT_HINT
            )
        _check_header(path, header, len(data), min_row=2)
        count, dim = header
        start = 1
    wanted = count if limit is None else min(limit, count or limit)
    words: list[str] = []
    blocks: list[np.ndarray] = []
    tokens: list[str] = []  # numbers of the rows not yet converted
    rows: list[int] = []  # line number of each of those rows, for messages

    def convert() -> None:
        # a block at a time, so a large file never holds all its numbers as Python strings
        try:
            array = np.array(tokens, dtype=np.float64)
        except ValueError:
            bad = next(i for i, t in enumerate(tokens) if not _is_float(t))
            raise LmarchError(
                f"{path}, line {rows[bad // dim]}: {tokens[bad]!r} is not a number",
                hint=_FORMAT_HINT,
            ) from None
        # float64 first, then float32: the rounding numpy.float32(text) does, as gensim reads
        blocks.append(array.astype(np.float32).reshape(len(rows), dim))
        tokens.clear()
        rows.clear()

    for number in range(start, len(lines)):
        raw = lines[number]
        if not raw.strip():
            continue
        if wanted is not None and len(words) == wanted:
            if limit is None:
                raise LmarchError(
                    f"{path}, line {number + 1}: more rows than the {count} its header declares",
                    hint="the header's count is wrong or the file is damaged",
                )
            break
        parts = _decode(path, raw, errors, f"line {number + 1}").rstrip().split(" ")
        numbers = [p for p in parts[1:] if p]
        if dim is None:
            dim = len(numbers)
            if dim == 0:
                raise LmarchError(f"{path}, line {number + 1}: a word with no numbers")
        if len(numbers) != dim:
            raise LmarchError(
                f"{path}, line {number + 1}: {len(numbers)} numbers where {dim} were expected",
                hint="every row must hold the same number of values",
            )
        words.append(parts[0])
        tokens.extend(numbers)
        rows.append(number + 1)
        if len(rows) == _BLOCK_ROWS:
            convert()
    if not words:
        raise LmarchError(f"{path} holds no vectors", hint=_FORMAT_HINT)
    if wanted is not None and len(words) < wanted:
        last = len(lines) - (lines[-1] == b"")
        raise LmarchError(
            f"{path}, line {last}: the file ends after {len(words)} of the {wanted} rows its "
            "header declares (truncated?)"
        )
    if rows:
        convert()
    return words, np.concatenate(blocks)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_binary(
    path: Path, data: bytes, errors: str, limit: int | None
) -> tuple[list[str], np.ndarray]:
    end = data.find(b"\n")
    header = _parse_header(data[: end if end >= 0 else 0])
    if header is None:
        raise LmarchError(f"{path}, line 1: not a word2vec header 'COUNT DIM'", hint=_FORMAT_HINT)
    _check_header(path, header, len(data), min_row=4)
    count, dim = header
    wanted = count if limit is None else min(limit, count)
    width = 4 * dim
    words: list[str] = []
    offsets = np.empty(wanted, dtype=np.int64)
    pos = end + 1
    for i in range(wanted):
        # word2vec.c ends each vector with a newline, gensim does not: skip it before a word
        while data[pos : pos + 1] == b"\n":
            pos += 1
        space = data.find(b" ", pos)
        if space < 0 or space + 1 + width > len(data):
            raise LmarchError(
                f"{path}, byte {pos}: ends inside vector {i + 1} of the {count} its header "
                "declares (truncated?)"
            )
        words.append(_decode(path, data[pos:space], errors, f"byte {pos}"))
        offsets[i] = space + 1
        pos = space + 1 + width
    rest = data[pos:]
    if limit is None and rest.strip():
        pos += len(rest) - len(rest.lstrip())
        raise LmarchError(
            f"{path}, byte {pos}: data after the {count} vectors its header declares",
            hint="the header's count is wrong or the file is damaged",
        )
    # one gather for all rows: byte offsets of every float of every vector
    raw = np.frombuffer(data, dtype=np.uint8)
    index = offsets[:, None] + np.arange(width, dtype=np.int64)[None, :]
    array = raw[index].view("<f4").astype(np.float32).reshape(wanted, dim)
    return words, array


def _drop_duplicates(
    path: Path, words: list[str], array: np.ndarray
) -> tuple[list[str], torch.Tensor]:
    seen: dict[str, int] = {}
    keep = []
    for i, word in enumerate(words):
        if word not in seen:
            seen[word] = i
            keep.append(i)
    if len(keep) < len(words):
        # gensim does the same (first one wins); the user should still hear of it
        warnings.warn(
            f"{path}: {len(words) - len(keep)} repeated words; the first vector of each is kept",
            LmarchNotice,
            stacklevel=3,
        )
        words = [words[i] for i in keep]
        array = array[keep]
    return words, torch.from_numpy(np.ascontiguousarray(array))


# --- writing ------------------------------------------------------------------------------------


def _checked_words(words: Sequence[str], count: int) -> list[str]:
    words = list(words)
    if len(words) != count:
        raise LmarchError(f"{len(words)} words for {count} vectors")
    if len(set(words)) != len(words):
        raise LmarchError("the word list repeats a word: a vector file keeps one vector per word")
    for word in words:
        if not word or any(ch in _ASCII_SPACE for ch in word):
            raise LmarchError(
                f"the word {word!r} cannot be written to a vector file",
                hint="words must be non-empty and hold no spaces, tabs or newlines",
            )
    return words


def write_vectors(vectors: HasWordVectors, path: str | Path, format: str = "glove") -> Path:
    """Write ``vectors`` (``.words``, float ``[V, d]`` ``.vectors``) to ``path`` in ``format``
    (one of :data:`FORMATS`), atomically; return the path.

    Text numbers are float32 in their shortest exact decimal form; binary rows are the word,
    a space, ``4 d`` little-endian float32 bytes and a newline, as ``word2vec.c`` writes them.
    """
    if format not in FORMATS:
        raise LmarchError(f"unknown vector format {format!r}", hint=f"one of {', '.join(FORMATS)}")
    array = vectors.vectors.detach().to("cpu", torch.float32).numpy()
    if array.ndim != 2:
        raise LmarchError(f"vectors must be a [V, d] matrix, got shape {tuple(array.shape)}")
    words = _checked_words(vectors.words, array.shape[0])
    header = f"{array.shape[0]} {array.shape[1]}\n".encode()

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            if format != "glove":
                f.write(header)
            # a block of rows per write: few calls, bounded memory
            for s in range(0, len(words), _BLOCK_ROWS):
                block, names = array[s : s + _BLOCK_ROWS], words[s : s + _BLOCK_ROWS]
                if format == "word2vec-binary":
                    rows = block.astype("<f4")
                    f.write(
                        b"".join(
                            w.encode() + b" " + r.tobytes() + b"\n" for w, r in zip(names, rows)
                        )
                    )
                    continue
                # numpy's str of a float32 is its shortest repr that reads back exactly
                texts = block.astype(str).tolist()
                f.write(
                    "".join(w + " " + " ".join(r) + "\n" for w, r in zip(names, texts)).encode()
                )

    atomic_write(path, write)
    return Path(path)
