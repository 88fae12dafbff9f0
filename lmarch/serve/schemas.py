"""Request bodies of the OpenAI-compatible API (the fields lmarch honours; others the official
client may send are ignored), checked by pydantic: a wrong type is a 422 naming the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CHOICES = 16  # n at most
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    """``include_usage``: end the stream with a chunk carrying token counts."""

    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[dict] | None = None

    def stop_strings(self) -> list[str]:
        """``stop`` as a list (OpenAI allows one string or up to four)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: continue ``prompt`` (raw text)."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class TextPart(_Body):
    """A piece of a message's content given as a list (OpenAI's content parts): text only."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One turn of a conversation; content given as text parts is joined into one string."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _join_parts(cls, value: str | list[TextPart]) -> str:
        return value if isinstance(value, str) else "".join(part.text for part in value)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: the assistant's next turn after ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``: one vector per input text."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


class AttentionRequest(_Body):
    """``POST /v1/attention`` (lmarch's own): the attention weights of one layer and head over
    a conversation (rendered with the chat template) or a raw text."""

    model: str | None = None
    messages: list[ChatMessage] | None = None
    text: str | None = None
    layer: int = Field(default=0, ge=0)
    head: int = Field(default=0, ge=0)


__all__ = [
    "MAX_CHOICES",
    "AttentionRequest",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "StreamOptions",
    "TextPart",
]
