"""Parity of lmarch's ViT and CLIP with transformers' ``ViTModel``, ``CLIPVisionModel`` and
``CLIPModel`` holding the same random weights (loaded from folders they saved): token states,
pooled vectors, image and text embeddings and logits_per_image, at max abs error <= 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmarch.errors import LmarchError
from lmarch.models.clip import CLIP, CLIPConfig, contrastive_loss
from lmarch.models.vit import ViT, ViTConfig
from lmarch.weights.hf_clip import (
    load_hf_clip,
    load_hf_clip_vision,
    load_hf_vision_family,
    load_hf_vit,
    save_hf_clip,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
)


def _clip_pair(tmp_path, eos_token_id: int = 98):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={**TEXT, "eos_token_id": eos_token_id, "bos_token_id": 0},
        vision_config=VISION,
        projection_dim=24,
    )
    theirs = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # a scale other than the initial one, to see that it is read
        theirs.logit_scale.fill_(3.1)
    theirs.save_pretrained(tmp_path)
    return theirs, load_hf_clip(tmp_path).eval()


def _texts(eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    lengths = [9, 6, 4]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):  # right padding after the EOS, as CLIPTokenizer pads
        ids[row, n - 1] = eos
        ids[row, n:] = 1
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("eos", [98, 2])
def test_clip_embeddings_and_logits_match_transformers(tmp_path, eos) -> None:
    """eos 98: the text is read at the first EOS id; eos 2 (older configs): at the largest id."""
    theirs, ours = _clip_pair(tmp_path, eos)
    ids, mask = _texts(98)  # 98 is the largest id either way
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        out = ours(ids, pixels, attention_mask=mask)
        ref_text = theirs.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        ref_image = theirs.get_image_features(pixel_values=pixels).pooler_output
        ours_text = ours.text_features(ids, mask)
        ours_image = ours.image_features(pixels)
    assert out.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, atol=TOL, rtol=0)
    torch.testing.assert_close(out.logits_per_text, ref.logits_per_text, atol=TOL, rtol=0)
    torch.testing.assert_close(out.image_embeds, ref.image_embeds, atol=TOL, rtol=0)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=TOL, rtol=0)
    torch.testing.assert_close(ours_text, ref_text, atol=TOL, rtol=0)
    torch.testing.assert_close(ours_image, ref_image, atol=TOL, rtol=0)
    # the contrastive loss is transformers' return_loss=True loss
    with torch.no_grad():
        ref_loss = theirs(input_ids=ids[:2], pixel_values=pixels, return_loss=True).loss
        ours_loss = contrastive_loss(ours(ids[:2], pixels).logits_per_image)
    torch.testing.assert_close(ours_loss, ref_loss, atol=1e-5, rtol=0)


def test_clip_vision_tower_and_interpolated_positions(tmp_path) -> None:
    """CLIPVisionModel: last_hidden_state and pooler_output, at the trained size and at 48x40
    pixels (a 6x5 patch grid: the 4x4 position table resampled bicubically)."""
    torch.manual_seed(3)
    theirs = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf_clip_vision(tmp_path).eval()
    for size in ((32, 32), (48, 40)):
        pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            ref = theirs(pixel_values=pixels, interpolate_pos_encoding=size != (32, 32))
            out = ours(pixels)
        assert out.hidden.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 48)
        torch.testing.assert_close(out.hidden, ref.last_hidden_state, atol=TOL, rtol=0)
        torch.testing.assert_close(out.pooled, ref.pooler_output, atol=TOL, rtol=0)


@pytest.mark.parametrize("pooler", [True, False])
def test_vit_matches_transformers(tmp_path, pooler) -> None:
    torch.manual_seed(5)
    config = transformers.ViTConfig(**VISION, qkv_bias=pooler)
    theirs = transformers.ViTModel(config, add_pooling_layer=pooler).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf_vision_family(tmp_path).eval()
    assert isinstance(ours, ViT) and ours.config.add_pooler is pooler
    for size in ((32, 32), (56, 48)):
        pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            ref = theirs(pixel_values=pixels, interpolate_pos_encoding=size != (32, 32))
            out = ours(pixels)
        torch.testing.assert_close(out.hidden, ref.last_hidden_state, atol=TOL, rtol=0)
        if pooler:
            torch.testing.assert_close(out.pooled, ref.pooler_output, atol=TOL, rtol=0)


def test_clip_saved_by_lmarch_loads_in_transformers(tmp_path) -> None:
    """save_hf_clip writes a folder transformers reads to the same logits."""
    torch.manual_seed(7)
    vision = ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=16,
                       intermediate_size=24, activation="quick_gelu", layer_norm_eps=1e-5,
                       variant="clip")  # fmt: skip
    ours = CLIP(CLIPConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16,
                           intermediate_size=20, eos_token_id=49, projection_dim=8,
                           vision=vision)).eval()  # fmt: skip
    save_hf_clip(ours, tmp_path)
    theirs = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 7, 49, 1], [9, 3, 8, 49]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = theirs(input_ids=ids, pixel_values=pixels).logits_per_image
        out = ours(ids, pixels).logits_per_image
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert torch.equal(load_hf_clip(tmp_path).logit_scale, ours.logit_scale)


def test_unsupported_clip_fields_are_refused_by_name(tmp_path) -> None:
    theirs, _ = _clip_pair(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["hidden_act"] = "mish"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmarchError, match="hidden_act='mish' is not supported"):
        load_hf_clip(tmp_path)
    config["text_config"]["hidden_act"] = "quick_gelu"
    config["vision_config"]["quantization_config"] = {"bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmarchError, match="quantization_config"):
        load_hf_clip(tmp_path)
    with pytest.raises(LmarchError, match="not ViT"):
        load_hf_vit(tmp_path)


def test_config_refusals_name_the_field() -> None:
    from lmarch.models.validate import ConfigError

    with pytest.raises(ConfigError, match="patch_size \\(64\\) is larger than image_size"):
        ViTConfig(image_size=32, patch_size=64)
    with pytest.raises(ConfigError, match="n_embd \\(30\\) must be divisible by n_head"):
        ViTConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="variant 'clip'"):
        CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ConfigError, match="add_pooler is for variant 'vit'"):
        ViTConfig(variant="clip", add_pooler=True)
    vit = ViT(
        ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=8, intermediate_size=8)
    )
    with pytest.raises(ValueError, match="expected pixels"):
        vit(torch.zeros(1, 1, 16, 16))
