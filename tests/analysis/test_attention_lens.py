"""Attention capture against softmax(Q K^T / sqrt(d) + M) computed by hand, the logit lens
against the model's own logits, and the PCA projection against scikit-learn's PCA."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmarch.analysis.attention_maps import (
    AttentionMaps,
    attention_maps,
    capture_attention,
    plot_attention,
)
from lmarch.analysis.lens import logit_lens, plot_lens
from lmarch.analysis.projection import pca_2d, project_words
from lmarch.classic.vectors import WordVectors
from lmarch.errors import LmarchError
from lmarch.loading.model import LoadedModel
from lmarch.models.heads import CAUSAL_LM
from lmarch.models.registry import build_model, preset_config
from lmarch.nn import attention as attention_module
from lmarch.nn.attention import repeat_kv
from lmarch.tokenizers.char import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "To be, or not to be"
TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzTB ,.!\n")


def _tiny(name: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    vocab = {"vocab_size": TOKENIZER.vocab_size}
    return build_model(preset_config(name, **vocab, **changes)).eval()


def _loaded(model: torch.nn.Module, family: str) -> LoadedModel:
    return LoadedModel(model, TOKENIZER, f"tiny-{family}", family, CAUSAL_LM)


def _ids() -> torch.Tensor:
    return torch.tensor([TOKENIZER.encode(TEXT)])


def _by_hand(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M), M = -inf where ``mask`` is False: the equation."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


@torch.no_grad()
def test_gpt_first_layer_equals_the_hand_computation() -> None:
    model = _tiny("gpt-char-tiny", n_layer=2, n_embd=32, n_head=4)
    ids = _ids()
    with capture_attention(model) as records:
        out = model(ids)
    assert torch.allclose(out, model(ids), atol=1e-5)  # capturing changes no output
    assert [r.name for r in records] == ["blocks.0.attn", "blocks.1.attn"]
    t = ids.shape[1]
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(t))
    block = model.blocks[0]
    q, k, _ = block.attn.qkv(block.norm_attn(x)).split(32, dim=-1)
    q, k = (z.view(1, t, 4, 8).transpose(1, 2) for z in (q, k))
    expected = _by_hand(q, k, torch.ones(t, t, dtype=torch.bool).tril())
    probs = records[0].probs
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, t), atol=1e-6)
    assert (probs.triu(1) == 0).all()  # the causal mask: no weight on the future
    assert attention_module.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


@torch.no_grad()
def test_llama_grouped_query_and_rotary_equal_the_hand_computation() -> None:
    model = _tiny("llama-tiny", n_layer=1)  # 4 query heads share 2 key/value heads
    ids = _ids()
    with capture_attention(model) as records:
        model(ids)
    t, c = ids.shape[1], model.config
    block = model.blocks[0]
    hd = c.dim_per_head
    q, k, _ = block.attn.qkv(block.norm_attn(model.tok_emb(ids))).split(
        [4 * hd, 2 * hd, 2 * hd], dim=-1
    )
    q = q.view(1, t, 4, hd).transpose(1, 2)
    k = k.view(1, t, 2, hd).transpose(1, 2)
    q, k = model.rotary(q, k, 0)
    expected = _by_hand(q, repeat_kv(k, 2), torch.ones(t, t, dtype=torch.bool).tril())
    assert torch.allclose(records[0].probs, expected, atol=1e-6)


@torch.no_grad()
def test_bert_padding_gets_no_weight_and_rows_sum_to_one() -> None:
    model = _tiny("bert-tiny", dropout=0.0)
    ids = torch.tensor([[2, 5, 7, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with capture_attention(model) as records:
        model(ids, mask)
    assert len(records) == 2
    for r in records:
        assert torch.allclose(r.probs.sum(-1), torch.ones(1, 2, 6), atol=1e-6)
        assert (r.probs[..., 4:] == 0).all()


@torch.no_grad()
def test_t5_relative_bias_and_cross_attention_are_captured() -> None:
    model = _tiny("t5-tiny", n_layer=1)
    ids = _ids()
    with capture_attention(model) as records:
        out = model(ids, decoder_input_ids=ids[:, :5])
    assert torch.allclose(out, model(ids, decoder_input_ids=ids[:, :5]), atol=1e-5)
    names = [r.name for r in records]
    assert names == ["encoder.blocks.0.attn", "decoder.blocks.0.self_attn",
                     "decoder.blocks.0.cross_attn"]  # fmt: skip
    assert records[2].probs.shape == (1, 4, 5, ids.shape[1])  # target queries, source keys


def test_attention_maps_and_plot(tmp_path: Path) -> None:
    loaded = _loaded(_tiny("gpt-char-tiny", n_layer=2, n_embd=32, n_head=4), "gpt")
    maps = attention_maps(loaded, TEXT)
    assert maps.tokens[:2] == ["T", "o"] and len(maps.layers) == 2
    assert maps.layers[1].probs.shape == (4, len(TEXT), len(TEXT))
    for head in (None, 2):
        path = plot_attention(maps, 1, head, tmp_path / f"a{head}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(LmarchError, match=r"--layer must be in 0\.\.1, got 5"):
        plot_attention(maps, 5, None, tmp_path / "x.png")
    with pytest.raises(LmarchError, match=r"--head must be in 0\.\.3, got 4"):
        plot_attention(maps, 0, 4, tmp_path / "x.png")
    assert isinstance(maps, AttentionMaps)


@pytest.mark.parametrize("name", ["gpt-char-tiny", "llama-tiny"])
def test_logit_lens_last_layer_is_the_models_own_logits(name: str, tmp_path: Path) -> None:
    model = _tiny(name, n_layer=3)
    loaded = _loaded(model, "gpt" if name.startswith("gpt") else "llama")
    result = logit_lens(loaded, TEXT, k=3)
    with torch.no_grad():
        logits = model(_ids())[0]
    assert torch.equal(result.logits[-1], logits)  # exactly: the same norm and head
    assert result.layer_names == ["embeddings", "layer 1", "layer 2", "layer 3"]
    assert result.logits.shape == (4, len(TEXT), TOKENIZER.vocab_size)
    top = logits.softmax(-1).topk(3, dim=-1)
    shown = [TOKENIZER.decode([i]).replace(" ", "·") for i in top.indices[0].tolist()]
    assert result.top_tokens[-1][0] == shown  # spaces made visible
    assert plot_lens(result, tmp_path / "lens.png").read_bytes()[:4] == b"\x89PNG"


def test_logit_lens_of_a_masked_lm_reads_layers_through_its_mlm_head() -> None:
    from lmarch.models.heads import MASKED_LM
    from lmarch.tokenizers.wordpiece import WordPieceTokenizer
    from lmarch.train.objectives import objective_model

    tok = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "to", "be", "or"])
    torch.manual_seed(0)
    config = preset_config("bert-tiny", vocab_size=tok.vocab_size, dropout=0.0)
    model = objective_model("mlm", config).eval()
    result = logit_lens(LoadedModel(model, tok, "tiny-mlm", "bert", MASKED_LM), "to be or")
    batch = {k: torch.tensor(v) for k, v in tok.encode_batch(["to be or"]).items()}
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.equal(result.logits[-1], logits[0])
    assert result.tokens == ["[CLS]", "to", "be", "or", "[SEP]"]
    assert result.layer_names == ["embeddings", "layer 1", "layer 2"]


def test_logit_lens_refuses_models_without_a_head() -> None:
    loaded = LoadedModel(_tiny("lstm-char-tiny"), TOKENIZER, "tiny-rnn", "rnn", CAUSAL_LM)
    with pytest.raises(LmarchError, match="no output head to read layers through"):
        logit_lens(loaded, TEXT)


def test_pca_equals_scikit_learn() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 7)) @ rng.normal(size=(7, 7))
    coords, ratio = pca_2d(x)
    pca = PCA(n_components=2).fit(x)
    theirs = pca.transform(x)
    signs = np.sign((coords * theirs).sum(axis=0))  # each axis' sign is a convention
    assert np.allclose(coords, theirs * signs, atol=1e-10)
    assert np.allclose(ratio, pca.explained_variance_ratio_, atol=1e-12)


def test_project_words_picks_rows_and_refuses_unknown_words() -> None:
    vectors = WordVectors(["king", "queen", "man", "woman"], torch.eye(4) + 0.1)
    words, coords, _ = project_words(vectors, ["king", "queen", "man"])
    assert words == ["king", "queen", "man"] and coords.shape == (3, 2)
    assert np.allclose(coords, pca_2d((torch.eye(4) + 0.1)[:3].numpy())[0])
    with pytest.raises(LmarchError, match="not in the vocabulary: prince"):
        project_words(vectors, ["king", "prince"])
