"""What ``lmarch serve`` loads: the weight format ``--quant auto`` picks for batching."""

from __future__ import annotations

from lmarch.loading.speed import native_ready
from lmarch.serve.state import serving_quant


def test_auto_quant_for_batched_serving(tiny_llama_folder) -> None:
    # SmolLM2's GGUF holds Q4 blocks: one row at a time they run on lmarch's native kernels,
    # batched on PyTorch's int4 kernel (which multiplies all rows at once)
    alone = serving_quant("smollm2-135m", "auto", 1)
    batched = serving_quant("smollm2-135m", "auto", 8)
    assert alone == "auto"
    assert batched == ("int4" if native_ready(quiet=True) else "auto")
    assert serving_quant("smollm2-135m", "q4", 8) == "q4"  # asked for: kept
    assert serving_quant(str(tiny_llama_folder), "auto", 8) == "auto"  # not a GGUF
