"""The Vaswani et al. 2017 encoder-decoder: shapes, masks, the label-smoothed loss, the
learning-rate schedule, configuration refusals, and learning to reverse a sequence."""

from __future__ import annotations

import math

import pytest
import torch

from lmarch.generation.seq2seq import greedy_decode
from lmarch.models.registry import config_from_dict, config_to_dict, count_parameters, get_preset
from lmarch.models.transformer import (
    IGNORE_INDEX,
    Seq2SeqLoss,
    Transformer,
    TransformerConfig,
    label_smoothed_cross_entropy,
    shift_right,
)
from lmarch.models.validate import ConfigError
from lmarch.train.config import TrainConfig
from lmarch.train.optim import transformer_lr
from lmarch.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS = 0, 1, 2


def tiny(**changes: object) -> TransformerConfig:
    fields = dict(
        vocab_size=23, block_size=24, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
        n_embd=32, intermediate_size=64, dropout=0.0,
    )  # fmt: skip
    return TransformerConfig(**{**fields, **changes})


def _inputs(seed: int = 0, vocab: int = 23) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (2, 10), generator=g)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0
    src[1, 6:] = PAD
    dec = torch.randint(3, vocab, (2, 8), generator=g)
    dec[:, 0] = BOS
    return src, mask, dec


@pytest.mark.parametrize("pre_norm", [False, True])
def test_shapes_and_causal_mask(pre_norm: bool) -> None:
    """Logits are [B, T, V]; changing target token t changes the logits of positions >= t
    only (the decoder's self-attention is masked, Vaswani et al. sec. 3.2.3)."""
    torch.manual_seed(0)
    model = Transformer(tiny(pre_norm=pre_norm)).eval()
    src, mask, dec = _inputs()
    with torch.no_grad():
        logits = model(src, mask, dec)
        assert logits.shape == (2, 8, 23)
        assert model.encode(src, mask).shape == (2, 10, 32)
        changed = dec.clone()
        changed[:, 5] = (dec[:, 5] - 2) % 20 + 3  # another token in every row
        other = model(src, mask, changed)
    assert torch.equal(other[:, :5], logits[:, :5])
    assert (other[:, 5:] - logits[:, 5:]).abs().amax(dim=-1).min().item() > 1e-4


def test_padding_cannot_change_real_positions() -> None:
    """What lies under the source's padding, or under a padded target's tail, does not reach
    any logit of a real position; and a padded row equals the same row run alone unpadded."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    src, mask, dec = _inputs(1)
    with torch.no_grad():
        logits = model(src, mask, dec)
        noisy = src.clone()
        noisy[1, 6:] = 9
        assert torch.equal(model(noisy, mask, dec), logits)
        alone = model(src[1:, :6], None, dec[1:])
        assert (alone[0] - logits[1]).abs().max().item() <= 1e-5
        dec_mask = torch.ones_like(dec)
        dec_mask[:, 6:] = 0
        padded = model(src, mask, dec, decoder_attention_mask=dec_mask)
        tail = dec.clone()
        tail[:, 6:] = 11
        again = model(src, mask, tail, decoder_attention_mask=dec_mask)
    assert torch.equal(again[:, :6], padded[:, :6])
    assert (padded[:, :6] - logits[:, :6]).abs().max().item() <= 1e-5  # causal already hides it


@pytest.mark.parametrize("pre_norm", [False, True])
def test_cached_decoding_equals_the_full_decoder(pre_norm: bool) -> None:
    """One token at a time through the encoder-decoder cache gives the teacher-forced logits."""
    torch.manual_seed(1)
    model = Transformer(tiny(pre_norm=pre_norm)).eval()
    src, mask, dec = _inputs(2)
    with torch.no_grad():
        full = model(src, mask, dec)
        cache = model.make_cache(model.encode(src, mask), mask, dec.shape[1])
        steps = [model.decode_step(dec[:, t : t + 1], cache, t) for t in range(8)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def _torch_stacks(model: Transformer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torch.nn's own Transformer encoder and decoder (post- or pre-LN as ``model``) holding
    ``model``'s weights: their in_proj rows are q, k, v as ours are."""
    nn, c = torch.nn, model.config
    kw = dict(dropout=0.0, batch_first=True, norm_first=c.pre_norm)
    enc_layer = nn.TransformerEncoderLayer(c.n_embd, c.n_head, c.intermediate_size, **kw)
    dec_layer = nn.TransformerDecoderLayer(c.n_embd, c.n_head, c.intermediate_size, **kw)
    final = (lambda: nn.LayerNorm(c.n_embd)) if c.pre_norm else (lambda: None)
    encoder = nn.TransformerEncoder(
        enc_layer, c.n_encoder_layer, final(), enable_nested_tensor=False
    )
    decoder = nn.TransformerDecoder(dec_layer, c.n_decoder_layer, final())

    def attention(theirs: torch.nn.Module, *ours: torch.nn.Module) -> None:
        theirs.in_proj_weight.copy_(torch.cat([m.weight for m in ours[:-1]]))
        theirs.in_proj_bias.copy_(torch.cat([m.bias for m in ours[:-1]]))
        theirs.out_proj.load_state_dict(ours[-1].state_dict())

    with torch.no_grad():
        for theirs, ours in zip(encoder.layers, model.encoder.blocks):
            attention(theirs.self_attn, ours.attn.qkv, ours.attn.out)
            pairs = [("norm1", ours.norm_attn), ("norm2", ours.norm_ffn)]
            pairs += [("linear1", ours.ffn.fc_in), ("linear2", ours.ffn.fc_out)]
            for name, module in pairs:
                getattr(theirs, name).load_state_dict(module.state_dict())
        for theirs, ours in zip(decoder.layers, model.decoder.blocks):
            attention(theirs.self_attn, ours.self_attn.qkv, ours.self_attn.out)
            attention(
                theirs.multihead_attn, ours.cross_attn.q, ours.cross_attn.kv, ours.cross_attn.out
            )
            pairs = [
                ("norm1", ours.norm_self),
                ("norm2", ours.norm_cross),
                ("norm3", ours.norm_ffn),
            ]
            pairs += [("linear1", ours.ffn.fc_in), ("linear2", ours.ffn.fc_out)]
            for name, module in pairs:
                getattr(theirs, name).load_state_dict(module.state_dict())
        if c.pre_norm:
            encoder.norm.load_state_dict(model.encoder.norm_f.state_dict())
            decoder.norm.load_state_dict(model.decoder.norm_f.state_dict())
    return encoder.eval(), decoder.eval()


@pytest.mark.parametrize("pre_norm", [False, True])
def test_stacks_equal_torch_nn_transformer_layers(pre_norm: bool) -> None:
    """The encoder and decoder equal torch.nn.TransformerEncoder / TransformerDecoder (the
    paper's post-LN layers, or norm_first with final norms) holding the same weights, with
    source padding and the causal target mask: logits to 1e-5."""
    torch.manual_seed(0)
    model = Transformer(tiny(pre_norm=pre_norm)).eval()
    with torch.no_grad():  # gains start at 1 and biases at 0: perturb them so they count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    encoder, decoder = _torch_stacks(model)
    src, mask, dec = _inputs(4)
    with torch.no_grad():
        memory = encoder(
            model.encoder.embed(model.tok_emb(src) * math.sqrt(32), 0),
            src_key_padding_mask=mask == 0,
        )
        target = model.decoder.embed(model.tok_emb(dec) * math.sqrt(32), 0)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(dec.shape[1])
        states = decoder(
            target, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mask == 0
        )
        theirs = states @ model.tok_emb.weight.T
        assert (model(src, mask, dec) - theirs).abs().max().item() <= 1e-5
        assert (model.encode(src, mask)[0] - memory[0]).abs().max().item() <= 1e-5


def test_embeddings_shared_tied_or_separate() -> None:
    """share_embeddings: one table for both sides; tie_embeddings: the head is the target
    table (sec. 3.4); a separate target vocabulary gets its own table and head rows. The
    counts differ by exactly the tables added."""
    shared = Transformer(tiny())
    assert shared.tgt_emb is None and shared.lm_head.weight is shared.tok_emb.weight
    untied = Transformer(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    two = Transformer(tiny(share_embeddings=False, target_vocab_size=17))
    assert two.tgt_emb.weight.shape == (17, 32) and two.lm_head.weight is two.tgt_emb.weight
    src, mask, dec = _inputs(3, vocab=17)
    assert two(src, mask, dec).shape == (2, 8, 17)
    base = count_parameters(tiny())
    assert count_parameters(tiny(tie_embeddings=False)) == base + 23 * 32
    assert count_parameters(tiny(share_embeddings=False, target_vocab_size=17)) == base + 17 * 32


def test_transformer_base_has_the_papers_size() -> None:
    """Base model (N=6, d=512, d_ff=2048, h=8) over a shared 37000-token table: the closed-form
    count, ~63M (the paper's table 3 says 65M for its vocabulary)."""
    d, f, n, v = 512, 2048, 6, 37000
    attention = 4 * d * d + 4 * d
    ffn = 2 * d * f + f + d
    encoder = n * (attention + ffn + 2 * 2 * d)
    decoder = n * (2 * attention + ffn + 3 * 2 * d)
    expected = v * d + encoder + decoder
    assert count_parameters(TransformerConfig()) == expected
    assert 62e6 < expected < 65e6
    base = get_preset("transformer-base").config
    assert base == TransformerConfig() and config_from_dict(config_to_dict(base)) == base


def test_embeddings_are_scaled_by_sqrt_d_and_positions_are_sinusoids() -> None:
    """The encoder's first input is Emb(x) * sqrt(d) + PE with the paper's interleaved sines."""
    torch.manual_seed(0)
    model = Transformer(tiny())
    src = torch.tensor([[5, 6, 7]])
    x = model.encoder.embed(model.tok_emb(src) * model.embed_scale, 0)
    pos = torch.arange(3, dtype=torch.float64)[:, None]
    i = torch.arange(16, dtype=torch.float64)
    angles = pos / 10000 ** (2 * i / 32)
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1).float()
    expected = model.tok_emb.weight[src[0]] * math.sqrt(32) + pe
    assert (x[0] - expected).abs().max().item() <= 1e-5


def test_label_smoothing_matches_the_formula() -> None:
    """L = mean over non-ignored t of (1 - eps)(-log p_y) + eps/V sum_k(-log p_k)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX
    logp = logits.log_softmax(-1)
    keep = labels != IGNORE_INDEX
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    uniform = -logp.mean(-1)
    for eps in (0.0, 0.1, 0.3):
        expected = ((1 - eps) * nll + eps * uniform)[keep].mean()
        got = label_smoothed_cross_entropy(logits, labels, eps)
        assert abs(got.item() - expected.item()) <= 1e-6
    with pytest.raises(ValueError, match="label smoothing"):
        label_smoothed_cross_entropy(logits, labels, 1.0)


def test_shift_right_starts_with_the_start_token() -> None:
    labels = torch.tensor([[7, 8, 9, 2], [5, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift_right(labels, BOS, PAD).tolist() == [[1, 7, 8, 9], [1, 5, 2, PAD]]


def test_schedule_matches_equation_3() -> None:
    """lr(n) = d^-0.5 min(n^-0.5, n warmup^-1.5) with n = step + 1: linear up to the peak
    d^-0.5 warmup^-0.5 at n = warmup, then 1/sqrt(n)."""
    d, w = 512, 4000
    for step in (0, 1, 99, 3998, 3999, 4000, 10_000, 99_999):
        n = step + 1
        assert transformer_lr(step, d, w) == pytest.approx(d**-0.5 * min(n**-0.5, n * w**-1.5))
    assert transformer_lr(3999, d, w) == pytest.approx((d * w) ** -0.5)
    assert max(transformer_lr(s, d, w) for s in range(0, 8000, 7)) <= (d * w) ** -0.5 + 1e-12
    assert transformer_lr(15_999, d, w, scale=2.0) == pytest.approx(2 * d**-0.5 / 16000**0.5)
    with pytest.raises(ValueError, match="warmup"):
        transformer_lr(0, d, 0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(target_vocab_size=17), "share_embeddings"),
        (dict(n_head=5), "n_embd"),
        (dict(pad_token_id=23), "pad_token_id"),
        (dict(activation="mish"), "activation"),
        (dict(attention="flash", attention_dropout=0.1), "attention"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_decoder_layer=0), "n_decoder_layer"),
    ],
)
def test_config_refuses_bad_values_by_name(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        tiny(**changes)
    assert info.value.field == field
    assert f".{field}" in str(info.value)


# ---- learning: reverse a sequence ----------------------------------------------------------

VOCAB, LENGTH = 16, 8


class ReverseTask:
    """Batches for the Trainer: sources of 3..8 tokens (padded), targets the reversed tokens
    then <eos>; ``(input_ids, attention_mask, decoder_input_ids, labels)``."""

    def __init__(self, seed: int, batch_size: int = 32) -> None:
        self.batch_size, self.block_size = batch_size, LENGTH + 1
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        g = generator or self.generator
        b = self.batch_size
        lengths = torch.randint(3, LENGTH + 1, (b,), generator=g)
        mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        src = torch.randint(3, VOCAB, (b, LENGTH), generator=g).masked_fill(mask == 0, PAD)
        labels = torch.full((b, LENGTH + 1), IGNORE_INDEX)
        for i, n in enumerate(lengths.tolist()):
            labels[i, :n] = src[i, :n].flip(0)
            labels[i, n] = EOS
        return src, mask, shift_right(labels, BOS, PAD), labels


def test_tiny_transformer_learns_to_reverse() -> None:
    """200 Trainer steps with the label-smoothed loss (eps 0.1) take the post-LN model from
    ln 16 = 2.77 nats to < 0.8 (the smoothed target's own entropy is 0.565), and greedy
    decoding then reverses >= 80% of unseen sources exactly."""
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=VOCAB, block_size=16, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
        n_embd=64, intermediate_size=128, dropout=0.0,
    )  # fmt: skip
    model = Transformer(config)
    train = TrainConfig(
        batch_size=32, max_iters=200, learning_rate=6e-3, min_lr=3e-4, warmup_iters=20,
        eval_interval=1000, eval_iters=4, log_interval=50, device="cpu", weight_decay=0.0,
        beta2=0.98,
    )  # fmt: skip
    trainer = Trainer(model, ReverseTask(1), ReverseTask(2), train, loss_fn=Seq2SeqLoss(0.1))
    result = trainer.fit()
    assert result.val_loss < 0.8
    src, mask, _, labels = ReverseTask(3, batch_size=64).sample()
    out = greedy_decode(model, src, mask, max_new_tokens=LENGTH + 1)
    right = 0
    for i, n in enumerate(mask.sum(1).tolist()):
        right += out[i, 1 : n + 2].tolist() == labels[i, : n + 1].tolist()
    assert right / 64 >= 0.8
