"""Memory accounting: KV cache and optimizer state by hand, activations against what autograd
actually saves for the backward pass (a saved-tensors hook summing the storages)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmarch.analysis.memory import kv_cache_bytes_per_token, training_memory
from lmarch.errors import LmarchError
from lmarch.models.registry import PRESETS, build_model, preset_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kv_cache_by_hand() -> None:
    # Llama 3 8B: 32 layers x (K + V) x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token
    assert kv_cache_bytes_per_token(PRESETS["llama3-8b"].config, "bf16") == 32 * 2 * 8 * 128 * 2
    # LLaMA 2 7B has no GQA: 4x more per token than 8 KV heads would need
    assert kv_cache_bytes_per_token(PRESETS["llama2-7b"].config, "bf16") == 32 * 2 * 4096 * 2
    assert kv_cache_bytes_per_token(PRESETS["gpt2"].config) == 12 * 2 * 768 * 4
    # T5: only the decoder's self-attention grows per generated token
    assert kv_cache_bytes_per_token(PRESETS["t5-small"].config) == 6 * 2 * 8 * 64 * 4
    assert kv_cache_bytes_per_token(PRESETS["bert-base"].config) == 0
    assert kv_cache_bytes_per_token(PRESETS["lstm-char-small"].config) == 0


def test_weights_gradients_and_adam_state_by_hand() -> None:
    """16 bytes per parameter either way (ZeRO, sec. 3.1): fp32 4+4+8; bf16 2+2+8 + 4 master."""
    config = PRESETS["gpt2"].config
    n = 124_439_808
    fp32 = training_memory(config, n, 1024, 1, "fp32")
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.master_weights) == (
        4 * n, 4 * n, 8 * n, 0,
    )  # fmt: skip
    bf16 = training_memory(config, n, 1024, 1, "bf16")
    assert bf16.weights + bf16.gradients + bf16.optimizer + bf16.master_weights == 16 * n
    assert bf16.activations < fp32.activations
    # checkpointing keeps each layer input; the fp32 logits (2 x 1024 x 50257 x 4) remain
    assert fp32.activations_checkpointed < fp32.activations / 2
    with pytest.raises(LmarchError, match="unknown precision 'int3'"):
        training_memory(config, n, 8, 1, "int3")


def _saved_bytes(config, seq_len: int, batch: int) -> int:
    """Bytes of the distinct storages autograd saves in a forward + loss (weights excluded)."""
    torch.manual_seed(0)
    model = build_model(config)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    return sum(saved.values())


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("gpt-char-tiny", {"attention": "reference"}),
        ("gpt-char-small", {"attention": "reference", "n_layer": 2}),  # dropout 0.2: masks too
        ("llama-tiny", {"attention": "reference"}),
        ("lstm-char-tiny", {}),
    ],
)
def test_activations_within_20_percent_of_what_autograd_saves(name: str, changes: dict) -> None:
    config = preset_config(name, **changes)
    t = min(64, config.block_size)
    measured = _saved_bytes(config, t, 2)
    n = sum(p.numel() for p in build_model(config).parameters())
    estimate = training_memory(config, n, t, 2, "fp32").activations
    assert abs(estimate - measured) / measured < 0.2, (estimate, measured)
