"""Weight-only quantisation: int8 per-channel, int4 group-wise and NF4 (QLoRA) linear layers.

Weights are stored in 8 or 4 bits and widened inside the matrix multiply; activations stay in
floating point. On CPU the layers call torch's weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) with bfloat16 activations; elsewhere they dequantise on the fly.
NF4 layers (:mod:`lmarch.quant.nf4`) always dequantise on the fly: they are QLoRA's frozen base.
``quantize_`` swaps the ``nn.Linear`` layers of any model in place.
"""

from lmarch.quant.apply import DEFAULT_GROUP_SIZE, SCHEMES, quantize_, quantize_linear
from lmarch.quant.int4 import (
    INT4_GROUP_SIZES,
    Int4WeightOnlyLinear,
    dequantize_int4,
    int4_kernel_available,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from lmarch.quant.int8 import (
    Int8WeightOnlyLinear,
    dequantize_int8,
    int8_kernel_available,
    quantize_int8,
    round_up_to_bfloat16,
)
from lmarch.quant.nf4 import NF4Linear, NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "INT4_GROUP_SIZES",
    "SCHEMES",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "NF4Linear",
    "NF4Weight",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_nf4",
    "int4_kernel_available",
    "int8_kernel_available",
    "pack_int4",
    "quantize_",
    "quantize_int4",
    "quantize_int8",
    "quantize_nf4",
    "quantize_linear",
    "round_up_to_bfloat16",
    "unpack_int4",
]
