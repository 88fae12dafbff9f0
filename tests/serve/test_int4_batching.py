"""Continuous batching with int4 weights (PyTorch's int4 kernel, bfloat16 activations: what
``lmarch serve`` gives a Q4 GGUF) against one-at-a-time decoding.

What is exact and what is not:

- every layer of a batched step except attention gives each row bit for bit what single
  decoding gives it: the int4 kernel's (and the int8 head's) rows do not depend on how many
  rows share the call, and the per-row positions, masks and cache writes are right;
- attention is where a batched step computes differently: each row attends over the longest
  row's keys with a mask, while single decoding runs over exactly its own keys, so the float32
  sums are taken in another order (last-bit differences, under 1e-6 relative). Rounded to
  bfloat16, such a difference can move a value by one bfloat16 step, and greedy choices
  between logits one step apart can then go the other way (SmolLM2 as int4: 5 of
  benchmarks/serve_load.py's 8 questions within 32 tokens; as float32: none).

The tests take attention per row over each row's own keys (``own_keys_attention``, the routine
single decoding uses) and then require exact equality: the logits of a small int4 model whose
greedy margins are ordinary (not widened as in the other exactness tests), and SmolLM2's
answers (slow tier; with the served attention that test fails, as said above).
"""

from __future__ import annotations

import time

import pytest
import torch

import lmarch.nn.attention as attention
from lmarch.generation.generate import GREEDY, generate
from lmarch.models import Llama, LlamaConfig
from lmarch.quant import Int4WeightOnlyLinear
from lmarch.quant.apply import quantize_for_decoding
from lmarch.quant.int4 import int4_kernel_available
from lmarch.quant.int8 import Int8WeightOnlyLinear
from lmarch.serve.engine import SlotEngine
from lmarch.serve.scheduler import Finished, Request, Scheduler

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not int4_kernel_available(), reason="no int4 CPU kernel in this build"),
]


PROMPTS = [[5, 9, 13], [40, 41, 42, 43, 44, 45, 46], [7], [60, 3, 60, 3]]
SERVE_LOAD_QUESTIONS = [  # benchmarks/serve_load.py's
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
    "What do bees make?",
    "How many days are in a week?",
    "Give me a word that rhymes with cat.",
    "What is two plus three?",
]


def int4_llama(head_scale: float = 1.0) -> Llama:
    """A seeded 2-layer GQA LLaMA made fast to decode as ``--quant int4`` does (bfloat16, every
    Linear int4); every width a multiple of 16 and 32, so each layer runs on the kernel."""
    torch.manual_seed(3)
    model = Llama(
        LlamaConfig(
            vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
            intermediate_size=128,
        )
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return quantize_for_decoding(model, "int4").eval()


def test_int4_and_int8_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    layers = [  # SmolLM2's shapes: fused qkv, down projection; an int8 head's shape
        Int4WeightOnlyLinear.from_linear(torch.nn.Linear(576, 960, bias=False), 32),
        Int4WeightOnlyLinear.from_linear(torch.nn.Linear(1536, 576, bias=False), 32),
        Int8WeightOnlyLinear.from_weight(torch.randn(4096, 576).to(torch.bfloat16)),
    ]
    for layer in layers:
        assert getattr(layer, "kernel_packed", True)
        x = torch.randn(32, layer.in_features).to(torch.bfloat16)
        one_by_one = torch.cat([layer(x[i : i + 1]) for i in range(32)])
        for m in range(1, 33):
            assert torch.equal(layer(x[:m]), one_by_one[:m]), (layer, m)


_batched_attention = attention.scaled_dot_product_attention


def own_keys_attention(q, k, v, mask=None, scale=None, **kw):  # type: ignore[no-untyped-def]
    """A batched decode step's attention (one query per row, a [B, 1, 1, S] mask) taken per
    row over exactly its own keys, by the routine single decoding uses; anything else (a
    prompt's prefill) as before."""
    if q.shape[2] != 1 or mask is None or mask.dim() != 4:
        return _batched_attention(q, k, v, mask=mask, scale=scale, **kw)
    lengths = mask[:, 0, 0, :].sum(-1).tolist()
    return torch.cat(
        [
            attention.grouped_query_decode_attention(
                q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], None, scale
            )
            for i, n in enumerate(lengths)
        ]
    )


@torch.no_grad()
def test_batched_int4_step_equals_single_decoding_but_for_attention(monkeypatch) -> None:
    model = int4_llama()
    steps = 6
    want_logits, tokens = [], []
    for prompt in PROMPTS:  # single decoding, as generate() runs it; its greedy tokens
        cache = model.make_cache(1, 64)
        logits = model(torch.tensor([prompt]), cache=cache, start=0, last_only=True)[0, -1]
        row_logits, row_tokens = [], []
        for s in range(steps):
            row_tokens.append(int(logits.argmax()))
            step = torch.tensor([[row_tokens[-1]]])
            logits = model(step, cache=cache, start=len(prompt) + s)[0, -1]
            row_logits.append(logits)
        want_logits.append(row_logits)
        tokens.append(row_tokens)
    monkeypatch.setattr(attention, "scaled_dot_product_attention", own_keys_attention)
    engine = SlotEngine(model, n_slots=4, context=64)
    for row, prompt in enumerate(PROMPTS):
        engine.prefill(row, prompt)
    for s in range(steps):  # the rows sit at four different positions
        got = engine.decode([t[s] for t in tokens], [len(p) + s for p in PROMPTS])
        for row in range(len(PROMPTS)):
            assert torch.equal(got[row], want_logits[row][s]), (row, s)


def run_scheduler(model, prompts: list[list[int]], n: int, max_batch: int) -> tuple[list, dict]:  # type: ignore[no-untyped-def]
    """Greedy ``n`` tokens for each prompt through a :class:`Scheduler` (all queued before it
    starts), and the scheduler's forward-pass counters."""
    context = min(256, model.max_positions)
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=len(prompts), context=context)
    got: list[list[int]] = [[] for _ in prompts]
    ends: list[Finished] = []

    def sink(i: int):  # type: ignore[no-untyped-def]
        return lambda e: ends.append(e) if isinstance(e, Finished) else got[i].append(e.id)

    scheduler.submit([Request(p, n, GREEDY, sink(i)) for i, p in enumerate(prompts)])
    scheduler.start()
    try:
        for _ in range(30_000):
            if len(ends) == len(prompts):
                break
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert ends == [Finished("length")] * len(prompts)
    return got, scheduler.counters()


def test_int4_requests_batch_like_single_decoding() -> None:
    model = int4_llama(head_scale=30.0)  # greedy choices far from ties, as in test_scheduler
    want = [generate(model, torch.tensor([p]), 10, GREEDY)[0, len(p) :].tolist() for p in PROMPTS]
    got, counters = run_scheduler(model, PROMPTS, 10, max_batch=4)
    assert got == want
    assert counters == {"prefill_calls": 4, "decode_calls": 9, "decode_rows": 36}


@pytest.mark.slow
def test_smollm2_int4_batches_like_generate_once_attention_is_per_row(monkeypatch) -> None:
    """The served case: SmolLM2's GGUF as int4, benchmarks/serve_load.py's eight questions
    batched together. With each row's attention over its own keys, every answer equals
    generate()'s for 32 tokens (with the masked batched attention, 5 of 8 differ, at steps
    where generate()'s two best logits were one bfloat16 step apart)."""
    import lmarch
    from lmarch.serve.completions import render_chat

    loaded = lmarch.load("smollm2-135m", quant="int4", context=256)
    model, template = loaded.model, loaded.chat_template
    prompts = [
        loaded.encode_prompt(render_chat(template, [{"role": "user", "content": q}], True))
        for q in SERVE_LOAD_QUESTIONS
    ]
    want = [generate(model, torch.tensor([p]), 32, GREEDY)[0, len(p) :].tolist() for p in prompts]
    monkeypatch.setattr(attention, "scaled_dot_product_attention", own_keys_attention)
    got, counters = run_scheduler(model, prompts, 32, max_batch=8)
    assert got == want
    assert counters["decode_rows"] == 8 * 31 and counters["decode_calls"] == 31
