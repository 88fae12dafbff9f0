"""A Hugging Face folder's decoding defaults: ``generation_config.json`` (or, in older
folders, the same keys in ``config.json``), read as the settings of lmarch's beam search.

A released model's folder says how its authors decode it: Marian's opus-mt folders ban the
padding token (``bad_words_ids``, which is also the decoder start token) and renormalise, and
search 4 beams; bart-large-cnn asks for 4 beams, a length penalty of 2, no repeated trigram and
56-142 tokens. ``transformers`` applies these whenever ``generate`` is called without them;
lmarch's ``translate`` / ``summarize`` commands do the same, and a flag given on the command line
wins. Lengths in these files count the decoder's start token (``max_length`` = 1 + new tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError

GENERATION_FILE = "generation_config.json"

# keys whose value lmarch's search takes as it is (BeamSearchConfig field names)
_SAME_NAME = (
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
    "bad_words_ids",
    "renormalize_logits",
)
# keys that would change the output but that lmarch's seq2seq decoding does not implement;
# each is named in a notice when a folder sets it away from its neutral value
UNSUPPORTED = {
    "do_sample": False,
    "repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_decoder_ids": None,
    "exponential_decay_length_penalty": None,
}


def read_generation_defaults(folder: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(decoding settings, ignored keys) of an HF model folder: :data:`_SAME_NAME` keys as
    they are, ``max_length`` / ``min_length`` as new-token counts (minus the start token), and
    the names of the :data:`UNSUPPORTED` keys the folder sets. A folder with neither file gives
    ``({}, [])``; an unreadable file is refused by name."""
    folder = Path(folder)
    path = folder / GENERATION_FILE
    if not path.is_file():
        path = folder / "config.json"
        if not path.is_file():
            return {}, []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LmarchError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise LmarchError(f"{path}: expected a JSON object")
    settings = {key: raw[key] for key in _SAME_NAME if raw.get(key) is not None}
    if "max_new_tokens" not in settings and raw.get("max_length") is not None:
        settings["max_new_tokens"] = max(1, int(raw["max_length"]) - 1)
    if "min_new_tokens" not in settings and raw.get("min_length"):
        settings["min_new_tokens"] = max(0, int(raw["min_length"]) - 1)
    ignored = [
        key
        for key, neutral in UNSUPPORTED.items()
        if raw.get(key) is not None and raw.get(key) != neutral
    ]
    return settings, ignored
