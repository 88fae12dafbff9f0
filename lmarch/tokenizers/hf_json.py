"""Reading a Hugging Face ``tokenizer.json`` (byte-level BPE or WordPiece) into our tokenizer.

The file holds the BPE model (vocab and merges), the pre-tokenizer (how text is cut before
merging), and the added tokens; ``tokenizer_config.json`` beside it names the roles (BOS, EOS)
and carries the chat template. Byte-level BPE vocabularies (GPT-2, LLaMA 3, SmolLM2 ...) are
read with their pre-tokenizer translated into one split regex; WordPiece ones (BERT and its
kin) go to :meth:`WordPieceTokenizer.from_tokenizer_json`.

An encoder's folder (:func:`encoder_tokenizer_from_hf_folder`) may hold a Unigram model: one
converted from sentencepiece, or a bare ``spiece.model``, is read by
:mod:`~lmarch.tokenizers.unigram_hf`; one whose pipeline lmarch has no written-out reader for (ALBERT's
with its lower-casing steps) is run by the ``tokenizers`` library itself through
:class:`~lmarch.tokenizers.hf_fallback.HFTokenizersFallback`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import GPT2_SPLIT_PATTERN, ByteLevelBPETokenizer
from lmarch.tokenizers.gguf_vocab import SMOLLM_SPLIT_PATTERN
from lmarch.tokenizers.hf_fallback import HFTokenizersFallback
from lmarch.tokenizers.unigram import UnigramTokenizer
from lmarch.tokenizers.unigram_hf import unigram_tokenizer_from_hf_folder
from lmarch.tokenizers.wordpiece import WordPieceTokenizer


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc


def _split_pattern(pre: dict | None, where: Path) -> str:
    """The regex equivalent to a ``tokenizers`` pre-tokenizer we understand."""
    if pre is None:
        raise LmarchError(f"{where}: no pre_tokenizer; only byte-level BPE is supported")
    kind = pre.get("type")
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else [pre]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        # the library would put a space before the text; our tokenizer never does
        raise LmarchError(f"{where}: a ByteLevel pre_tokenizer with add_prefix_space is not read")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_SPLIT_PATTERN
    if kind == "Sequence":
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return SMOLLM_SPLIT_PATTERN
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex:
                return regex
    raise LmarchError(f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:120]}")


def _processor_token_id(post: dict, key: str, configured: int | None, where: Path) -> int:
    """The id of the ``cls`` or ``sep`` token of a RobertaProcessing post-processor, checked
    against the one ``tokenizer_config.json`` gives for the same role."""
    try:
        token_id = int(post[key][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise LmarchError(f"{where}: malformed RobertaProcessing {key!r}") from None
    if configured is not None and configured != token_id:
        raise LmarchError(
            f"{where}: the post-processor's {key} token is id {token_id}, "
            f"but tokenizer_config.json names id {configured}"
        )
    return token_id


def tokenizer_from_hf_folder(
    folder: str | Path,
) -> tuple[ByteLevelBPETokenizer | WordPieceTokenizer, dict[str, Any]]:
    """Our tokenizer for ``folder/tokenizer.json``, and what ``tokenizer_config.json`` says:
    ``chat_template``, ``bos_token_id``, ``stop_token_ids`` (EOS), ``add_bos``.

    A WordPiece model gives a :class:`WordPieceTokenizer` (with no BOS, EOS or chat template).
    A byte-level BPE with RoBERTa's post-processor takes its ``<s>`` and ``</s>`` as BOS and EOS
    (and so as ``cls_id`` and ``sep_id`` for ``encode_batch``) and ``<pad>`` as padding, unless
    ``tokenizer_config.json`` says otherwise.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LmarchError(f"no tokenizer.json in {folder}")
    data = _read(path)
    model = data.get("model") or {}
    if isinstance(model, dict) and model.get("type") == "WordPiece":
        info = {"chat_template": None, "bos_token_id": None, "stop_token_ids": [], "add_bos": False}
        return WordPieceTokenizer.from_hf_folder(folder), info
    if model.get("type") != "BPE":
        raise LmarchError(f"{path}: model type {model.get('type')!r} is not BPE")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    special, added = {}, {}
    for tok in data.get("added_tokens") or []:
        vocab.pop(tok["content"], None)
        (special if tok.get("special") else added)[tok["content"]] = tok["id"]
    config = (
        _read(folder / "tokenizer_config.json")
        if (folder / "tokenizer_config.json").is_file()
        else {}
    )

    def role(name: str) -> int | None:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return {**vocab, **special, **added}.get(value) if value else None

    # RoBERTa's post-processor names its <s> and </s>: the BOS and EOS when the config does not
    post = data.get("post_processor")
    post = post if isinstance(post, dict) else {}
    bos, eos, pad = role("bos_token"), role("eos_token"), role("pad_token")
    if post.get("type") == "RobertaProcessing":
        bos = _processor_token_id(post, "cls", bos, path)
        eos = _processor_token_id(post, "sep", eos, path)
        if pad is None:
            pad = special.get("<pad>")

    tokenizer = ByteLevelBPETokenizer(
        vocab,
        merges,
        special,
        added_tokens=added,
        pattern=_split_pattern(data.get("pre_tokenizer"), path),
        ignore_merges=bool(model.get("ignore_merges", False)),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    info = {
        "chat_template": config.get("chat_template"),
        "bos_token_id": bos,
        "stop_token_ids": [eos] if eos is not None else [],
        "add_bos": bool(config.get("add_bos_token", False)),
    }
    return tokenizer, info


def _reads_as_roberta(data: dict) -> bool:
    """Whether our byte-level BPE reproduces this ``tokenizer.json`` as an encoder's tokenizer:
    no normaliser, GPT-2's ByteLevel pre-tokenizer without an added prefix space, and RoBERTa's
    ``<s> A </s>`` post-processor."""
    pre = data.get("pre_tokenizer")
    post = data.get("post_processor")
    return (
        data.get("normalizer") is None
        and isinstance(pre, dict)
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and isinstance(post, dict)
        and post.get("type") == "RobertaProcessing"
    )


def encoder_tokenizer_from_hf_folder(
    folder: str | Path,
) -> WordPieceTokenizer | ByteLevelBPETokenizer | UnigramTokenizer | HFTokenizersFallback:
    """The tokenizer of a BERT-family folder, with ``encode_batch`` and the ``cls_id`` /
    ``sep_id`` / ``pad_id`` an encoder needs.

    - a WordPiece ``tokenizer.json``, or no ``tokenizer.json`` but a ``vocab.txt`` (BERT,
      ELECTRA): :class:`WordPieceTokenizer`;
    - a byte-level BPE with RoBERTa's post-processor: :class:`ByteLevelBPETokenizer`;
    - a Unigram model converted from sentencepiece (charsmap and Metaspace only), or no
      ``tokenizer.json`` but a ``spiece.model``: :class:`UnigramTokenizer`;
    - anything else (ALBERT's Unigram with its lower-casing steps, a BPE with a normaliser ...):
      the ``tokenizers`` library's own implementation, :class:`HFTokenizersFallback`.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "spiece.model").is_file():
            return unigram_tokenizer_from_hf_folder(folder)
        return WordPieceTokenizer.from_hf_folder(folder)
    data = _read(path)
    if not isinstance(data, dict):
        raise LmarchError(f"{path}: expected a JSON object")
    model = data.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind == "WordPiece":
        return WordPieceTokenizer.from_hf_folder(folder)
    if kind == "BPE" and _reads_as_roberta(data):
        tokenizer = tokenizer_from_hf_folder(folder)[0]
        assert isinstance(tokenizer, ByteLevelBPETokenizer)
        return tokenizer
    if kind == "Unigram":
        try:
            return unigram_tokenizer_from_hf_folder(folder)
        except LmarchError:  # a pipeline lmarch does not reproduce: the library's own
            pass
    return HFTokenizersFallback.from_hf_folder(folder)
