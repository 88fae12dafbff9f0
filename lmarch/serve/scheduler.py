"""The one thread that owns the model: a bounded queue of requests, admitted into the batch's
free slots between decode steps (continuous batching), each step sampling one token per row.

HTTP handlers never touch the model: they :meth:`Scheduler.submit` a :class:`Request` and read
its events (a :class:`Token` per new token, then one :class:`Finished`), and set
``request.cancelled`` when their client goes away; the slot is freed before the next step.
Other work on the model (the playground's attention maps) is queued with :meth:`Scheduler.call`
and runs between steps on the same thread.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.generation.sampling import SamplingConfig, select_next_token
from lmarch.serve.engine import make_engine


@dataclass(frozen=True)
class Token:
    """One generated token: its id, log-probability under the model, and the ``top`` most
    likely alternatives as (id, log-probability) pairs (empty unless asked for)."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a request: ``reason`` is ``"stop"`` (an end token), ``"length"``
    (``max_tokens`` reached) or ``"error"`` (``message`` says what failed)."""

    reason: str
    message: str = ""


class QueueFull(LmarchError):
    """The request queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, hint="retry later")
        self.retry_after = retry_after


@dataclass
class Request:
    """One sequence to generate. ``emit`` is called (from the scheduler thread) with each
    :class:`Token` and finally one :class:`Finished`; ``logprobs`` asks for the chosen token's
    log-probability and that many alternatives (None: neither)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[Token | Finished], None]
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop generating (the client left, or a stop string ended the text)."""
        self.cancelled = True


@dataclass
class _Slot:
    request: Request
    generator: torch.Generator
    position: int  # where the next token goes in the cache
    last: int  # the token to feed next


class Scheduler:
    """Runs ``model`` for every request on one background thread.

    ``max_batch`` rows decode together; ``max_queue`` requests may wait for a row (more are
    refused with :class:`QueueFull`); ``context`` positions per row (prompt plus new tokens).
    """

    def __init__(self, model: nn.Module, max_batch: int, max_queue: int, context: int) -> None:
        self.engine = make_engine(model, max_batch, context)
        self.model = model
        self.max_queue = max_queue
        self.context = context
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._slots: list[_Slot] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps_done = 0

    @property
    def max_batch(self) -> int:
        """Rows decoded together (1 for models that cannot batch)."""
        return self.engine.n_slots

    @property
    def active(self) -> int:
        """Requests holding a slot now."""
        return len(self._slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def start(self) -> Scheduler:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmarch-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the thread; waiting and active requests end with an error."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, requests: list[Request]) -> None:
        """Queue ``requests`` (all or none): :class:`QueueFull` when they do not fit."""
        with self._cv:
            if self._stopping:
                raise LmarchError("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} of {self.max_queue} waiting)",
                    retry_after=1 + len(self._waiting) // max(1, self.max_batch),
                )
            self._waiting.extend(requests)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the scheduler thread between two steps; its result as a Future."""
        future: Future = Future()
        with self._cv:
            self._jobs.append((fn, future))
            self._cv.notify()
        return future

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._slots or self._jobs):
                    self._cv.wait()
                if self._stopping:
                    break
                jobs, self._jobs = self._jobs, []
                admitted = []
                while self._waiting and len(self._slots) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # reported to the caller, the thread goes on
                        future.set_exception(exc)
            self._release([i for i, s in enumerate(self._slots) if s.request.cancelled])
            for request in admitted:
                if not request.cancelled:
                    self._guarded(self._prefill, request)
            if self._slots:
                self._guarded(self._step)
        leftover = [s.request for s in self._slots] + list(self._waiting)
        for request in leftover:
            request.emit(Finished("error", "the server is shutting down"))

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a model call; a failure ends the requests it concerned, never the thread."""
        try:
            fn(*args)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            victims = [args[0]] if args else [s.request for s in self._slots]
            for request in victims:
                try:
                    request.emit(Finished("error", message))
                except Exception:  # a sink that fails cannot take the thread with it
                    request.cancel()
            if not args:
                self._slots = []

    def _prefill(self, request: Request) -> None:
        row = len(self._slots)
        logits = self.engine.prefill(row, request.prompt_ids)
        generator = torch.Generator()
        if request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            generator.seed()
        slot = _Slot(request, generator, len(request.prompt_ids), -1)
        self._slots.append(slot)
        if self._sample(slot, logits[None]):
            self._release([row])

    def _step(self) -> None:
        slots = self._slots
        logits = self.engine.decode([s.last for s in slots], [s.position for s in slots])
        self.steps_done += 1
        done = []
        for i, slot in enumerate(slots):
            slot.position += 1
            if self._sample(slot, logits[i : i + 1]):
                done.append(i)
        self._release(done)

    def _sample(self, slot: _Slot, logits: Tensor) -> bool:
        """Pick the slot's next token from ``logits`` [1, V], emit it; True when finished."""
        request = slot.request
        if request.cancelled:
            return True
        token = int(select_next_token(logits, request.sampling, None, slot.generator)[0])
        logprob, top = None, ()
        if request.logprobs is not None:
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            logprob = float(logp[token])
            if request.logprobs > 0:
                values, ids = torch.topk(logp, min(request.logprobs, logp.shape[0]))
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        request.generated.append(token)
        slot.last = token
        if token in request.stop_ids:
            request.emit(Finished("stop"))
            return True
        request.emit(Token(token, logprob, top))
        if len(request.generated) >= request.max_tokens:
            request.emit(Finished("length"))
            return True
        return False

    def _release(self, rows: list[int]) -> None:
        """Free rows ``rows``: the last active row moves into each freed one (packed rows)."""
        for row in sorted(rows, reverse=True):
            last = len(self._slots) - 1
            if row != last:
                moved = self._slots[last]
                self.engine.move_row(last, row, moved.position)
                self._slots[row] = moved
            self._slots.pop()

    def counters(self) -> dict[str, int]:
        """Forward passes so far: prompts, batched decode steps, and rows those steps carried."""
        e = self.engine
        return {
            "prefill_calls": e.prefill_calls,
            "decode_calls": e.decode_calls,
            "decode_rows": e.decode_rows,
        }


__all__ = ["Finished", "QueueFull", "Request", "Scheduler", "Token"]
