"""CLIP's tokenizer: byte-level BPE over lower-cased words with an end-of-word marker.

OpenAI's CLIP tokenizer (Radford et al. 2021, sec. 2.4: "a lower-cased byte pair encoding ...
with a 49,152 vocab size") differs from GPT-2's in three ways: text is NFC-normalised, runs of
white space become one space and everything is lower-cased; words are split by their own pattern
(letters, single digits, punctuation runs) with no leading space; and the last piece of each
word carries a ``</w>`` suffix, so "red" and the "red" inside "redo" are different tokens.
Every text is wrapped as ``<|startoftext|> ... <|endoftext|>`` and padded with
``<|endoftext|>``.

lmarch's own byte-level BPE has no end-of-word suffix, so this reads CLIP folders with the
``tokenizers`` library (:class:`~lmarch.tokenizers.hf_fallback.HFTokenizersFallback`): the
folder's ``tokenizer.json`` when it has one, else its ``vocab.json`` + ``merges.txt`` assembled
into the pipeline above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.hf_fallback import HFTokenizersFallback

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _decoder() -> Any:
    """Bytes back to text, each ``</w>`` a space, the last one dropped."""
    from tokenizers import decoders

    return decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )


def clip_pipeline(vocab: dict[str, int], merges: list[str]) -> Any:
    """A ``tokenizers.Tokenizer`` doing what CLIP's tokenizer does (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    for special in (BOS, EOS):
        if special not in vocab:
            raise LmarchError(f"CLIP vocabulary has no {special} token")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise LmarchError("CLIP merges.txt: every line must hold two tokens")
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False
    )
    tok.decoder = _decoder()
    return tok


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc


def clip_tokenizer_from_hf_folder(folder: str | Path) -> HFTokenizersFallback:
    """The CLIP tokenizer of a Hugging Face folder (``tokenizer.json``, or ``vocab.json`` and
    ``merges.txt``); ``encode_batch`` gives ``<|startoftext|> ... <|endoftext|>`` rows padded
    with ``<|endoftext|>`` and their attention masks, as ``CLIPTokenizer`` does."""
    folder = Path(folder)
    roles = {"pad": EOS, "unk": EOS}
    if (folder / "tokenizer.json").is_file():
        tokenizer = HFTokenizersFallback.from_hf_folder(folder)
        hf = tokenizer.to_hf_tokenizer()
        hf.decoder = _decoder()  # transformers strips </w> outside the file's decoder
        return HFTokenizersFallback(hf, {**roles, **tokenizer._roles})
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not vocab_path.is_file() or not merges_path.is_file():
        raise LmarchError(
            f"no CLIP tokenizer in {folder}",
            hint="expected tokenizer.json or vocab.json + merges.txt",
        )
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise LmarchError(f"{vocab_path}: expected a JSON object of token -> id")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LmarchError(f"cannot read {merges_path}: {exc}") from exc
    merges = [m for m in lines if m and not m.startswith("#version")]
    return HFTokenizersFallback(clip_pipeline(vocab, merges), roles)


__all__ = ["BOS", "CLIP_SPLIT", "EOS", "clip_pipeline", "clip_tokenizer_from_hf_folder"]
