"""Reading a Hugging Face ``tokenizer.json`` (byte-level BPE or WordPiece) into our tokenizer.

The file holds the BPE model (vocab and merges), the pre-tokenizer (how text is cut before
merging), and the added tokens; ``tokenizer_config.json`` beside it names the roles (BOS, EOS)
and carries the chat template. Byte-level BPE vocabularies (GPT-2, LLaMA 3, SmolLM2 ...) are
read with their pre-tokenizer translated into one split regex; WordPiece ones (BERT and its
kin) go to :meth:`WordPieceTokenizer.from_tokenizer_json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import GPT2_SPLIT_PATTERN, ByteLevelBPETokenizer
from lmarch.tokenizers.gguf_vocab import SMOLLM_SPLIT_PATTERN
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
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_SPLIT_PATTERN
    if kind == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return SMOLLM_SPLIT_PATTERN
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex:
                return regex
    raise LmarchError(f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:120]}")


def tokenizer_from_hf_folder(
    folder: str | Path,
) -> tuple[ByteLevelBPETokenizer | WordPieceTokenizer, dict[str, Any]]:
    """Our tokenizer for ``folder/tokenizer.json``, and what ``tokenizer_config.json`` says:
    ``chat_template``, ``bos_token_id``, ``stop_token_ids`` (EOS), ``add_bos``.

    A WordPiece model gives a :class:`WordPieceTokenizer` (with no BOS, EOS or chat template).
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

    tokenizer = ByteLevelBPETokenizer(
        vocab,
        merges,
        special,
        added_tokens=added,
        pattern=_split_pattern(data.get("pre_tokenizer"), path),
        ignore_merges=bool(model.get("ignore_merges", False)),
        bos_token_id=role("bos_token"),
        eos_token_id=role("eos_token"),
    )
    eos = role("eos_token")
    info = {
        "chat_template": config.get("chat_template"),
        "bos_token_id": role("bos_token"),
        "stop_token_ids": [eos] if eos is not None else [],
        "add_bos": bool(config.get("add_bos_token", False)),
    }
    return tokenizer, info
