"""Fixtures for the server tests: a tiny seeded LLaMA with a character vocabulary and a chat
template (saved as a run folder, so the server loads it the way users' models load), and a
live server on a loopback port."""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# a minimal chat layout: each turn "<role>text\n", the reply opened with "<assistant>"
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHARS = sorted(set(string.printable) - {"\x0b", "\x0c", "\r"} | {"\x03"})
END = "\x03"  # the end-of-turn character


def tiny_llama_loaded(context: int = 128):
    """A 2-layer LLaMA (4 query / 2 key-value heads, 32 wide), seeded, as a LoadedModel.
    Its output head is scaled up so that greedy choices are far from ties (exact comparisons
    between batched and single decoding then do not hinge on the last bit)."""
    from lmarch.loading import ChatConvention, LoadedModel
    from lmarch.models import Llama, LlamaConfig
    from lmarch.tokenizers.char import CharTokenizer

    torch.manual_seed(0)
    model = Llama(
        LlamaConfig(
            vocab_size=len(CHARS), block_size=context, n_layer=2, n_head=4, n_kv_head=2,
            n_embd=32, intermediate_size=64,
        )
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        model.lm_head.weight[CHARS.index(END)].zero_()  # keep replies going to max_tokens
    tokenizer = CharTokenizer(CHARS)
    chat = ChatConvention(template=TEMPLATE, stop_token_ids=(CHARS.index(END),))
    return LoadedModel(model.eval(), tokenizer, "tiny-llama", "llama", "causal-lm", chat=chat)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama_loaded()`` saved as an lmarch run folder."""
    from lmarch.loading.saving import save_loaded

    out = tmp_path_factory.mktemp("serve") / "tiny-llama"
    save_loaded(tiny_llama_loaded(), out)
    return out


@pytest.fixture(scope="session")
def live_server(tiny_llama_folder: Path) -> Iterator:
    """The tiny LLaMA (loaded from its folder) and MiniLM served on a free loopback port, with
    API key ``sk-test``; yields the BackgroundServer."""
    import lmarch
    from lmarch.serve.server import BackgroundServer
    from lmarch.serve.state import ServeLimits, build_state
    from lmarch.tasks.embed import load_encoder

    loaded = lmarch.load(str(tiny_llama_folder))
    limits = ServeLimits(
        context=128, max_tokens=64, max_batch=4, max_queue=8, max_body_bytes=20_000
    )
    state = build_state(
        loaded, limits, names=("tiny-llama",), encoder=load_encoder("minilm-l6"),
        embed_names=("minilm-l6",), api_key="sk-test",
    )  # fmt: skip
    with BackgroundServer(state) as server:
        yield server


@pytest.fixture
def tiny_llama():
    """``tiny_llama(context)``: :func:`tiny_llama_loaded`, a fresh seeded model each call."""
    return tiny_llama_loaded
