"""Linear layers holding GGUF K-quant super-blocks (Q4_K, Q5_K, Q6_K) exactly as a file
stores them.

llama.cpp's K-quant files (Q4_K_M, Q4_K_S, Q5_K_M, Q6_K, ...) store most projections in Q4_K or
Q5_K and some (usually ``attn_v``, ``ffn_down`` and the output head) in Q5_K or Q6_K; all cut a
row into super-blocks of 256 weights with small per-sub-block scales (layouts:
:mod:`lmarch.weights.gguf_kquants`):

    Q4_K (4.5 bits a weight):     w = d sc_j q - dmin m_j,  q in 0..15, 8 sub-blocks of 32
    Q5_K (5.5 bits a weight):     the same with q in 0..31
    Q6_K (6.5625 bits a weight):  w = d sc_j q,             q in -32..31, 16 sub-blocks of 16

:class:`KQuantLinear` keeps those bytes as a uint8 buffer and multiplies by them with lmarch's
native kernels (``native/kquant.c``: activations rounded to 16 bits per block of 32, integer
dot products, as for Q4_1 in :mod:`lmarch.quant.blockq`); elsewhere (GPU, training, no C
compiler) it multiplies by the dequantised weight, bit for bit the gguf package's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.native.kquant import KQUANT_OPS, kquant_matmul_eager
from lmarch.quant.blockq import _BlockLinear
from lmarch.weights.gguf_kquants import BLOCK_SHAPES, QK_K, dequantize_blocks

# the K-quant types kept as stored and multiplied natively
NATIVE_KQUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _dequantize_rows(blocks: Tensor, type_name: str) -> Tensor:
    raw = np.ascontiguousarray(blocks.detach().cpu().numpy())
    values = dequantize_blocks(raw, type_name).reshape(blocks.shape[0], -1)
    return torch.from_numpy(values).to(blocks.device)


# numpy inside: a compiled graph calls it as one opaque op. (An op rather than
# ``torch.compiler.disable``, whose decorator imports Dynamo: ~1 s and ~80 MB on every load.)
_LIBRARY = torch.library.Library("lmarch", "FRAGMENT")
_LIBRARY.define("kquant_dequantize(Tensor blocks, str type_name) -> Tensor")
_LIBRARY.impl("kquant_dequantize", _dequantize_rows, "CompositeExplicitAutograd")


@torch.library.register_fake("lmarch::kquant_dequantize")
def _dequantize_rows_fake(blocks: Tensor, type_name: str) -> Tensor:
    k = blocks.shape[1] // BLOCK_SHAPES[type_name][1] * QK_K
    return blocks.new_empty(blocks.shape[0], k, dtype=torch.float32)


def dequantize_rows(blocks: Tensor, type_name: str) -> Tensor:
    """Stored rows uint8 [N, K/256 * block bytes] of ``type_name`` -> float32 [N, K] on the
    rows' device, exactly ``gguf.quants.dequantize``'s values."""
    if torch.compiler.is_compiling():
        return torch.ops.lmarch.kquant_dequantize(blocks, type_name)
    return _dequantize_rows(blocks, type_name)


class KQuantLinear(_BlockLinear):
    """``nn.Linear`` whose weight is Q4_K, Q5_K or Q6_K super-blocks: buffer ``blocks`` uint8
    [out, in/256 * block bytes] (144, 176 or 210 bytes a super-block), each row the bytes of
    one GGUF row; ``type_name`` says which format."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        type_name: str = "Q4_K",
        bias: bool = False,
        device=None,  # type: ignore[no-untyped-def]
    ) -> None:
        if type_name not in NATIVE_KQUANTS:
            raise LmarchError(
                f"KQuantLinear holds {', '.join(NATIVE_KQUANTS)}, not {type_name}",
                hint="dequantise other types",
            )
        if in_features % QK_K:
            raise LmarchError(
                f"{type_name} needs in_features divisible by {QK_K}, got {in_features}",
                hint="keep this layer in float",
            )
        super().__init__(in_features, out_features, bias, device)
        self.type_name = type_name
        row_bytes = in_features // QK_K * BLOCK_SHAPES[type_name][1]
        self.register_buffer(
            "blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device)
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, type={self.type_name}"

    @classmethod
    def from_blocks(
        cls, blocks: Tensor, type_name: str, bias: Tensor | None = None
    ) -> KQuantLinear:
        """A layer holding the stored rows ``blocks`` uint8 [N, K/256 * block bytes] of a
        ``type_name`` tensor (K is read off the row length)."""
        n, row_bytes = blocks.shape
        per_block = BLOCK_SHAPES[type_name][1] if type_name in BLOCK_SHAPES else 0
        if not per_block or row_bytes % per_block:
            raise LmarchError(f"rows of {row_bytes} bytes are not whole {type_name} super-blocks")
        layer = cls(
            row_bytes // per_block * QK_K, n, type_name, bias=bias is not None, device="meta"
        )
        layer.blocks = blocks.to(torch.uint8).contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        return layer

    def dequantized_weight(self) -> Tensor:
        """W~, float32 [out, in], exactly as ``gguf.quants.dequantize`` gives it."""
        return dequantize_rows(self.blocks, self.type_name)

    def _kernel(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return KQUANT_OPS[self.type_name](x, self.blocks)
        return kquant_matmul_eager(self.type_name, x, self.blocks)


class KQuantEmbedding(nn.Module):
    """A token-embedding table kept in K-quant super-blocks (row i of the table is row i
    of the stored tensor). Built from a :class:`KQuantLinear` output head it shares that
    head's bytes, so a model whose head is tied to its embeddings holds the table once."""

    def __init__(self, blocks: Tensor, type_name: str) -> None:
        super().__init__()
        self.type_name = type_name
        self.num_embeddings = blocks.shape[0]
        self.embedding_dim = blocks.shape[1] // BLOCK_SHAPES[type_name][1] * QK_K
        self.register_buffer("blocks", blocks)

    @classmethod
    def tied_to(cls, head: KQuantLinear) -> KQuantEmbedding:
        """The embedding table that ``head``'s weight is (same storage)."""
        return cls(head.blocks, head.type_name)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [...] -> float32 rows [..., D], exactly the dequantised table's rows."""
        rows = dequantize_rows(self.blocks[ids.reshape(-1)], self.type_name)
        return rows.reshape(*ids.shape, self.embedding_dim)


class RowConcatLinear(nn.Module):
    """y = [x W_1^T | x W_2^T | ...]: one fused projection (LLaMA's ``qkv`` or ``gate_up``)
    whose parts a file stores in different block formats (a Q4_K_M file keeps ``attn_q`` and
    ``attn_k`` in Q4_K but ``attn_v`` of some layers in Q6_K), each part a layer of its own."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        widths = {int(p.in_features) for p in parts}
        if len(widths) != 1:
            raise LmarchError(f"fused parts take different input widths {sorted(widths)}")
        self.in_features = widths.pop()
        self.out_features = sum(int(p.out_features) for p in parts)
        self.bias = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def dequantized_weight(self) -> Tensor:
        """The parts' dequantised weights stacked along rows, float32 [out, in]."""
        return torch.cat([p.dequantized_weight() for p in self.parts], dim=0)

    def forward(self, x: Tensor) -> Tensor:
        """Each part on ``x``, outputs concatenated along the last dim."""
        return torch.cat([p(x) for p in self.parts], dim=-1)


__all__ = [
    "NATIVE_KQUANTS",
    "KQuantEmbedding",
    "KQuantLinear",
    "RowConcatLinear",
    "dequantize_rows",
]
