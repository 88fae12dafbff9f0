"""Norms, feed-forward blocks, absolute positions and the residual block, each against PyTorch,
transformers' LLaMA / GPT-2 pieces, or the paper's formula written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from lmarch.nn import (
    MLP,
    GatedMLP,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    RMSNorm,
    SinusoidalPositionalEmbedding,
    TransformerBlock,
    build_norm,
    get_activation,
    sinusoidal_table,
    swiglu_hidden_dim,
)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 1.0) -> torch.nn.Module:
    """Every parameter (biases and norm gains too) drawn from N(0, std^2), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# --- norms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch_layernorm_with_same_weights(bias: bool) -> None:
    ours = randomize(LayerNorm(12, eps=1e-5, bias=bias))
    theirs = torch.nn.LayerNorm(12, eps=1e-5, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 12) * 5 + 2
    assert max_err(ours(x), theirs(x)) <= 1e-6
    assert ("bias" in dict(ours.named_parameters())) is bias


def test_rmsnorm_equals_formula_and_llama_rmsnorm() -> None:
    """y = x / sqrt(mean(x^2) + eps) * g, and transformers' LlamaRMSNorm (<= 1e-6)."""
    ours = randomize(RMSNorm(16, eps=1e-6))
    llama = LlamaRMSNorm(16, eps=1e-6)
    llama.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 16) * 3
    formula = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * ours.weight
    with torch.no_grad():
        assert max_err(ours(x), formula) <= 1e-6
        assert max_err(ours(x), llama(x)) <= 1e-6


def test_rmsnorm_in_bf16_returns_bf16_equal_to_llama_rmsnorm() -> None:
    """A bf16 RMSNorm on bf16 input normalises in fp32 and returns bf16, bit-equal to LlamaRMSNorm."""
    ours = randomize(RMSNorm(32)).to(torch.bfloat16)
    llama = LlamaRMSNorm(32, eps=1e-6).to(torch.bfloat16)
    llama.load_state_dict(ours.state_dict())
    x = (torch.randn(4, 32) * 100).to(torch.bfloat16)
    with torch.no_grad():
        y = ours(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, llama(x))
        # Close to the fp32 result: only bf16 rounding separates them.
        norm32 = RMSNorm(32)
        norm32.weight.copy_(ours.weight.float())
        assert max_err(y, norm32(x.float())) <= 0.02 * ours.weight.float().abs().max().item()


def test_build_norm_chooses_the_kind_and_rejects_unknown() -> None:
    assert isinstance(build_norm("rmsnorm", 8, 1e-6), RMSNorm)
    ln = build_norm("layernorm", 8, 1e-5, bias=False)
    assert isinstance(ln, LayerNorm) and ln.bias is None
    with pytest.raises(ValueError, match="unknown norm kind"):
        build_norm("batchnorm", 8, 1e-5)


# --- feed-forward ------------------------------------------------------------------------------


def test_mlp_with_gelu_tanh_equals_gpt2_gelu_new_computation() -> None:
    """fc_out(gelu_new(fc_in(x))) with transformers' NewGELUActivation as the oracle."""
    mlp = randomize(MLP(10, 40, activation="gelu_tanh"), std=0.3).eval()
    x = torch.randn(3, 7, 10)
    with torch.no_grad():
        h = x @ mlp.fc_in.weight.T + mlp.fc_in.bias
        expected = ACT2FN["gelu_new"](h) @ mlp.fc_out.weight.T + mlp.fc_out.bias
        assert max_err(mlp(x), expected) <= 1e-5


def test_activations_by_name_match_their_formulas() -> None:
    x = torch.linspace(-6, 6, 101)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert max_err(get_activation("gelu_tanh")(x), tanh_gelu) <= 1e-6
    assert max_err(get_activation("gelu")(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))) <= 1e-6
    assert torch.equal(get_activation("relu")(x), x.clamp(min=0))
    assert max_err(get_activation("silu")(x), x * torch.sigmoid(x)) <= 1e-6
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation("swish2")


def test_gated_mlp_equals_swiglu_formula_with_split_gate_and_up() -> None:
    """(SiLU(x W_gate^T) * (x W_up^T)) W_down^T, W_gate = first half of gate_up's rows."""
    ffn = randomize(GatedMLP(12, 20), std=0.3).eval()
    w_gate, w_up = ffn.gate_up.weight[:20], ffn.gate_up.weight[20:]
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        gate = x @ w_gate.T
        expected = (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ ffn.down.weight.T
        assert max_err(ffn(x), expected) <= 1e-5


def test_gated_mlp_equals_llama_mlp_with_copied_weights() -> None:
    config = LlamaConfig(
        hidden_size=16, intermediate_size=24, num_attention_heads=4, hidden_act="silu"
    )
    llama = randomize(LlamaMLP(config), seed=5, std=0.3).eval()
    ours = GatedMLP(16, 24).eval()
    with torch.no_grad():
        ours.gate_up.weight.copy_(torch.cat([llama.gate_proj.weight, llama.up_proj.weight]))
        ours.down.weight.copy_(llama.down_proj.weight)
        x = torch.randn(2, 6, 16)
        assert max_err(ours(x), llama(x)) <= 1e-5


@pytest.mark.parametrize(
    ("dim", "multiple_of", "multiplier", "hidden"),
    [
        (4096, 256, 1.0, 11008),  # LLaMA-7B
        (5120, 256, 1.0, 13824),  # LLaMA-13B
        (8192, 4096, 1.3, 28672),  # Llama-2-70B
        (4096, 1024, 1.3, 14336),  # Llama-3-8B
    ],
)
def test_swiglu_hidden_dim_gives_published_llama_widths(
    dim: int, multiple_of: int, multiplier: float, hidden: int
) -> None:
    assert swiglu_hidden_dim(dim, multiple_of, multiplier) == hidden


# --- positions ---------------------------------------------------------------------------------


def test_sinusoidal_table_matches_vaswani_formula_at_exact_points() -> None:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), d = 8."""
    table = sinusoidal_table(50, 8)
    assert table.shape == (50, 8)
    assert table[0].tolist() == [0.0, 1.0] * 4
    expected = {
        (1, 0): math.sin(1.0),
        (1, 1): math.cos(1.0),
        (3, 2): math.sin(3 / 10),  # 10000^(2/8) = 10
        (3, 5): math.cos(3 / 100),  # i = 2: 10000^(4/8) = 100
        (49, 6): math.sin(49 / 1000),  # i = 3: 10000^(6/8) = 1000
        (49, 7): math.cos(49 / 1000),
    }
    for (pos, col), value in expected.items():
        assert abs(table[pos, col].item() - value) <= 1e-6, (pos, col)
    big = sinusoidal_table(4096, 64)
    assert big.abs().max().item() <= 1.0
    pairs = big[:, 0::2] ** 2 + big[:, 1::2] ** 2  # sin^2 + cos^2 of the same angle
    assert max_err(pairs, torch.ones_like(pairs)) <= 1e-5


def test_sinusoidal_table_with_odd_dim_fills_every_column() -> None:
    table = sinusoidal_table(6, 5)
    even = sinusoidal_table(6, 6)
    assert table.shape == (6, 5)
    assert abs(table[5, 4].item() - math.sin(5 / 10000 ** (4 / 5))) <= 1e-6
    assert abs(table[5, 3].item() - math.cos(5 / 10000 ** (2 / 5))) <= 1e-6
    assert not torch.equal(table, even[:, :5])  # frequencies depend on d


def test_position_embeddings_look_up_rows_and_only_learned_is_saved() -> None:
    positions = torch.tensor([[4, 0, 2]])
    sin = SinusoidalPositionalEmbedding(8, 6)
    assert torch.equal(sin(positions), sinusoidal_table(8, 6)[positions])
    assert list(sin.state_dict()) == []
    learned = LearnedPositionalEmbedding(8, 6)
    assert torch.equal(learned(positions), learned.weight[positions])
    assert list(learned.state_dict()) == ["weight"]


# --- residual block ----------------------------------------------------------------------------


def make_block(pre_norm: bool) -> TransformerBlock:
    torch.manual_seed(7)
    block = TransformerBlock(
        attn=MultiHeadAttention(16, 4),
        ffn=MLP(16, 32, activation="gelu_tanh"),
        norm_attn=LayerNorm(16),
        norm_ffn=LayerNorm(16),
        pre_norm=pre_norm,
    )
    return randomize(block, seed=8, std=0.3).eval()


def test_pre_norm_block_equals_hand_composed_formula() -> None:
    """x' = x + Attn(LN1(x));  y = x' + FFN(LN2(x'))."""
    block = make_block(pre_norm=True)
    ln1, ln2 = block.norm_attn, block.norm_ffn
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = x + block.attn(F.layer_norm(x, (16,), ln1.weight, ln1.bias, 1e-5))
        y = h + block.ffn(F.layer_norm(h, (16,), ln2.weight, ln2.bias, 1e-5))
        assert max_err(block(x), y) <= 1e-5


def test_post_norm_block_equals_hand_composed_formula() -> None:
    """x' = LN1(x + Attn(x));  y = LN2(x' + FFN(x'))."""
    block = make_block(pre_norm=False)
    ln1, ln2 = block.norm_attn, block.norm_ffn
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = F.layer_norm(x + block.attn(x), (16,), ln1.weight, ln1.bias, 1e-5)
        y = F.layer_norm(h + block.ffn(h), (16,), ln2.weight, ln2.bias, 1e-5)
        assert max_err(block(x), y) <= 1e-5
        assert max_err(block(x), make_block(pre_norm=True)(x)) > 1e-2  # the flag matters
