"""The HTTP API through the official ``openai`` client and raw HTTP: every route, streaming,
and every refusal in OpenAI's error shape (the server keeps serving after each)."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from lmarch.generation.generate import GREEDY, generate

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="sk-test", max_retries=0)


def greedy_text(live_server, prompt_ids: list[int], n: int) -> str:
    """The oracle: lmarch's one-sequence greedy decoding of the served model."""
    loaded = live_server.state.loaded
    ids = generate(loaded.model, torch.tensor([prompt_ids]), n, GREEDY)[0, len(prompt_ids) :]
    return loaded.tokenizer.decode(ids.tolist())


def test_models_and_health(client, live_server) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "minilm-l6"]
    health = httpx.get(live_server.url + "/health").json()
    assert health["status"] == "ok" and health["context"] == 128 and health["max_batch"] == 4


def test_completion_equals_greedy_decoding(client, live_server) -> None:
    out = client.completions.create(
        model="tiny-llama", prompt="To be", max_tokens=12, temperature=0
    )
    choice = out.choices[0]
    ids = live_server.state.loaded.encode_prompt("To be")
    assert choice.text == greedy_text(live_server, ids, 12)
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 12)
    streamed = client.completions.create(
        model="tiny-llama", prompt="To be", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_chat_stream_matches_whole_reply_and_ends_with_done(client, live_server) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=15, temperature=0
    )
    prompt = live_server.state.loaded.encode_prompt("<system>Be brief.\n<user>Hi\n<assistant>")
    assert whole.choices[0].message.content == greedy_text(live_server, prompt, 15)
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=15, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15
    raw = httpx.post(
        live_server.url + "/v1/chat/completions", headers=KEY,
        json={"model": "tiny-llama", "messages": messages, "max_tokens": 3, "stream": True},
    )  # fmt: skip
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_logprobs_top_alternatives_stop_and_n(client, live_server) -> None:
    out = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "abc"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:  # greedy: the chosen token is the likeliest alternative
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    text = out.choices[0].message.content
    assert "".join(e.token for e in content) == text
    cut = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "abc"}], max_tokens=6,
        temperature=0, stop=[text[3:5]],
    )  # fmt: skip
    assert cut.choices[0].message.content == text[:3] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(
        model="tiny-llama", prompt="x", max_tokens=8, temperature=1.0, n=3, seed=11, logprobs=2
    )
    again = client.completions.create(
        model="tiny-llama", prompt="x", max_tokens=8, temperature=1.0, n=3, seed=11, logprobs=2
    )
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert len({c.text for c in many.choices}) > 1  # seeds seed, seed+1, ...: different draws
    assert len(many.choices[0].logprobs.tokens) == 8
    assert all(len(top) == 2 for top in many.choices[0].logprobs.top_logprobs)


def test_embeddings_equal_the_embed_task(client, live_server) -> None:
    from lmarch.tasks.embed import embed_texts

    texts = ["a dog runs", "the cat sleeps"]
    out = client.embeddings.create(model="minilm-l6", input=texts)  # base64 on the wire
    got = np.array([d.embedding for d in out.data])
    want = embed_texts(live_server.state.encoder, texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
    plain = httpx.post(
        live_server.url + "/v1/embeddings", headers=KEY,
        json={"model": "minilm-l6", "input": "a dog runs", "encoding_format": "float"},
    ).json()  # fmt: skip
    np.testing.assert_allclose(plain["data"][0]["embedding"], want[0], atol=1e-6)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "nope", "prompt": "hi"}, 400, "unknown model 'nope'"),
        ({"model": "tiny-llama", "prompt": 5}, 422, "prompt"),
        ({"model": "tiny-llama", "prompt": "hi", "temperature": "hot"}, 422, "temperature"),
        ({"model": "tiny-llama", "prompt": "hi", "max_tokens": 65}, 400, "limit of 64"),
        ({"model": "tiny-llama", "prompt": "a" * 130}, 400, "context holds 128"),
        (
            {"model": "tiny-llama", "prompt": "a" * 100, "max_tokens": 40},
            400,
            "max_tokens is 40: 140 is more than the context of 128",
        ),
        ({"model": "tiny-llama", "prompt": "\u00e9"}, 400, "not in the tokenizer's vocabulary"),
        ({"model": "tiny-llama", "prompt": "hi", "echo": True}, 400, "echo is not supported"),
        ({"model": "tiny-llama", "prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias is"),
        ({"model": "tiny-llama", "prompt": "hi", "n": 9}, 400, "n is 9, more than the 8 requests"),
        ({"model": "tiny-llama"}, 422, "prompt: Field required"),
    ],
)
def test_bad_completion_requests_are_refused(live_server, body, status, words) -> None:
    url = live_server.url + "/v1/completions"
    if isinstance(body, bytes):
        response = httpx.post(
            url, content=body, headers={**KEY, "content-type": "application/json"}
        )
    else:
        response = httpx.post(url, json=body, headers=KEY)
    assert words in error_of(response, status)["message"]
    assert httpx.get(live_server.url + "/health").json()["status"] == "ok"


def test_key_body_size_and_unknown_routes(live_server) -> None:
    url = live_server.url + "/v1/models"
    assert error_of(httpx.get(url), 401)["code"] == "invalid_api_key"
    wrong = httpx.get(url, headers={"Authorization": "Bearer sk-wrong"})
    assert "a wrong API key" in error_of(wrong, 401)["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url[:-7], api_key="sk-wrong", max_retries=0).models.list()
    big = {"model": "tiny-llama", "prompt": "a" * 30_000}
    response = httpx.post(live_server.url + "/v1/completions", json=big, headers=KEY)
    assert "larger than 20000 bytes" in error_of(response, 413)["message"]
    chunks = (b'{"model": "tiny-llama", "prompt": "' + b"a" * 1000 for _ in range(30))
    chunked = httpx.post(live_server.url + "/v1/completions", content=chunks, headers=KEY)
    assert error_of(chunked, 413)["code"] == "request_too_large"  # no Content-Length: counted
    assert error_of(httpx.get(live_server.url + "/v1/nothing", headers=KEY), 404)["code"]
    bad_embed = httpx.post(
        live_server.url + "/v1/embeddings", headers=KEY, json={"model": "tiny-llama", "input": "x"}
    )
    assert "embeddings come from 'minilm-l6'" in error_of(bad_embed, 400)["message"]


def test_client_disconnect_frees_its_slot(live_server) -> None:
    scheduler = live_server.state.scheduler
    engine, seen = scheduler.engine, []
    decode, submit = engine.decode, scheduler.submit

    def slow_decode(tokens, positions):  # 20 ms a step: the reply would take ~1.2 s
        time.sleep(0.02)
        return decode(tokens, positions)

    def recording_submit(requests):
        seen.extend(requests)
        return submit(requests)

    engine.decode, scheduler.submit = slow_decode, recording_submit
    try:
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", live_server.url + "/v1/completions", json=body, headers=KEY) as r:
            next(r.iter_lines())  # the first event arrived: the request holds a slot
        left = time.monotonic()
        while scheduler.active and time.monotonic() - left < 5:
            time.sleep(0.01)
        freed_after = time.monotonic() - left
    finally:
        engine.decode, scheduler.submit = decode, submit
    assert scheduler.active == 0 and seen[0].cancelled
    assert len(seen[0].generated) < 30 and freed_after < 0.6


def test_client_leaving_a_whole_response_frees_its_slot(live_server) -> None:
    scheduler = live_server.state.scheduler
    engine, seen = scheduler.engine, []
    decode, submit = engine.decode, scheduler.submit

    def slow_decode(tokens, positions):
        time.sleep(0.02)
        return decode(tokens, positions)

    def recording_submit(requests):
        seen.extend(requests)
        return submit(requests)

    engine.decode, scheduler.submit = slow_decode, recording_submit
    try:
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 60}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s
            httpx.post(live_server.url + "/v1/completions", json=body, headers=KEY, timeout=0.3)
        left = time.monotonic()
        while scheduler.active and time.monotonic() - left < 5:
            time.sleep(0.01)
    finally:
        engine.decode, scheduler.submit = decode, submit
    assert scheduler.active == 0 and seen[0].cancelled and len(seen[0].generated) < 40


def test_full_queue_answers_429_with_retry_after(tiny_llama) -> None:
    from fastapi.testclient import TestClient

    from lmarch.serve.app import build_asgi
    from lmarch.serve.scheduler import Request
    from lmarch.serve.state import ServeLimits, build_state

    limits = ServeLimits(context=64, max_tokens=8, max_batch=1, max_queue=2)
    state = build_state(tiny_llama(64), limits, names=("tiny",), start=False)
    filler = [Request([1], 1, GREEDY, lambda event: None) for _ in range(2)]
    state.scheduler.submit(filler)  # the thread is not started: they stay queued
    with TestClient(build_asgi(state)) as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    error = error_of(response, 429)
    assert "queue is full (2 of 2 waiting)" in error["message"]
    assert response.headers["retry-after"] == "3"
    state.close()


def test_concurrent_http_clients_get_single_decoding_answers(client, live_server) -> None:
    prompts = ["To be", "or not", "that is", "the question", "whether", "tis nobler"]
    results: dict[str, str] = {}

    def ask(prompt: str) -> None:
        out = client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0
        )
        results[prompt] = out.choices[0].text

    before = live_server.state.scheduler.counters()
    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = live_server.state.loaded
    for prompt in prompts:
        assert results[prompt] == greedy_text(live_server, loaded.encode_prompt(prompt), 10)
    after = live_server.state.scheduler.counters()
    assert after["decode_rows"] - before["decode_rows"] == 6 * 9


def test_embeddings_only_server(live_server) -> None:
    from fastapi.testclient import TestClient

    from lmarch.serve.app import build_asgi
    from lmarch.serve.state import ServeLimits, build_state

    state = build_state(
        None, ServeLimits(), encoder=live_server.state.encoder, embed_names=("minilm-l6",)
    )
    with TestClient(build_asgi(state)) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["minilm-l6"]
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert "serves embeddings only" in error_of(chat, 400)["message"]
        vectors = http.post("/v1/embeddings", json={"model": "minilm-l6", "input": ["a", "b"]})
        assert (
            len(vectors.json()["data"]) == 2 and len(vectors.json()["data"][0]["embedding"]) == 384
        )


def test_chat_without_a_template_uses_plain_turns(tiny_llama) -> None:
    import dataclasses

    from fastapi.testclient import TestClient

    from lmarch.loading import ChatConvention
    from lmarch.serve.app import build_asgi
    from lmarch.serve.state import ServeLimits, build_state

    loaded = dataclasses.replace(tiny_llama(64), chat=ChatConvention())
    state = build_state(loaded, ServeLimits(context=64, max_tokens=8), names=("plain",))
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]  # content parts
    body = {"model": "plain", "messages": [{"role": "user", "content": parts}], "temperature": 0}
    with TestClient(build_asgi(state)) as http:
        out = http.post("/v1/chat/completions", json={**body, "max_tokens": 8}).json()
    state.close()
    prompt = "User: hi\nAssistant:"
    want = greedy_ids_text(loaded, prompt, 8)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    assert out["choices"][0]["message"]["content"] == want.split("\nUser:")[0]


def greedy_ids_text(loaded, prompt: str, n: int) -> str:
    ids = loaded.encode_prompt(prompt)
    out = generate(loaded.model, torch.tensor([ids]), n, GREEDY)[0, len(ids) :]
    return loaded.tokenizer.decode(out.tolist())


GARBAGE = [
    ("completions", b""),
    ("completions", b"null"),
    ("completions", b"[]"),
    ("completions", b"\xff\xfe\x00garbage"),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": -1}'),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 1e309}'),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}'),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "top_p": 0}'),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "n": 0}'),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "seed": "x"}'),
    ("completions", b'{"model": "tiny-llama", "prompt": "hi", "stop": [""]}'),
    ("completions", b'{"model": "tiny-llama", "prompt": ["a", "b"]}'),
    ("completions", b'{"model": ["tiny-llama"], "prompt": "hi"}'),
    ("chat/completions", b'{"model": "tiny-llama", "messages": []}'),
    (
        "chat/completions",
        b'{"model": "tiny-llama", "messages": [{"role": "robot", "content": "x"}]}',
    ),
    ("chat/completions", b'{"model": "tiny-llama", "messages": "hi"}'),
    ("chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user"}]}'),
    (
        "chat/completions",
        b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}',
    ),
    ("embeddings", b'{"model": "minilm-l6", "input": []}'),
    ("embeddings", b'{"model": "minilm-l6", "input": 5}'),
    ("attention", b'{"text": "hi", "layer": -1}'),
]


@pytest.mark.parametrize(("route", "body"), GARBAGE)
def test_garbage_gets_a_4xx_in_openai_shape(live_server, route: str, body: bytes) -> None:
    response = httpx.post(
        f"{live_server.url}/v1/{route}", content=body,
        headers={**KEY, "content-type": "application/json"},
    )  # fmt: skip
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"]
    assert httpx.get(live_server.url + "/health").json()["status"] == "ok"
