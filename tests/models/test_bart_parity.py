"""Parity of lmarch's BART and Marian with transformers' BartForConditionalGeneration and
MarianMTModel holding the same random weights, loaded through their Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lmarch.generation.seq2seq import greedy_decode
from lmarch.models.bart import Bart
from lmarch.weights.hf_bart import bart_map, load_hf_bart

pytestmark = pytest.mark.usefixtures("one_thread")

_SHAPE = dict(
    d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
    decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40,
    max_position_embeddings=40, init_std=0.02,
)  # fmt: skip
# name: (family, config fields, gain on the layers' matrices). A random model's residual
# stream is mostly its input token's embedding, so a tied head keeps copying it; larger layer
# weights make the generated tokens depend on the source and the position.
CASES = {
    # BART as released: one table tied to the head, plain embeddings, GELU
    "bart": ("bart", dict(vocab_size=61, **_SHAPE), 7.0),
    # scaled embeddings, an untied head, ReLU; bart-large-cnn's forced first token (below)
    "bart_untied_scaled": (
        "bart",
        dict(
            vocab_size=59, scale_embedding=True, tie_word_embeddings=False,
            activation_function="relu", **_SHAPE,
        ),
        5.0,
    ),
    # OPUS-MT: swish, sqrt(d) scaling, decoding starts from <pad>, eos 0
    "marian": (
        "marian",
        dict(
            vocab_size=67, pad_token_id=66, decoder_start_token_id=66, eos_token_id=0,
            forced_eos_token_id=0, scale_embedding=True, activation_function="swish",
            **_SHAPE,
        ),
        4.0,
    ),
    # a separate target vocabulary, the head tied to the decoder's table
    "marian_two_vocabs": (
        "marian",
        dict(
            vocab_size=71, decoder_vocab_size=53, share_encoder_decoder_embeddings=False,
            pad_token_id=52, decoder_start_token_id=52, eos_token_id=0, forced_eos_token_id=0,
            scale_embedding=True, activation_function="relu", **_SHAPE,
        ),
        7.0,
    ),
}  # fmt: skip


def make_pair(name: str, folder: Path) -> tuple[transformers.PreTrainedModel, Bart]:
    """A random transformers model (LayerNorms and the logits bias perturbed so they count),
    saved as a folder and loaded by lmarch."""
    kind, fields, gain = CASES[name]
    torch.manual_seed(0)
    if kind == "bart":
        hf = transformers.BartForConditionalGeneration(transformers.BartConfig(**fields))
    else:
        hf = transformers.MarianMTModel(transformers.MarianConfig(**fields))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "layer_norm" in n or "layernorm" in n:
                p.add_(0.2 * torch.randn_like(p))
            elif "layers" in n:
                p.mul_(gain)
        hf.final_logits_bias.normal_(0, 0.02)
    if name == "bart_untied_scaled":  # transformers 5 keeps it in generation_config.json
        hf.generation_config.forced_bos_token_id = 0
    hf.save_pretrained(folder)
    return hf.eval(), load_hf_bart(folder).eval()


def _batch(hf: transformers.PreTrainedModel, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Two sources, the second padded over its last 4 positions, and two target prefixes."""
    c = hf.config
    target_vocab = c.decoder_vocab_size if c.model_type == "marian" else c.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(c.vocab_size, target_vocab) - 1, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = c.pad_token_id
    dec = torch.randint(3, target_vocab - 1, (2, 9), generator=g)
    dec[:, 0] = c.decoder_start_token_id
    return ids, mask, dec


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_with_encoder_padding(name: str, tmp_path: Path) -> None:
    """Teacher-forced logits equal transformers' to 1e-4, padding in the source included; the
    real positions of the padded row do not depend on what its padding holds."""
    hf, ours = make_pair(name, tmp_path)
    ids, mask, dec = _batch(hf)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        mine = ours(ids, mask, dec)
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max().item() <= 1e-4
        other = ids.clone()
        other[1, 7:] = 5  # different tokens under the padding
        assert torch.equal(ours(other, mask, dec)[1], mine[1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match(name: str, tmp_path: Path) -> None:
    """Every parameter's gradient of the same loss equals transformers' (<= 1e-5), tied tables
    summing their three uses."""
    hf, ours = make_pair(name, tmp_path)
    ids, mask, dec = _batch(hf, seed=2)
    labels = torch.roll(dec, -1, dims=1)
    ce = torch.nn.functional.cross_entropy
    their_logits = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    ce(their_logits.flatten(0, 1), labels.flatten()).backward()
    ce(ours(ids, mask, dec).flatten(0, 1), labels.flatten()).backward()
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    our_grads["logits_bias"] = torch.zeros_like(ours.logits_bias)  # a buffer, as theirs
    mapped = bart_map(ours.config).to_theirs(our_grads, ours.config.n_encoder_layer)
    compared = 0
    for n, p in hf.named_parameters():
        if p.grad is None or n not in mapped:
            continue  # frozen sinusoid tables; aliases of a tied table
        assert (mapped[n] - p.grad).abs().max().item() <= 1e-5, n
        compared += 1
    assert compared == len(mapped) - 1  # all but the logits bias


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_generation_matches_token_for_token(name: str, tmp_path: Path) -> None:
    """``generate`` equals transformers' greedy ``generate`` (start token, forced first and
    last tokens, padding after the end token) for a padded batch of three sources."""
    hf, ours = make_pair(name, tmp_path)
    ids, mask, _ = _batch(hf, seed=3)
    ids, mask = torch.cat((ids, ids[:1].flip(1))), torch.cat((mask, mask[:1]))
    theirs = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False, num_beams=1
    )
    mine = greedy_decode(ours, ids, mask, max_new_tokens=14)
    assert mine.tolist() == theirs.tolist()
    assert len(set(mine[:, 1:].flatten().tolist())) >= 3  # not one token over and over


def test_forced_tokens_and_min_length_match(tmp_path: Path) -> None:
    """With ``min_new_tokens`` the end token is banned as transformers bans it, and the
    forced first token of bart-large-cnn's config is the first one generated."""
    hf, ours = make_pair("bart_untied_scaled", tmp_path)
    ids, mask, _ = _batch(hf, seed=4)
    kw = dict(max_new_tokens=9, do_sample=False, num_beams=1, min_new_tokens=6)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, **kw)
    mine = greedy_decode(ours, ids, mask, max_new_tokens=9, min_new_tokens=6)
    assert mine.tolist() == theirs.tolist()
    assert mine[:, 1].tolist() == [0, 0]


def test_decode_step_with_cache_equals_the_full_decoder(tmp_path: Path) -> None:
    """Feeding the target one token at a time through the cache (cross keys/values computed
    at the first step only) gives the teacher-forced logits of every position."""
    _, ours = make_pair("marian", tmp_path)
    ids, mask, dec = _batch(_, seed=5)
    with torch.no_grad():
        full = ours(ids, mask, dec)
        cache = ours.make_cache(ours.encode(ids, mask), mask, dec.shape[1])
        assert all(kv is not None for kv in cache.cross)
        steps = [ours.decode_step(dec[:, t : t + 1], cache, t) for t in range(dec.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def _strip(rows: list[list[int]], pad: int) -> list[list[int]]:
    out = []
    for row in rows:
        while row and row[-1] == pad:
            row = row[:-1]
        out.append(row)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_beam_search_matches_token_for_token(name: str, tmp_path: Path) -> None:
    """lmarch's beam search (4 beams, length penalty, no repeated 3-grams, a minimum length,
    early stopping) over the model's step interface gives transformers' beams, best first."""
    from lmarch.generation.beam import BeamSearchConfig
    from lmarch.generation.seq2seq import seq2seq_beam_search

    hf, ours = make_pair(name, tmp_path)
    ids, mask, _ = _batch(hf, seed=6)
    c = ours.config
    settings = dict(
        num_beams=4, max_new_tokens=12, min_new_tokens=3, length_penalty=2.0,
        no_repeat_ngram_size=3, early_stopping=True, num_return_sequences=2,
    )  # fmt: skip
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings)
    config = BeamSearchConfig(
        **settings,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        forced_bos_token_id=c.forced_bos_token_id,
        forced_eos_token_id=c.forced_eos_token_id,
    )
    with torch.no_grad():
        mine = seq2seq_beam_search(ours, ids, config, attention_mask=mask).sequences
    assert _strip(mine.tolist(), c.pad_token_id) == _strip(theirs.tolist(), c.pad_token_id)


def test_presets_have_the_shapes_of_transformers_models() -> None:
    """bart-base counts the parameters of facebook/bart-base's shape in transformers
    (139,420,416) and marian-tiny those of the MarianMTModel its config describes; each
    preset's config goes through a run folder's dict and back unchanged."""
    from lmarch.models.registry import (
        config_from_dict,
        config_to_dict,
        count_parameters,
        get_preset,
    )
    from lmarch.weights.hf_bart import bart_config_to_hf

    for name, cls, config_cls in (
        ("bart-base", transformers.BartForConditionalGeneration, transformers.BartConfig),
        ("marian-tiny", transformers.MarianMTModel, transformers.MarianConfig),
    ):
        config = get_preset(name).config
        with torch.device("meta"):
            hf = cls(config_cls(**bart_config_to_hf(config)))
        trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
        assert count_parameters(config) == trainable
        assert config_from_dict(config_to_dict(config)) == config
    assert count_parameters(get_preset("bart-base").config) == 139_420_416
