"""The BLIP-style captioner: cached decoding equals the teacher-forced pass, lmarch's seq2seq
greedy decoder runs it token for token like a plain argmax loop, the ITM head reads each
caption at its own end token, hard negatives are other captions, bad configs are refused."""

from __future__ import annotations

import pytest
import torch

from lmarch.generation.seq2seq import greedy_decode
from lmarch.models.blip import Blip, BlipConfig
from lmarch.models.validate import ConfigError
from lmarch.models.vit import ViTConfig
from lmarch.tasks.caption import hard_negatives

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_blip(seed: int = 0) -> Blip:
    torch.manual_seed(seed)
    vision = ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=16,
                       intermediate_size=32)  # fmt: skip
    config = BlipConfig(vocab_size=40, block_size=10, n_layer=2, n_head=2, n_embd=24,
                        intermediate_size=48, pad_token_id=1, bos_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0, vision=vision)  # fmt: skip
    return Blip(config).eval()


@torch.no_grad()
def test_cached_steps_equal_the_teacher_forced_pass():
    model = tiny_blip()
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.randint(2, 40, (3, 7))
    full = model(pixels, ids)
    cache = model.make_cache(model.encode(pixels), None, 7)
    steps = torch.cat([model.decode_step(ids[:, i : i + 1], cache, i) for i in range(7)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_greedy_decode_matches_an_argmax_loop_without_cache():
    model = tiny_blip(1)
    pixels = torch.randn(2, 3, 16, 16)
    got = greedy_decode(model, pixels, None, max_new_tokens=8, eos_token_id=99)  # no early end
    ids = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(8):
        ids = torch.cat([ids, model(pixels, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)


def test_itm_reads_the_end_token_and_ignores_right_padding():
    model = tiny_blip(2)
    memory = model.encode(torch.randn(2, 3, 16, 16))
    short = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 1]])
    padded = torch.cat([short, torch.full((2, 3), 1)], dim=1)
    lengths = torch.tensor([4, 4])
    a = model.itm_logits(memory, short, lengths)
    b = model.itm_logits(memory, padded, lengths)
    assert a.shape == (2, 2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a different image changes the match score: the head sees the image through cross-attention
    assert not torch.allclose(a, model.itm_logits(memory.flip(0), short, lengths))


def test_hard_negatives_are_other_captions_and_prefer_close_ones():
    ids = torch.tensor([[0, 5, 6, 7, 1], [0, 5, 6, 8, 1], [0, 9, 10, 11, 1], [0, 5, 6, 7, 1]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(200):
        j = hard_negatives(ids, g)
        counts[torch.arange(4), j] += 1
    # rows 0 and 3 hold the same caption: never each other's negative, nor their own
    assert counts[0, 0] == counts[0, 3] == counts[3, 0] == counts[3, 3] == 0
    assert counts[1, 1] == counts[2, 2] == 0
    # row 1 shares 4 of 5 positions with rows 0/3 and 2 with row 2: weights e^4 : e^4 : e^2,
    # so row 2 is drawn with p = 0.063 (12.6 of 200 expected); row 0 takes row 1 with p = 0.88
    assert counts[1, 2] < 25 and counts[0, 1] > 155


def test_config_refusals_name_the_field():
    with pytest.raises(ConfigError, match="n_embd"):
        BlipConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="eos_token_id must be below vocab_size"):
        BlipConfig(vocab_size=100, pad_token_id=1, bos_token_id=0, decoder_start_token_id=0,
                   eos_token_id=100)  # fmt: skip
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_blip()(torch.randn(1, 3, 16, 16), torch.zeros(1, 11, dtype=torch.long))
