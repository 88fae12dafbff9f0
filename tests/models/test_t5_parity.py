"""T5 v1, T5 v1.1 and mT5 against random-initialised transformers models of the same weights:
logits with encoder padding (<= 1e-4), gradients of a loss (1e-4 relative), greedy and beam
generation token for token, and one-token decoding through the cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.generation.beam import BeamSearchConfig
from lmarch.generation.seq2seq import greedy_decode, seq2seq_beam_search
from lmarch.models.t5 import T5, T5Config
from lmarch.models.validate import ConfigError
from lmarch.weights.hf_t5 import load_hf_t5, t5_to_ours

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)
VARIANTS = ["t5-v1", "t5-v1_1", "mt5"]


def hf_model(variant: str, seed: int = 0, **over) -> nn.Module:
    """A random transformers model; v1.1 and mT5 get a head of their own (their checkpoints'
    untied lm_head), which transformers 5 keeps untied when loading."""
    torch.manual_seed(seed)
    if variant == "mt5":
        model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**SHAPE, **over))
    elif variant == "t5-v1_1":
        cfg = transformers.T5Config(
            **SHAPE, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **over
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**SHAPE, **over))
    if variant != "t5-v1":
        model.lm_head.weight = nn.Parameter(torch.randn(SHAPE["vocab_size"], SHAPE["d_model"]))
    return model.eval()


def pair(variant: str, folder: Path, **over) -> tuple[nn.Module, T5]:
    """The transformers model and ours, read from the folder transformers saved."""
    theirs = hf_model(variant, **over)
    theirs.save_pretrained(folder)
    return theirs, load_hf_t5(folder).eval()


def batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Sources [2, 9] (the second padded after 6 tokens) and targets [2, 7] from the start id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    dec = torch.randint(2, 99, (2, 7), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


def test_variants_read_as_their_papers_say(tmp_path: Path) -> None:
    """v1: ReLU, tied and rescaled head; v1.1: gated GELU (tanh form), own head, no rescaling;
    mT5 likewise, never rescaled."""
    expected = {
        "t5-v1": ("relu", False, True, True, "t5"),
        "t5-v1_1": ("gelu_tanh", True, False, False, "t5"),
        "mt5": ("gelu_tanh", True, False, False, "mt5"),
    }
    for variant, want in expected.items():
        _, ours = pair(variant, tmp_path / variant)
        c = ours.config
        assert (c.activation, c.gated_ffn, c.tie_embeddings, c.scale_output, c.variant) == want
        assert (ours.lm_head.weight is ours.shared.weight) == c.tie_embeddings


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_equal_transformers_with_encoder_padding(variant: str, tmp_path: Path) -> None:
    theirs, ours = pair(variant, tmp_path)
    ids, mask, dec = batch()
    want = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    got = ours(ids, mask, dec)
    assert (got - want).abs().max().item() <= 1e-4
    # the padding is really hidden: the padded row equals itself without its pads
    short = ours(ids[1:, :6], None, dec[1:])
    assert (short - got[1:]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_more_decoder_layers_than_encoder_layers_and_a_target_padding_mask(tmp_path) -> None:
    theirs, ours = pair("t5-v1_1", tmp_path, num_decoder_layers=3)
    assert len(ours.decoder.blocks) == 3 and len(ours.encoder.blocks) == 2
    ids, mask, dec = batch(2)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 5:] = 0
    want = theirs(
        input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
    ).logits
    got = ours(ids, mask, dec, decoder_attention_mask=dec_mask)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_equal_transformers(variant: str, tmp_path: Path) -> None:
    """Cross-entropy of the teacher-forced logits; every parameter's gradient (fused ones
    compared as their concatenated parts) within 1e-4 of the largest entry of that tensor."""
    theirs, ours = pair(variant, tmp_path)
    ids, mask, dec = batch(3)
    labels = torch.cat([dec[:, 1:], torch.ones(2, 1, dtype=torch.long)], dim=1)
    loss_theirs = F.cross_entropy(
        theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.flatten(0, 1),
        labels.flatten(),
    )
    loss_ours = F.cross_entropy(ours(ids, mask, dec).flatten(0, 1), labels.flatten())
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5
    loss_theirs.backward()
    loss_ours.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    want = t5_to_ours(ours.config, grads, "transformers' gradients")
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert want.keys() == got.keys()
    for name, g in got.items():
        scale = want[name].abs().max().item()
        assert scale > 0, name
        assert (g - want[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_transformers(variant: str, tmp_path: Path) -> None:
    theirs, ours = pair(variant, tmp_path)
    ids, mask, _ = batch(4)
    want = theirs.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1
    )
    got = greedy_decode(ours, ids, mask, max_new_tokens=12)
    assert got.tolist() == want.tolist()
    # an end token met mid-way: that row is padded from there, and decoding stops when all end
    eos = int(got[0, 4])
    want = theirs.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=0,
    )
    got = greedy_decode(ours, ids, mask, max_new_tokens=12, eos_token_id=eos)
    assert got.tolist() == want.tolist()
    assert eos in got[0].tolist()


BEAM_SETTINGS = [
    dict(length_penalty=1.0, early_stopping=False),
    dict(length_penalty=0.6, early_stopping=True, no_repeat_ngram_size=2),
    dict(length_penalty=2.0, early_stopping="never", min_new_tokens=3),
]


@pytest.mark.parametrize("settings", BEAM_SETTINGS, ids=["plain", "early-ngram", "never-min"])
def test_beam_search_equals_transformers(settings: dict, tmp_path: Path) -> None:
    """Four beams through :func:`seq2seq_beam_search` (sources encoded once, cross keys/values
    computed once and repeated over beams) against transformers' ``generate(num_beams=4)``."""
    theirs, ours = pair("mt5", tmp_path)
    ids, mask, _ = batch(5)
    for eos in (1, 3):
        want = theirs.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=10,
            num_beams=4,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            **settings,
        )
        config = BeamSearchConfig(
            num_beams=4, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, **settings
        )
        got = seq2seq_beam_search(ours, ids, config, attention_mask=mask)
        assert got.sequences.tolist() == want.tolist()


@torch.no_grad()
def test_decode_steps_through_the_cache_equal_the_teacher_forced_logits() -> None:
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=50, n_layer=2, n_head=2, n_embd=16, head_dim=8,
                        intermediate_size=32, dropout=0.0)).eval()  # fmt: skip
    ids, mask, dec = batch(6)
    ids, dec = ids % 50, dec % 50
    full = model(ids, mask, dec)
    cache = model.make_cache(model.encode(ids, mask), mask, max_len=dec.shape[1])
    steps = [model.decode_step(dec[:, t : t + 1], cache, t) for t in range(dec.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    # the reference equation and the tiled flash path give the same logits
    for implementation in ("reference", "flash"):
        other = T5(dataclasses.replace(model.config, attention=implementation))
        other.load_state_dict(model.state_dict())
        assert (other.eval()(ids, mask, dec) - full).abs().max().item() <= 1e-5


def test_shift_right_starts_with_the_start_token_and_drops_ignored_labels() -> None:
    model = T5(T5Config(vocab_size=20, n_layer=1, n_head=2, n_embd=8, head_dim=4,
                        intermediate_size=8))  # fmt: skip
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])
    assert model.shift_right(labels).tolist() == [[0, 5, 6, 7], [0, 8, 1, 0]]
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(labels)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"relative_attention_num_buckets": 2},
            "relative_attention_num_buckets must be at least 4",
        ),
        ({"relative_attention_max_distance": 8}, "relative_attention_max_distance must exceed"),
        ({"eos_token_id": 32128}, r"eos_token_id must be below vocab_size \(32128\)"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"variant": "byt5"}, r"variant must be one of \['t5', 'mt5'\]"),
        ({"n_decoder_layer": 0}, "n_decoder_layer must be an integer >= 1"),
        ({"attention": "flash", "dropout": 0.1}, "has no attention dropout"),
    ],
)
def test_config_refuses_bad_values_by_name(over: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        T5Config(**{"dropout": 0.0, **over})
