"""The tokenizers of BART and Marian (OPUS-MT) Hugging Face folders.

BART uses GPT-2's byte-level BPE in RoBERTa's layout: a ``tokenizer.json``, or the older pair
``vocab.json`` + ``merges.txt`` (``<s> <pad> </s> <unk>`` at ids 0-3, ``<mask>`` last).

A Marian folder ships two SentencePiece models, ``source.spm`` for the source language and
``target.spm`` for the target, and one ``vocab.json`` mapping pieces to the model's ids (shared
by both sides). As ``transformers.MarianTokenizer`` does, a source is cut into ``source.spm``'s
pieces, each looked up in ``vocab.json`` (a missing piece is ``<unk>``), and output ids are
turned back into pieces and joined as ``target.spm`` decodes pieces (``▁`` is a space). The end token is the
caller's to add. A folder with a separate target vocabulary (``target_vocab.json``,
``separate_vocabs``) is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.unigram import UnigramTokenizer

_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc


def bart_tokenizer_from_hf_folder(folder: str | Path) -> ByteLevelBPETokenizer:
    """BART's byte-level BPE from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, with
    ``<s>`` / ``</s>`` / ``<pad>`` as BOS / EOS / padding."""
    from lmarch.tokenizers.hf_json import tokenizer_from_hf_folder

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tokenizer = tokenizer_from_hf_folder(folder)[0]
        if not isinstance(tokenizer, ByteLevelBPETokenizer):
            raise LmarchError(f"{folder / 'tokenizer.json'}: a BART folder needs a byte-level BPE")
        return tokenizer
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        raise LmarchError(
            f"{folder}: no tokenizer.json, nor vocab.json + merges.txt",
            hint="a BART folder needs its byte-level BPE files",
        )
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise LmarchError(f"{vocab_path}: expected a JSON object of token -> id")
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise LmarchError(f"{merges_path}, line {number}: expected two tokens")
        merges.append((parts[0], parts[1]))
    special = {t: vocab.pop(t) for t in _ROBERTA_SPECIALS if t in vocab}
    return ByteLevelBPETokenizer(
        vocab,
        merges,
        special,
        bos_token_id=special.get("<s>"),
        eos_token_id=special.get("</s>"),
        pad_token_id=special.get("<pad>"),
    )


class MarianTokenizer:
    """Marian's two SentencePiece models over one shared ``vocab.json`` (module docstring).
    ``encode`` uses the source model, ``decode`` joins pieces; it cannot be saved (a run
    folder fine-tuned from it would not load), which :meth:`save` says in one line."""

    def __init__(self, source: UnigramTokenizer, target: UnigramTokenizer, vocab: dict) -> None:
        self.source, self.target = source, target
        self.vocab = {str(k): int(v) for k, v in vocab.items()}
        self.pieces = {v: k for k, v in self.vocab.items()}
        self.unk_id = self.vocab.get("<unk>")
        self.pad_id = self.vocab.get("<pad>")
        self.eos_id = self.vocab.get("</s>")
        if self.unk_id is None or self.eos_id is None:
            raise LmarchError("Marian vocab.json lacks <unk> or </s>")

    @property
    def vocab_size(self) -> int:
        """Ids the shared vocabulary covers."""
        return max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        """Source ids: ``source.spm``'s pieces looked up in ``vocab.json`` (no end token)."""
        return [self.vocab.get(piece, self.unk_id) for piece in self.source.tokenize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Target text: the pieces of ``ids`` (specials dropped) joined, ``▁`` read as a space,
        as ``target.spm`` decodes pieces."""
        specials = {self.pad_id, self.eos_id}
        pieces = [self.pieces.get(int(i), "") for i in ids if int(i) not in specials]
        return "".join(pieces).replace("\u2581", " ").strip()

    def save(self, path: str | Path) -> None:
        """Refused: a Marian folder's tokenizer is read from the folder, not written."""
        raise LmarchError(
            "a Marian (OPUS-MT) tokenizer cannot be written into a run folder",
            hint="fine-tuning from a Marian folder is not supported; translate run/eval work",
        )


def marian_tokenizer(folder: str | Path) -> MarianTokenizer:
    """The tokenizer of a Marian folder (``source.spm``, ``target.spm``, ``vocab.json``)."""
    folder = Path(folder)
    if (folder / "target_vocab.json").is_file():
        raise LmarchError(
            f"{folder}: Marian with separate source and target vocabularies is not supported",
            hint="folders with one shared vocab.json load",
        )
    missing = [n for n in ("source.spm", "target.spm", "vocab.json") if not (folder / n).is_file()]
    if missing:
        raise LmarchError(
            f"{folder}: a Marian folder needs {', '.join(missing)}",
            hint="OPUS-MT folders ship source.spm, target.spm and vocab.json",
        )
    vocab = _read_json(folder / "vocab.json")
    if not isinstance(vocab, dict):
        raise LmarchError(f"{folder / 'vocab.json'}: expected a JSON object of piece -> id")
    return MarianTokenizer(
        UnigramTokenizer.from_sentencepiece(folder / "source.spm"),
        UnigramTokenizer.from_sentencepiece(folder / "target.spm"),
        vocab,
    )


__all__ = ["MarianTokenizer", "bart_tokenizer_from_hf_folder", "marian_tokenizer"]
