"""lmarch's CLIP tokenizer gives transformers' ``CLIPTokenizer`` ids exactly: lower-casing,
white-space runs, the ``</w>`` end-of-word marker, start/end tokens, padding and truncation —
read from a folder's tokenizer.json and from vocab.json + merges.txt alone."""

from __future__ import annotations

import json

import pytest
import transformers

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import bytes_to_unicode
from lmarch.tokenizers.clip_bpe import clip_tokenizer_from_hf_folder

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "r e", "re d</w>", "s q", "sq u", "squ a",
          "squa r", "squar e</w>", "o n</w>", "m a", "ma t</w>", "re d"]  # fmt: skip
TEXTS = [
    "A red  Square, the cat!",
    "The RED square on a mat",
    "redo 42 cats' squares\ton the\n mat...",
    "ça rouge — é",
]


def write_vocab(folder) -> None:
    """A tiny CLIP-style vocabulary: the 256 byte symbols, the same with </w>, the merges' tokens
    and the two specials (last, as in OpenAI's vocabulary)."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json"])
def test_ids_equal_clip_tokenizer(tmp_path, layout) -> None:
    write_vocab(tmp_path)
    theirs = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    folder = tmp_path
    if layout == "tokenizer_json":
        folder = tmp_path / "saved"
        theirs.save_pretrained(folder)
        assert (folder / "tokenizer.json").is_file() and not (folder / "merges.txt").exists()
    ours = clip_tokenizer_from_hf_folder(folder)
    ref = theirs(TEXTS, padding=True)
    got = ours.encode_batch(TEXTS)
    assert got["input_ids"] == ref["input_ids"]
    assert got["attention_mask"] == ref["attention_mask"]
    assert ref["input_ids"][0][:3] == [ours.token_to_id("<|startoftext|>"), 353, 517]
    cut = theirs(TEXTS, padding="max_length", truncation=True, max_length=7)
    assert ours.encode_batch(TEXTS, max_length=7)["input_ids"] == cut["input_ids"]
    for row in ref["input_ids"]:
        assert ours.decode(row) == theirs.decode(row, skip_special_tokens=True)
    assert ours.decode(ref["input_ids"][1]) == "the red square on a mat"


def test_missing_files_are_one_error(tmp_path) -> None:
    with pytest.raises(LmarchError, match="no CLIP tokenizer"):
        clip_tokenizer_from_hf_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(LmarchError, match="no <\\|startoftext\\|> token"):
        clip_tokenizer_from_hf_folder(tmp_path)
