"""SmolLM2 (real weights, its GGUF chat template and end-of-turn token) served with batching:
concurrent chat answers equal lmarch's own one-at-a-time greedy chat, word for word."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What do bees make?"]


def test_concurrent_chat_equals_single_greedy_chat() -> None:
    import openai

    import lmarch
    from lmarch.generation import SamplingConfig
    from lmarch.serve.server import BackgroundServer
    from lmarch.serve.state import ServeLimits, build_state
    from lmarch.tasks.chat import ChatSession

    loaded = lmarch.load("smollm2-135m", context=256)
    want = []
    for question in QUESTIONS:
        session = ChatSession(loaded, SamplingConfig(temperature=0.0), max_new_tokens=16)
        want.append("".join(session.send(question)))
    state = build_state(loaded, ServeLimits(context=256, max_batch=4), names=("smollm2",))
    got: dict[int, str] = {}
    with BackgroundServer(state) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

        def ask(i: int) -> None:
            out = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": QUESTIONS[i]}],
                max_tokens=16, temperature=0,
            )  # fmt: skip
            got[i] = out.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts = state.scheduler.counters()
    assert [got[i] for i in range(len(QUESTIONS))] == want
    assert "Paris" in want[0]
    assert counts["decode_rows"] > counts["decode_calls"]  # some steps carried several rows
