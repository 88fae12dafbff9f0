"""lmarch.weights.hf_generation: a folder's decoding defaults, as transformers reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmarch.errors import LmarchError
from lmarch.weights.hf_generation import read_generation_defaults


def test_generation_config_lengths_count_the_start_token(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "num_beams": 4,
                "max_length": 142,
                "min_length": 56,
                "length_penalty": 2.0,
                "no_repeat_ngram_size": 3,
                "early_stopping": True,
                "bad_words_ids": [[58100]],
                "renormalize_logits": True,
                "do_sample": False,
                "decoder_start_token_id": 2,
            }  # fmt: skip
        )
    )
    settings, ignored = read_generation_defaults(tmp_path)
    assert settings == {
        "num_beams": 4, "max_new_tokens": 141, "min_new_tokens": 55, "length_penalty": 2.0,
        "no_repeat_ngram_size": 3, "early_stopping": True, "bad_words_ids": [[58100]],
        "renormalize_logits": True,
    }  # fmt: skip
    assert ignored == []


def test_old_folders_keep_the_settings_in_config_json(tmp_path: Path) -> None:
    """Without generation_config.json the same keys are read from config.json (as
    transformers' GenerationConfig.from_model_config does); max_new_tokens beats max_length."""
    (tmp_path / "config.json").write_text(
        json.dumps({"num_beams": 2, "max_length": 50, "max_new_tokens": 7, "d_model": 8})
    )
    assert read_generation_defaults(tmp_path) == ({"num_beams": 2, "max_new_tokens": 7}, [])
    assert read_generation_defaults(tmp_path / "nothing") == ({}, [])


def test_settings_lmarch_does_not_apply_are_named(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "repetition_penalty": 1.0, "num_beam_groups": 2})
    )
    assert read_generation_defaults(tmp_path)[1] == ["do_sample", "num_beam_groups"]


def test_an_unreadable_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(LmarchError, match="generation_config.json: not a readable JSON"):
        read_generation_defaults(tmp_path)
