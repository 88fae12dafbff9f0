"""What a running server holds: the language model behind its scheduler, an optional sentence
encoder for embeddings, and the limits it enforces."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lmarch.errors import LmarchError
from lmarch.loading import LoadedModel
from lmarch.serve.scheduler import Scheduler
from lmarch.tasks.embed import Encoder

# Without a chat template, a conversation is written as plain "Role: text" lines and the
# reply stops where the model starts the next user line.
PLAIN_CHAT_STOP = ("\nUser:",)


@dataclass
class ServeLimits:
    """Limits a server enforces. ``context``: positions per request (prompt + new tokens);
    ``max_tokens``: the most new tokens one choice may ask for; ``max_body_bytes``: the
    largest request body; ``max_batch`` / ``max_queue``: requests decoded together / waiting."""

    context: int = 2048
    max_tokens: int = 1024
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_attention_tokens: int = 512


@dataclass
class ServerState:
    """The served models and their scheduler. ``names`` are the ids ``model`` may take for the
    language model (the first is what ``/v1/models`` lists); ``embed_names`` likewise."""

    loaded: LoadedModel | None
    scheduler: Scheduler | None
    limits: ServeLimits
    names: tuple[str, ...] = ()
    encoder: Encoder | None = None
    embed_names: tuple[str, ...] = ()
    api_key: str | None = None
    embed_worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="lmarch-embed")
    )

    def close(self) -> None:
        """Stop the scheduler thread and the embedding worker."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.embed_worker.shutdown(wait=False, cancel_futures=True)


def build_state(
    loaded: LoadedModel | None,
    limits: ServeLimits,
    *,
    names: tuple[str, ...] = (),
    encoder: Encoder | None = None,
    embed_names: tuple[str, ...] = (),
    api_key: str | None = None,
    start: bool = True,
) -> ServerState:
    """A :class:`ServerState` for ``loaded`` (a causal LM, or None to serve embeddings only):
    its scheduler is built with ``limits`` (context capped at the model's own) and, with
    ``start``, started."""
    scheduler = None
    if loaded is not None:
        loaded.require("causal-lm", "serve")
        limits.context = min(limits.context, loaded.model.max_positions)
        scheduler = Scheduler(loaded.model, limits.max_batch, limits.max_queue, limits.context)
        limits.max_batch = scheduler.max_batch
        if start:
            scheduler.start()
        names = names or (loaded.name,)
    if encoder is not None:
        embed_names = embed_names or (encoder.name,)
    if loaded is None and encoder is None:
        raise LmarchError("nothing to serve", hint="give a model, --embed MODEL, or both")
    return ServerState(loaded, scheduler, limits, names, encoder, embed_names, api_key)


def load_state(
    model: str | None,
    limits: ServeLimits,
    *,
    embed: str | None = None,
    api_key: str | None = None,
    quant: str = "auto",
) -> ServerState:
    """Load ``model`` (anything :func:`lmarch.load` reads that is a causal LM, or None) and
    ``embed`` (a sentence encoder such as ``minilm-l6``, or None), checking ``limits``, and
    return the started :class:`ServerState`. Models are named by the spec they were given."""
    from lmarch.loading import load
    from lmarch.tasks.embed import load_encoder

    check_limits(limits)
    if api_key is not None and not api_key.strip():
        raise LmarchError("the API key is empty", hint="give --api-key a non-empty value")
    loaded = None
    if model is not None:
        loaded = load(
            model, quant=serving_quant(model, quant, limits.max_batch), context=limits.context
        )
        loaded.require("causal-lm", "serve")
    encoder = load_encoder(embed, "serve --embed") if embed is not None else None
    names = (str(model), loaded.name) if loaded is not None else ()
    embed_names = (str(embed), encoder.name) if encoder is not None else ()
    return build_state(
        loaded, limits, names=names, encoder=encoder, embed_names=embed_names, api_key=api_key
    )


def serving_quant(spec: str, quant: str, max_batch: int) -> str:
    """What ``quant="auto"`` means for a server: as for one sequence (:func:`lmarch.load`),
    except that a GGUF whose automatic choice is lmarch's native Q4 kernels gets ``int4``
    when requests are batched. The native kernels decode one row per call (fastest alone);
    PyTorch's int4 kernel multiplies all the batch's rows at once (measured on SmolLM2, one
    thread: 32 rows per step ~4x the tokens/s of native Q4 one at a time; see docs/serve.md)."""
    if quant != "auto" or max_batch <= 1:
        return quant
    from lmarch.loading.sources import resolve
    from lmarch.loading.speed import choose_quant

    source = resolve(spec)
    if source.kind != "gguf":
        return quant
    return "int4" if choose_quant("auto", source.kind, source.path, "cpu", None) == "q4" else quant


def check_limits(limits: ServeLimits) -> None:
    """Refuse limits that cannot work (each named, with its value)."""
    minimum = {
        "context": 2,
        "max_tokens": 1,
        "max_batch": 1,
        "max_queue": 1,
        "max_body_bytes": 1024,
        "max_attention_tokens": 1,
    }
    for name, low in minimum.items():
        value = getattr(limits, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LmarchError(f"{name} must be a whole number >= {low}, got {value!r}")


__all__ = [
    "PLAIN_CHAT_STOP",
    "ServeLimits",
    "ServerState",
    "build_state",
    "check_limits",
    "load_state",
]
