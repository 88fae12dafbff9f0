"""The generation loop: greedy equals transformers' generate, the KV cache changes nothing,
streaming cuts at stop strings."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmarch.generation import SamplingConfig, generate, stream_text
from lmarch.generation.generate import iter_tokens
from lmarch.models import GPT, GPTConfig
from lmarch.tokenizers import CharTokenizer
from lmarch.weights.hf_gpt2 import GPT2_MAP, gpt_config_from_hf

HF_CONFIGS = [
    dict(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    dict(vocab_size=150, n_positions=96, n_embd=64, n_layer=3, n_head=8, n_inner=160),
]


def hf_and_ours(kwargs: dict, seed: int) -> tuple[transformers.GPT2LMHeadModel, GPT]:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**kwargs, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = GPT(gpt_config_from_hf(cfg.to_dict())).eval()
    ours.load_state_dict(GPT2_MAP.to_ours(dict(hf.state_dict()), cfg.n_layer), strict=False)
    return hf, ours


@pytest.mark.parametrize("index", range(len(HF_CONFIGS)))
def test_greedy_equals_transformers_generate(index: int) -> None:
    """32 greedy tokens from a 10-token prompt (batch of 2) are identical to HF generate."""
    hf, ours = hf_and_ours(HF_CONFIGS[index], seed=index)
    prompt = torch.randint(
        0, hf.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(7)
    )
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(generate(ours, prompt, 32), expected)


def test_cache_and_no_cache_give_the_same_tokens() -> None:
    """Greedy and seeded top-k sampling agree token for token with and without the KV cache."""
    _, model = hf_and_ours(HF_CONFIGS[1], seed=3)
    prompt = torch.randint(0, 150, (3, 5), generator=torch.Generator().manual_seed(1))
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, top_k=20)):
        runs = [
            generate(
                model, prompt, 40, sampling, generator=torch.Generator().manual_seed(5), use_cache=c
            )
            for c in (True, False)
        ]
        assert torch.equal(runs[0], runs[1])


def test_generation_continues_past_the_context_window() -> None:
    """Past block_size the loop slides the window; cached and uncached runs still agree."""
    model = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    with_cache = generate(model, prompt, 40)
    without = generate(model, prompt, 40, use_cache=False)
    assert with_cache.shape == (1, 43)
    assert torch.equal(with_cache, without)


def test_eos_stops_and_pads() -> None:
    """A row that emits EOS is padded with it; generation ends once every row has."""
    _, model = hf_and_ours(HF_CONFIGS[0], seed=11)
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    full = generate(model, prompt, 20)
    eos = int(full[0, 4 + 5])  # whatever row 0 emits at step 5 becomes the EOS token
    out = generate(model, prompt, 20, eos_token_id=eos)
    ends = []
    for row in full[:, 4:].tolist():
        ends.append(row.index(eos) + 1 if eos in row else 20)
    assert out.shape[1] == 4 + max(ends)
    for r, end in enumerate(ends):
        expected = full[r, : 4 + end].tolist() + [eos] * (max(ends) - end)
        assert out[r].tolist() == expected


def test_stream_text_cuts_at_stop_string_and_matches_generate() -> None:
    """Streamed pieces join to the greedy continuation, cut right before the stop string."""
    text = "abcab cabbca bacab\n" * 4
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    full_ids = generate(model.eval(), torch.tensor([tok.encode("ab")]), 30)[0, 2:].tolist()
    full = tok.decode(full_ids)
    stop = full[10:12]
    pieces = list(stream_text(model, tok, "ab", 30, stop=[stop]))
    assert "".join(pieces) == full[: full.index(stop)]
    assert "".join(stream_text(model, tok, "ab", 30)) == full


def test_static_shape_step_equals_the_dynamic_path(tiny_decoders) -> None:
    """The decode step used under torch.compile (0-d tensor position, whole cache attended with
    a mask) gives the same logits as the sliced-cache path, for GPT and LLaMA."""
    models = tiny_decoders(50)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    for model in models:
        model.eval()
        dyn, static = model.make_cache(1, 32), model.make_cache(1, 32)
        with torch.no_grad():
            model(ids[:, :8], cache=dyn, start=0)
            model(ids[:, :8], cache=static, start=0)
            for pos in range(8, 12):
                a = model(ids[:, pos : pos + 1], cache=dyn, start=pos)
                b = model(ids[:, pos : pos + 1], cache=static, start=torch.tensor(pos))
                assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scheme", ["int4", "q4", "q4-fused"])
def test_compiled_quantised_decoding_compiles_once_and_matches_eager(scheme: str) -> None:
    """``iter_tokens(compile=True)`` on an int4 (PyTorch kernel) or q4 (lmarch's native
    kernel, an opaque operator in the graph) LLaMA with float32 activations (what
    ``prepare_for_decoding(compile=True)`` sets up): one graph for every step (no recompile per
    token, the bug a strided input once caused) and the same 12 greedy tokens as eager."""
    import torch._dynamo

    from lmarch.models import Llama, LlamaConfig
    from lmarch.quant.apply import quantize_

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
        intermediate_size=128,
    )  # fmt: skip
    model = Llama(config).eval()
    quantize_(model, scheme.removesuffix("-fused"))
    if scheme.endswith("-fused"):  # the native SwiGLU alone (decoder layers would skip compile)
        from lmarch.native import policy
        from lmarch.native.swiglu import NativeSwiGLU

        fused = [m for m in model.modules() if policy.swaps_swiglu(m)]
        for mlp in fused:
            mlp.__class__ = NativeSwiGLU
        assert len(fused) == 2
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    eager = [int(t) for t in iter_tokens(model, ids, 12)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = [int(t) for t in iter_tokens(model, ids, 12, compile=True)]
    assert compiled == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_last_only_logits_are_the_last_row_of_the_full_logits(tiny_decoders) -> None:
    """``forward(..., last_only=True)`` (what a prompt's prefill asks for, so the output head
    runs once per prompt) equals the last position of the full logits, in every causal family."""
    from lmarch.models.bigram import BigramConfig, BigramLM

    models = [*tiny_decoders(40), BigramLM(BigramConfig(vocab_size=40))]
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for model in models:
            model.eval()
            full = model(ids)
            last = model(ids, last_only=True)
            assert last.shape == (2, 1, 40)
            assert torch.allclose(last, full[:, -1:], rtol=0, atol=1e-6), type(model).__name__
