"""Continuous batching: concurrent requests share forward passes, join and leave between steps,
and give exactly the tokens one-at-a-time decoding gives."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from lmarch.generation import SamplingConfig
from lmarch.generation.generate import GREEDY, generate
from lmarch.models import GPT, GPTConfig
from lmarch.serve.scheduler import Finished, QueueFull, Request, Scheduler, Token

pytestmark = pytest.mark.usefixtures("one_thread")


def single(model, prompt: list[int], n: int) -> list[int]:
    """The oracle: lmarch's own one-sequence greedy decoding with a KV cache."""
    return generate(model, torch.tensor([prompt]), n, GREEDY)[0, len(prompt) :].tolist()


def request(prompt: list[int], n: int, sampling: SamplingConfig = GREEDY, **kw) -> tuple:
    events: queue.Queue = queue.Queue()
    return Request(prompt, n, sampling, events.put, **kw), events


def paused_request(prompt: list[int], n: int, after: int) -> tuple:
    """A request whose ``after``-th token holds the scheduler thread (its emit blocks) until
    the returned gate is set: a fixed point mid-generation, whatever the machine's speed."""
    events: queue.Queue = queue.Queue()
    gate, reached = threading.Event(), threading.Event()

    def emit(event) -> None:
        events.put(event)
        if events.qsize() == after:
            reached.set()
            gate.wait(timeout=20)

    return Request(prompt, n, GREEDY, emit), events, gate, reached


def drain(events: queue.Queue) -> tuple[list[int], str]:
    ids = []
    while True:
        event = events.get(timeout=20)
        if isinstance(event, Finished):
            return ids, event.reason
        assert isinstance(event, Token)
        ids.append(event.id)


PROMPTS = [[5, 9, 13], [40, 41, 42, 43, 44, 45, 46], [7], [60, 3, 60, 3]]


def gpt_model():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.tok_emb.weight.mul_(20.0)  # tied head: peaked logits, no near-ties
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_concurrent_requests_share_steps_and_match_single_decoding(family: str, tiny_llama) -> None:
    model = tiny_llama(64).model if family == "llama" else gpt_model()
    scheduler = Scheduler(model, max_batch=4, max_queue=8, context=64)
    pairs = [request(p, 10) for p in PROMPTS]
    scheduler.submit([r for r, _ in pairs])  # all queued before the thread starts
    scheduler.start()
    try:
        outputs = [drain(events) for _, events in pairs]
    finally:
        scheduler.stop()
    for prompt, (ids, reason) in zip(PROMPTS, outputs, strict=True):
        assert reason == "length"
        assert ids == single(model, prompt, 10)
    # 4 prompts prefilled once each, then 9 steps each carrying all 4 rows
    assert scheduler.counters() == {"prefill_calls": 4, "decode_calls": 9, "decode_rows": 36}


def test_requests_join_and_leave_between_steps(tiny_llama) -> None:
    model = tiny_llama(64).model
    scheduler = Scheduler(model, max_batch=2, max_queue=8, context=64).start()
    try:
        first, first_events, gate, reached = paused_request(PROMPTS[1], 20, after=3)
        scheduler.submit([first])
        assert reached.wait(timeout=20)  # first is mid-generation, 3 tokens out
        short, short_events = request(PROMPTS[0], 4)
        late, late_events = request(PROMPTS[3], 6)
        scheduler.submit([short, late])  # late waits for a row: max_batch is 2
        gate.set()
        first_ids, _ = drain(first_events)
        short_ids, _ = drain(short_events)
        late_ids, _ = drain(late_events)
    finally:
        scheduler.stop()
    assert first_ids == single(model, PROMPTS[1], 20)
    assert short_ids == single(model, PROMPTS[0], 4)
    assert late_ids == single(model, PROMPTS[3], 6)
    counts = scheduler.counters()
    # 30 tokens, 27 of them from decode steps; sharing made the steps fewer than the rows
    assert counts["decode_rows"] == 27 and counts["decode_calls"] < 27


def test_seeded_sampling_repeats_and_end_token_stops(tiny_llama) -> None:
    model = tiny_llama(64).model
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    scheduler = Scheduler(model, max_batch=4, max_queue=8, context=64).start()
    try:
        a, a_events = request(PROMPTS[0], 12, sampling, seed=7)
        b, b_events = request(PROMPTS[0], 12, sampling, seed=7)
        scheduler.submit([a, b])
        a_ids, _ = drain(a_events)
        b_ids, _ = drain(b_events)
        greedy = single(model, PROMPTS[2], 5)
        stop, stop_events = request(PROMPTS[2], 20, stop_ids=(greedy[2],))
        scheduler.submit([stop])
        stop_ids, reason = drain(stop_events)
    finally:
        scheduler.stop()
    assert a_ids == b_ids and len(a_ids) == 12
    # the end token ends the request and is not reported as text
    assert reason == "stop" and stop_ids == greedy[: greedy.index(greedy[2])]


def test_full_queue_is_refused_and_cancelled_requests_leave(tiny_llama) -> None:
    model = tiny_llama(64).model
    scheduler = Scheduler(model, max_batch=1, max_queue=2, context=64)
    waiting = [request(PROMPTS[0], 50), paused_request(PROMPTS[0], 50, after=1)]
    scheduler.submit([waiting[0][0], waiting[1][0]])
    with pytest.raises(QueueFull, match=r"queue is full \(2 of 2 waiting\)") as info:
        scheduler.submit([request(PROMPTS[0], 5)[0]])
    assert info.value.retry_after >= 1
    waiting[0][0].cancel()  # cancelled while queued: never admitted
    scheduler.start()
    try:
        second, _, gate, reached = waiting[1]
        assert reached.wait(timeout=20)
        second.cancel()  # cancelled mid-generation: the slot is freed before the next step
        gate.set()
        for _ in range(200):
            if scheduler.active == 0:
                break
            time.sleep(0.01)
        assert scheduler.active == 0 and len(second.generated) == 1
        assert scheduler.counters()["prefill_calls"] == 1
    finally:
        scheduler.stop()


def test_half_precision_weights_batch_over_a_float32_cache(tiny_llama) -> None:
    model = tiny_llama(64).model.to(torch.bfloat16)  # its cache stays float32 on the CPU
    scheduler = Scheduler(model, max_batch=4, max_queue=8, context=64)
    pairs = [request(p, 6) for p in PROMPTS]
    scheduler.submit([r for r, _ in pairs])
    scheduler.start()
    try:
        outputs = [drain(events)[0] for _, events in pairs]
    finally:
        scheduler.stop()
    assert scheduler.engine.cache.keys.dtype == torch.float32
    assert outputs == [single(model, p, 6) for p in PROMPTS]


def test_a_failing_step_ends_its_requests_not_the_thread(tiny_llama) -> None:
    model = tiny_llama(64).model
    scheduler = Scheduler(model, max_batch=4, max_queue=8, context=64)
    decode = scheduler.engine.decode
    calls = []

    def fails_once(tokens, positions):
        calls.append(len(tokens))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return decode(tokens, positions)

    scheduler.engine.decode = fails_once
    first, first_events = request(PROMPTS[0], 5)
    scheduler.submit([first])
    scheduler.start()
    try:
        first_events.get(timeout=20)  # the prefill's token came out; the first step failed
        failed = first_events.get(timeout=20)
        later, later_events = request(PROMPTS[1], 5)
        scheduler.submit([later])
        later_ids, reason = drain(later_events)
    finally:
        scheduler.stop()
    assert failed == Finished("error", "RuntimeError: boom")
    assert reason == "length" and later_ids == single(model, PROMPTS[1], 5)
    assert scheduler.active == 0


def test_models_that_cannot_batch_serve_one_request_at_a_time() -> None:
    from lmarch.models import Llama, LlamaConfig
    from lmarch.models.bigram import BigramConfig, BigramLM
    from lmarch.serve.engine import RecomputeEngine, SlotEngine

    torch.manual_seed(0)
    mistral = Llama(
        LlamaConfig(
            vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
            intermediate_size=64, sliding_window=4,
        )
    ).eval()  # fmt: skip
    with torch.no_grad():
        mistral.lm_head.weight.mul_(30.0)
    bigram = BigramLM(BigramConfig(vocab_size=96)).eval()
    with torch.no_grad():
        bigram.table.weight.mul_(100.0)
    for model, engine_type in [(mistral, SlotEngine), (bigram, RecomputeEngine)]:
        scheduler = Scheduler(model, max_batch=4, max_queue=8, context=64)
        assert type(scheduler.engine) is engine_type and scheduler.max_batch == 1
        pairs = [request(p, 8) for p in PROMPTS[:2]]
        scheduler.submit([r for r, _ in pairs])
        scheduler.start()
        try:
            outputs = [drain(events)[0] for _, events in pairs]
        finally:
            scheduler.stop()
        # past the 4-token window: the sliding mask is the model's own, so outputs still match
        assert outputs == [single(model, p, 8) for p in PROMPTS[:2]]
        assert scheduler.counters()["decode_rows"] == scheduler.counters()["decode_calls"] == 14
