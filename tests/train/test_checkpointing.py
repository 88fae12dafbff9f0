"""Gradient checkpointing per block: the same loss and bit-identical gradients (tolerance 0) with
and without it, dropout on, for every family; composition with the native swaps, LoRA, ALBERT's
shared block, decoding with a cache, deepcopy; the Trainer option."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmarch.data.masking import MaskedLMBatches, MaskedLMCollator
from lmarch.errors import LmarchError
from lmarch.models import GPT, GPTConfig
from lmarch.models.bert import BertConfig
from lmarch.models.bigram import BigramConfig, BigramLM
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.native import accelerate, native_available
from lmarch.native.swaps import native_modules
from lmarch.peft import add_lora, mark_only_lora_trainable
from lmarch.quant.apply import quantize_
from lmarch.train.checkpointing import (
    CheckpointedForward,
    checkpoint_blocks,
    checkpointed_blocks,
    uncheckpoint_blocks,
)
from lmarch.train.config import TrainConfig
from lmarch.train.objectives import masking_for, objective_loss, objective_model
from lmarch.train.trainer import Trainer, causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB, T, B = 60, 24, 4
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4


def _gpt(**kw) -> GPT:
    cfg = dict(vocab_size=VOCAB, block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=0.1)
    return GPT(GPTConfig(**{**cfg, **kw}))


def _llama() -> Llama:
    return Llama(
        LlamaConfig(
            vocab_size=VOCAB, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
            intermediate_size=64, dropout=0.1,
        )
    )  # fmt: skip


def _bert_config(variant: str) -> BertConfig:
    base = dict(
        vocab_size=VOCAB, block_size=40, n_layer=3, n_head=2, n_embd=32, intermediate_size=64,
        dropout=0.1, variant=variant,
    )  # fmt: skip
    if variant == "roberta":
        base["pad_token_id"] = 1
    if variant == "albert":  # factorised embeddings, one block shared by all three layers
        base.update(embedding_size=16, n_layer_groups=1)
    return BertConfig(**base)


def _causal_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _masked_batch(objective: str, pad: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    seqs = [[CLS, *torch.randint(5, VOCAB, (n,), generator=g).tolist(), SEP] for n in (9, 14, 20)]
    specials = [PAD, UNK, CLS, SEP, MASK]
    collator = MaskedLMCollator(MASK, VOCAB, specials, masking_for(objective))
    batches = MaskedLMBatches(seqs * 2, collator, B, pad, seed=0, with_noise=objective == "rtd")
    return batches.sample()


def _loss_and_grads(model: nn.Module, loss_fn, batch) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout masks: the same draws in both runs
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_identical(model: nn.Module, loss_fn, batch, expect_blocks: int) -> None:
    """Loss and every gradient of ``model`` equal bit for bit after checkpointing its blocks."""
    loss, grads = _loss_and_grads(model, loss_fn, batch)
    assert checkpoint_blocks(model) == expect_blocks
    loss_ck, grads_ck = _loss_and_grads(model, loss_fn, batch)
    assert torch.equal(loss, loss_ck), (loss.item(), loss_ck.item())
    assert grads.keys() == grads_ck.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ck[name]), name


def _family_case(name: str) -> tuple[nn.Module, object, tuple, int]:
    """(model, loss function, batch, distinct blocks) of one family."""
    torch.manual_seed(0)
    if name == "gpt":
        return _gpt(), causal_lm_loss, _causal_batch(), 3
    if name == "llama":
        return _llama(), causal_lm_loss, _causal_batch(), 3
    variant, objective = {
        "bert": ("bert", "mlm"),
        "roberta": ("roberta", "mlm"),
        "albert": ("albert", "mlm"),
        "electra": ("electra", "rtd"),
    }[name]
    cfg = _bert_config(variant)
    model = objective_model(objective, cfg)
    # ALBERT: 1 shared block; ELECTRA: the generator's 3 blocks and the discriminator's 3
    blocks = {"albert": 1, "electra": 6}.get(name, 3)
    return model, objective_loss(objective), _masked_batch(objective, cfg.pad_token_id), blocks


@pytest.mark.parametrize("family", ["gpt", "llama", "bert", "roberta", "albert", "electra"])
def test_gradients_identical_per_family(family: str) -> None:
    """Dropout 0.1 everywhere; the random state is restored for the recomputation, so the
    masks, the loss and every parameter's gradient are the same to the bit (tolerance 0)."""
    model, loss_fn, batch, blocks = _family_case(family)
    _assert_identical(model, loss_fn, batch, blocks)


@pytest.mark.skipif(not native_available(), reason="the native library is not built here")
@pytest.mark.parametrize("order", ["accelerate_first", "checkpoint_first"])
def test_composes_with_native_swaps(order: str) -> None:
    """The fused native GPT-2 block (its dropout seed drawn from PyTorch's generator) is
    swapped in whichever runs first, and its recomputed gradients are identical too."""
    torch.manual_seed(0)
    reference = _gpt()
    accelerate(reference, training=True)
    model = copy.deepcopy(reference)
    if order == "accelerate_first":
        accelerate(model, training=True)
        assert checkpoint_blocks(model) == 3
    else:
        model = _gpt()
        model.load_state_dict(reference.state_dict())
        assert checkpoint_blocks(model) == 3
        accelerate(model, training=True)
    assert native_modules(model)["NativeGPTBlock"] == 3
    batch = _causal_batch()
    loss, grads = _loss_and_grads(reference, causal_lm_loss, batch)
    loss_ck, grads_ck = _loss_and_grads(model, causal_lm_loss, batch)
    assert torch.equal(loss, loss_ck)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ck[name]), name


def test_composes_with_lora_dropout() -> None:
    """LoRA adapters (dropout 0.1 on their input) on a frozen base, with native swaps: only
    the adapters have gradients, identical with checkpointing (the blocks' inputs need no grad)."""
    torch.manual_seed(0)
    model = _gpt(dropout=0.0)
    accelerate(model, training=True)
    add_lora(model, r".*\.(qkv|fc_in)", rank=4, alpha=8, dropout=0.1)
    mark_only_lora_trainable(model)
    loss, grads = _loss_and_grads(model, causal_lm_loss, _causal_batch())
    assert sorted({name.rsplit(".", 1)[-1] for name in grads}) == ["lora_A", "lora_B"]
    assert checkpoint_blocks(model) == 3
    loss_ck, grads_ck = _loss_and_grads(model, causal_lm_loss, _causal_batch())
    assert torch.equal(loss, loss_ck)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ck[name]), name


def test_composes_with_lora_on_a_quantised_base() -> None:
    """QLoRA's shape: a LLaMA with int8 weight-only layers, adapters (dropout 0.1) on top:
    the adapters' gradients are identical with checkpointing."""
    torch.manual_seed(0)
    model = _llama()
    quantize_(model, "int8", skip=lambda name, layer: name == "lm_head")
    add_lora(model, r"blocks\.\d+\.(attn\.qkv|ffn\.down)", rank=4, alpha=8, dropout=0.1)
    mark_only_lora_trainable(model)
    loss, grads = _loss_and_grads(model, causal_lm_loss, _causal_batch())
    assert len(grads) == 12  # A and B of 2 layers in 3 blocks
    assert checkpoint_blocks(model) == 3
    loss_ck, grads_ck = _loss_and_grads(model, causal_lm_loss, _causal_batch())
    assert torch.equal(loss, loss_ck)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ck[name]), name


def test_decoding_with_a_cache_and_no_grad_run_plainly(monkeypatch) -> None:
    """Under no_grad, or with a KV cache (a recomputation would write it twice), the block is
    not checkpointed: cached decoding gives the same logits as before, and
    ``torch.utils.checkpoint`` is entered only by a training forward (once per block)."""
    import lmarch.train.checkpointing as ck

    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(0, VOCAB, (1, 6))

    def decode() -> torch.Tensor:
        cache = model.make_cache(1)
        model(ids[:, :5], cache=cache)
        return model(ids[:, 5:], cache=cache, start=5)

    with torch.no_grad():
        before = decode()
    checkpoint_blocks(model)
    calls = []
    real = ck.checkpoint
    monkeypatch.setattr(ck, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        assert torch.equal(decode(), before)
        model(ids)
    assert calls == []
    model(ids)
    assert len(calls) == 3


def test_state_dict_deepcopy_and_undo() -> None:
    """Keys unchanged; a deepcopy's blocks recompute themselves, not the original's; undo
    restores the class forward; a second call adds nothing."""
    torch.manual_seed(0)
    model = _gpt()
    keys = list(model.state_dict())
    assert checkpoint_blocks(model) == 3 and checkpoint_blocks(model) == 3
    assert list(model.state_dict()) == keys and checkpointed_blocks(model) == 3
    twin = copy.deepcopy(model)
    for block, copied in zip(model.blocks, twin.blocks, strict=True):
        assert isinstance(copied.forward, CheckpointedForward)
        assert copied.forward.block is copied and copied is not block
    assert uncheckpoint_blocks(model) == 3 and checkpointed_blocks(model) == 0
    assert "forward" not in model.blocks[0].__dict__


def _trainer(grad_checkpointing: bool, model: nn.Module | None = None) -> Trainer:
    from lmarch.data.batches import RandomBlockSampler

    torch.manual_seed(0)
    model = model if model is not None else _gpt()
    ids = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(
        batch_size=4, max_iters=6, warmup_iters=2, eval_interval=6, eval_iters=2,
        log_interval=3, device="cpu", seed=0, grad_checkpointing=grad_checkpointing,
    )  # fmt: skip
    return Trainer(
        model,
        RandomBlockSampler(ids[:3000], 32, 4, 0),
        RandomBlockSampler(ids[3000:], 32, 4, 1),
        cfg,
    )


def test_trainer_option_trains_identically() -> None:
    """Six AdamW steps with dropout: the same weights to the bit with and without
    ``grad_checkpointing``."""
    plain, checkpointed = _trainer(False), _trainer(True)
    assert checkpointed_blocks(checkpointed.model) == 3 and checkpointed_blocks(plain.model) == 0
    for trainer in (plain, checkpointed):
        torch.manual_seed(5)  # the dropout masks draw from the global generator
        trainer.fit()
    a, b = plain.model.state_dict(), checkpointed.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_trainer_refuses_a_model_without_blocks() -> None:
    with pytest.raises(LmarchError, match="BigramLM has no Transformer block to checkpoint"):
        _trainer(True, BigramLM(BigramConfig(vocab_size=VOCAB)))


def _seq2seq_case(name: str) -> tuple[nn.Module, tuple]:
    """A tiny T5 / BART / Transformer with dropout 0.1 and a padded seq2seq batch."""
    from lmarch.data.seq2seq import Seq2SeqSpecials, collate_seq2seq
    from lmarch.models.bart import Bart, BartConfig
    from lmarch.models.t5 import T5, T5Config
    from lmarch.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, block_size=32, n_head=2, n_embd=32, intermediate_size=64)
    if name == "t5":
        model: nn.Module = T5(T5Config(n_layer=2, head_dim=16, dropout=0.1, **shape))
    elif name == "bart":
        model = Bart(BartConfig(n_encoder_layer=2, n_decoder_layer=2, dropout=0.1, **shape))
    else:
        model = Transformer(
            TransformerConfig(n_encoder_layer=2, n_decoder_layer=2, dropout=0.1, **shape)
        )
    specials = Seq2SeqSpecials.of(model.config)
    g = torch.Generator().manual_seed(3)
    pairs = [
        (specials.wrap(torch.randint(5, VOCAB, (s,), generator=g).tolist()),
         specials.wrap(torch.randint(5, VOCAB, (t,), generator=g).tolist()))
        for s, t in ((12, 5), (7, 9), (15, 3))
    ]  # fmt: skip
    return model, collate_seq2seq(pairs, specials.pad_id, specials.decoder_start_id)


@pytest.mark.parametrize("family", ["t5", "bart", "transformer"])
def test_gradients_identical_for_encoder_decoders(family: str) -> None:
    """The encoder's TransformerBlocks and the decoder's CrossAttentionBlocks are all
    checkpointed (2 + 2), and loss and gradients stay identical to the bit, dropout on."""
    from lmarch.models.transformer import Seq2SeqLoss
    from lmarch.nn.cross_attention import CrossAttentionBlock

    model, batch = _seq2seq_case(family)
    _assert_identical(model, Seq2SeqLoss(0.1), batch, 4)
    decoder_blocks = [m for m in model.modules() if isinstance(m, CrossAttentionBlock)]
    assert len(decoder_blocks) == 2
    assert all(isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in decoder_blocks)
