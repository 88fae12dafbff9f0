"""``/v1/completions`` and ``/v1/chat/completions``: prompts to scheduler requests, and their
events back to OpenAI's response objects, whole or as server-sent-event chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lmarch.errors import LmarchError
from lmarch.generation.sampling import SamplingConfig
from lmarch.serve.errors import ApiError
from lmarch.serve.scheduler import Finished, QueueFull, Request, Token
from lmarch.serve.schemas import ChatRequest, CompletionRequest
from lmarch.serve.state import PLAIN_CHAT_STOP, ServerState
from lmarch.serve.text import TextStream
from lmarch.tokenizers.chat import render_chat

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass
class Job:
    """One API call's choices: their scheduler requests, text streams, and the queue their
    events arrive on (tagged with the choice index)."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompt_tokens: int
    requests: list[Request]
    streams: list[TextStream]
    events: asyncio.Queue
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    finish: list[str | None] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop every choice (the client went away)."""
        for request in self.requests:
            request.cancel()

    @property
    def completion_tokens(self) -> int:
        """New tokens so far, over all choices (end tokens included, as OpenAI counts)."""
        return sum(len(r.generated) for r in self.requests)

    def usage(self) -> dict:
        """OpenAI's ``usage`` object (the prompt counted once per choice, as OpenAI does)."""
        prompt = self.prompt_tokens * len(self.requests)
        done = self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def check_model(state: ServerState, name: str) -> str:
    """``name`` if the server generates with it, else a 400 naming the served model."""
    if state.loaded is None:
        raise ApiError(400, "this server serves embeddings only", "model_not_found")
    if name not in state.names:
        raise ApiError(
            400,
            f"unknown model {name!r}: this server generates with {state.names[0]!r}",
            "model_not_found",
        )
    return state.names[0]


def chat_prompt(state: ServerState, body: ChatRequest) -> tuple[list[int], list[str]]:
    """The conversation's prompt ids (the model's chat template, or plain ``Role: text`` lines
    when it has none) and the stop strings that template implies."""
    assert state.loaded is not None
    messages = [m.model_dump() for m in body.messages]
    return render_messages(state, messages, add_generation_prompt=True)


def render_messages(
    state: ServerState, messages: list[dict], add_generation_prompt: bool
) -> tuple[list[int], list[str]]:
    """``messages`` as the model's prompt ids, and stop strings (see :func:`chat_prompt`)."""
    loaded = state.loaded
    assert loaded is not None
    if loaded.chat_template is not None:
        text = render_chat(loaded.chat_template, messages, add_generation_prompt)
        return loaded.encode_prompt(text), []
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    text = "\n".join(lines) + ("\nAssistant:" if add_generation_prompt else "")
    return loaded.encode_prompt(text), list(PLAIN_CHAT_STOP)


def check_lengths(
    state: ServerState, prompt_ids: list[int], max_tokens: int | None, default: int
) -> int:
    """The number of new tokens to generate; a 400 naming the limits when the prompt or
    ``max_tokens`` does not fit."""
    limits = state.limits
    n = len(prompt_ids)
    if n == 0:
        raise ApiError(400, "the prompt is empty: it encodes to no tokens", "empty_prompt")
    assert state.loaded is not None
    vocab = getattr(getattr(state.loaded.model, "config", None), "vocab_size", None)
    if vocab is not None and max(prompt_ids) >= vocab:
        raise ApiError(400, f"the prompt has token ids past the vocabulary ({vocab})", "bad_prompt")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens}",
            "max_tokens_too_large",
        )
    if n >= limits.context:
        raise ApiError(
            400,
            f"the prompt has {n} tokens; the context holds {limits.context} tokens, "
            "prompt and completion together",
            "context_length_exceeded",
        )
    if max_tokens is None:
        return min(default, limits.max_tokens, limits.context - n)
    if n + max_tokens > limits.context:
        raise ApiError(
            400,
            f"the prompt has {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} is more "
            f"than the context of {limits.context} tokens",
            "context_length_exceeded",
        )
    return max_tokens


def check_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """Refuse by name the fields lmarch does not implement (no silent wrong answer)."""
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(
            400, "presence_penalty and frequency_penalty are not supported", "unsupported"
        )
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "unsupported")
    if body.tools:
        raise ApiError(400, "tools (function calling) are not supported", "unsupported")
    if isinstance(body, CompletionRequest) and body.echo:
        raise ApiError(400, "echo is not supported", "unsupported")


def start_job(
    state: ServerState,
    kind: str,
    model: str,
    prompt_ids: list[int],
    body: CompletionRequest | ChatRequest,
    max_tokens: int,
    stop: list[str],
    logprobs: int | None,
) -> Job:
    """Queue ``body.n`` requests continuing ``prompt_ids``; 429 when the queue is full."""
    loaded, scheduler = state.loaded, state.scheduler
    assert loaded is not None and scheduler is not None
    try:
        sampling = SamplingConfig(
            temperature=body.temperature, top_p=None if body.top_p >= 1.0 else body.top_p
        )
        streams = [TextStream(loaded.tokenizer, stop) for _ in range(body.n)]
    except LmarchError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None
    if body.n > scheduler.max_queue:
        raise ApiError(
            400,
            f"n is {body.n}, more than the {scheduler.max_queue} requests the queue holds",
            "invalid_value",
        )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(index: int):  # type: ignore[no-untyped-def]
        def emit(event: Token | Finished) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (server shutting down): stop
                requests[index].cancel()

        return emit

    requests = [
        Request(
            prompt_ids=list(prompt_ids),
            max_tokens=max_tokens,
            sampling=sampling,
            emit=sink(i),
            seed=None if body.seed is None else body.seed + i,
            stop_ids=tuple(loaded.stop_token_ids),
            logprobs=logprobs,
        )
        for i in range(body.n)
    ]
    try:
        scheduler.submit(requests)
    except QueueFull as exc:
        raise ApiError(
            429,
            str(exc),
            "rate_limit_exceeded",
            "rate_limit_error",
            {"Retry-After": str(exc.retry_after)},
        ) from None
    return Job(kind, model, len(prompt_ids), requests, streams, events, finish=[None] * body.n)


@dataclass
class Piece:
    """What one event adds to choice ``index``: text, the token (for logprobs), and the finish
    reason once it ends."""

    index: int
    text: str = ""
    token: Token | None = None
    finish: str | None = None


async def pieces(job: Job) -> AsyncIterator[Piece]:
    """The job's events as text pieces, in arrival order, until every choice has finished.
    A stop string ends its choice (finish reason ``stop``) and cancels its request."""
    while any(f is None for f in job.finish):
        index, event = await job.events.get()
        if job.finish[index] is not None:
            continue  # events still in flight after a stop string ended the choice
        stream = job.streams[index]
        if isinstance(event, Finished):
            if event.reason == "error":
                job.cancel()
                raise ApiError(
                    500, f"generation failed: {event.message}", "server_error", "server_error"
                )
            job.finish[index] = event.reason
            yield Piece(index, stream.flush(), None, event.reason)
            continue
        text = stream.feed(event.id)
        if stream.stopped:
            job.requests[index].cancel()
            job.finish[index] = "stop"
            yield Piece(index, text, event, "stop")
        else:
            yield Piece(index, text, event)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprob(stream: TextStream, token: Token) -> dict:
    """One entry of a chat choice's ``logprobs.content``."""
    text = stream.token_text(token.id)
    top = [
        {"token": (t := stream.token_text(i)), "logprob": lp, "bytes": _token_bytes(t)}
        for i, lp in token.top
    ]
    return {
        "token": text,
        "logprob": token.logprob,
        "bytes": _token_bytes(text),
        "top_logprobs": top,
    }


def completion_logprobs(stream: TextStream, tokens: list[Token], offset: int = 0) -> dict:
    """A completion choice's ``logprobs`` object (the legacy layout)."""
    texts = [stream.token_text(t.id) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{stream.token_text(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


async def whole_response(job: Job, want_logprobs: bool) -> dict:
    """The complete (non-streamed) response body."""
    texts = ["" for _ in job.requests]
    tokens: list[list[Token]] = [[] for _ in job.requests]
    async for piece in pieces(job):
        texts[piece.index] += piece.text
        if piece.token is not None:
            tokens[piece.index].append(piece.token)
    choices = []
    for i, stream in enumerate(job.streams):
        if job.kind == "chat.completion":
            logprobs = None
            if want_logprobs:
                logprobs = {
                    "content": [chat_logprob(stream, t) for t in tokens[i]],
                    "refusal": None,
                }
            message = {"role": "assistant", "content": texts[i], "refusal": None}
            choice = {"index": i, "message": message, "logprobs": logprobs}
        else:
            logprobs = completion_logprobs(stream, tokens[i]) if want_logprobs else None
            choice = {"index": i, "text": texts[i], "logprobs": logprobs}
        choices.append({**choice, "finish_reason": job.finish[i]})
    return {
        "id": ("chatcmpl-" if job.kind == "chat.completion" else "cmpl-") + job.id,
        "object": job.kind,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": job.usage(),
        "system_fingerprint": None,
    }


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_response(job: Job, want_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. If the
    client goes away the generator is closed, and ``finally`` frees the job's slots."""
    chat = job.kind == "chat.completion"
    base = {
        "id": ("chatcmpl-" if chat else "cmpl-") + job.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "system_fingerprint": None,
    }
    offsets = [0 for _ in job.requests]
    try:
        if chat:
            for i in range(len(job.requests)):
                delta = {"role": "assistant", "content": ""}
                first = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                yield _sse({**base, "choices": [first]})
        async for piece in pieces(job):
            if not piece.text and piece.finish is None and not (want_logprobs and piece.token):
                continue
            stream = job.streams[piece.index]
            logprobs = None
            if want_logprobs and piece.token is not None:
                if chat:
                    logprobs = {"content": [chat_logprob(stream, piece.token)], "refusal": None}
                else:
                    logprobs = completion_logprobs(stream, [piece.token], offsets[piece.index])
            offsets[piece.index] += len(piece.text)
            if chat:
                delta = {"content": piece.text} if piece.text or logprobs else {}
                choice = {"index": piece.index, "delta": delta, "logprobs": logprobs}
            else:
                choice = {"index": piece.index, "text": piece.text, "logprobs": logprobs}
            choice["finish_reason"] = piece.finish
            yield _sse({**base, "choices": [choice]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": job.usage()})
        yield _sse("[DONE]")
    except ApiError as exc:
        yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}})
    finally:
        job.cancel()


__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "Job",
    "chat_prompt",
    "check_lengths",
    "check_model",
    "check_unsupported",
    "render_messages",
    "start_job",
    "stream_response",
    "whole_response",
]
