"""The HTTP app: OpenAI's routes (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/v1/embeddings``), ``/health``, lmarch's ``/v1/attention`` and
the playground at ``/``.

Every refusal is a 4xx JSON body in OpenAI's shape (:mod:`lmarch.serve.errors`); no request
can stop the server. Bodies are read whole by :class:`BodyGuard` up to a size bound, and the
API key (when set) is checked there too, before any route runs.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmarch.errors import LmarchError
from lmarch.serve.attention_maps import attention_map
from lmarch.serve.completions import (
    DEFAULT_COMPLETION_TOKENS,
    chat_prompt,
    check_lengths,
    check_model,
    check_unsupported,
    render_messages,
    start_job,
    stream_response,
    whole_response,
)
from lmarch.serve.errors import ApiError, error_response
from lmarch.serve.schemas import AttentionRequest, ChatRequest, CompletionRequest, EmbeddingRequest
from lmarch.serve.state import ServerState
from lmarch.tasks.embed import embed_texts, tokenize_batch

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there


class BodyGuard:
    """ASGI middleware: checks the API key on ``/v1/`` routes (401) and reads each request
    body whole, refusing one larger than ``max_bytes`` (413) before the app sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int, api_key: str | None) -> None:
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "a wrong API key" if token else "no API key"
                response = error_response(
                    401,
                    f"{why}: send 'Authorization: Bearer KEY'",
                    "invalid_api_key",
                    "authentication_error",
                )
                await response(scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"the request body is larger than {self.max_bytes} bytes", "request_too_large"
        )
        await response(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field, or 400 for a body that is not JSON."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", "invalid_json")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    return error_response(422, message, "invalid_value")


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state``."""
    app = FastAPI(title="lmarch", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmarch = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LmarchError)
    async def _lmarch_error(request: Request, exc: LmarchError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_value")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"
        return error_response(500, message, "server_error", "server_error")

    @app.get("/health")
    async def health() -> dict:
        scheduler = state.scheduler
        return {
            "status": "ok",
            "model": state.names[0] if state.names else None,
            "embedding_model": state.embed_names[0] if state.embed_names else None,
            "quant": state.loaded.quant if state.loaded is not None else None,
            "active": scheduler.active if scheduler else 0,
            "queued": scheduler.queued if scheduler else 0,
            "max_batch": state.limits.max_batch,
            "context": state.limits.context,
            "max_tokens": state.limits.max_tokens,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        ids = [n for n in (state.names[:1] + state.embed_names[:1]) if n]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "lmarch"} for n in ids]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
        model = check_model(state, body.model)
        check_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request (a list of one)", "unsupported")
        loaded = state.loaded
        assert loaded is not None
        ids = loaded.encode_prompt(prompts[0])
        max_tokens = check_lengths(state, ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        job = start_job(
            state,
            "text_completion",
            model,
            ids,
            body,
            max_tokens,
            body.stop_strings(),
            body.logprobs,
        )
        return await _respond(job, body, body.logprobs is not None, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):  # type: ignore[no-untyped-def]
        model = check_model(state, body.model)
        check_unsupported(body)
        ids, stops = chat_prompt(state, body)
        wanted = body.max_completion_tokens or body.max_tokens
        max_tokens = check_lengths(state, ids, wanted, state.limits.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "invalid_value")
        job = start_job(
            state,
            "chat.completion",
            model,
            ids,
            body,
            max_tokens,
            body.stop_strings() + stops,
            logprobs,
        )
        return await _respond(job, body, body.logprobs, request)

    async def _respond(job, body, want_logprobs: bool, request: Request):  # type: ignore[no-untyped-def]
        if body.stream:  # a disconnect closes the stream's generator, which cancels the job
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_response(job, want_logprobs, include),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        whole = asyncio.ensure_future(whole_response(job, want_logprobs))
        try:
            while True:  # a client that leaves before the whole answer frees its slots too
                done, _ = await asyncio.wait({whole}, timeout=DISCONNECT_POLL_S)
                if done:
                    return whole.result()
                if await request.is_disconnected():
                    whole.cancel()
                    return error_response(499, "the client closed the request", "client_closed")
        finally:
            job.cancel()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        encoder = state.encoder
        if encoder is None:
            raise ApiError(
                400,
                "this server has no embedding model (start it with --embed MODEL)",
                "model_not_found",
            )
        if body.model not in state.embed_names:
            raise ApiError(
                400,
                f"unknown model {body.model!r}: embeddings come from {state.embed_names[0]!r}",
                "model_not_found",
            )
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > 2048:
            raise ApiError(400, "input must hold 1 to 2048 texts", "invalid_value")

        def work() -> tuple[np.ndarray, int]:
            count = int(tokenize_batch(encoder, texts)["attention_mask"].sum())
            return embed_texts(encoder, texts), count

        loop = asyncio.get_running_loop()
        vectors, count = await loop.run_in_executor(state.embed_worker, work)
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": state.embed_names[0],
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }

    @app.post("/v1/attention")
    async def attention(body: AttentionRequest) -> dict:
        loaded, scheduler = state.loaded, state.scheduler
        if loaded is None or scheduler is None:
            raise ApiError(400, "this server serves embeddings only", "model_not_found")
        if body.model is not None:
            check_model(state, body.model)
        if (body.messages is None) == (body.text is None):
            raise ApiError(400, "give either messages or text", "invalid_value")
        if body.messages is not None:
            messages = [m.model_dump() for m in body.messages]
            ids, _ = render_messages(state, messages, add_generation_prompt=False)
        else:
            ids = loaded.encode_prompt(body.text or "")
        limit = min(state.limits.max_attention_tokens, state.limits.context)
        if not ids or len(ids) > limit:
            raise ApiError(
                400, f"the text has {len(ids)} tokens; the view takes 1 to {limit}", "invalid_value"
            )
        future = scheduler.call(lambda: attention_map(loaded.model, ids, body.layer, body.head))
        result = await asyncio.wrap_future(future)
        tokens = [loaded.tokenizer.decode([i]) for i in ids]
        return {"tokens": tokens, "layer": body.layer, "head": body.head, **result}

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def wrap(app: FastAPI, state: ServerState) -> ASGIApp:
    """``app`` behind :class:`BodyGuard` with ``state``'s limits and key: what uvicorn runs."""
    return BodyGuard(app, state.limits.max_body_bytes, state.api_key)


def build_asgi(state: ServerState) -> ASGIApp:
    """The whole server for ``state``: :func:`create_app` wrapped by :func:`wrap`."""
    return wrap(create_app(state), state)


__all__ = ["BodyGuard", "build_asgi", "create_app"]
