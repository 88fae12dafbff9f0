"""Parity of lmarch's BERT family with transformers' BERT, RoBERTa, ALBERT and ELECTRA classes
holding the same random weights: hidden states, head logits, gradients and HF export."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmarch.models.bert import BertModel, roberta_position_ids
from lmarch.models.registry import count_parameters, preset_config
from lmarch.weights.hf_bert import (
    build_task_model,
    config_from_hf,
    load_hf_bert,
    map_for_model,
    save_hf_bert,
)
from lmarch.weights.safetensors_io import load_into_model

SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
CONFIGS = {
    "bert": (transformers.BertConfig, dict(SMALL)),
    "roberta": (
        transformers.RobertaConfig,
        {**SMALL, "max_position_embeddings": 42, "type_vocab_size": 1, "pad_token_id": 1},
    ),
    "albert": (
        transformers.AlbertConfig,
        {**SMALL, "embedding_size": 16, "num_hidden_layers": 3, "classifier_dropout_prob": 0.0},
    ),
    # 4 layers over 2 distinct blocks: layers 0,1 share one block and 2,3 the other
    "albert-groups": (
        transformers.AlbertConfig,
        {**SMALL, "embedding_size": 16, "num_hidden_layers": 4, "num_hidden_groups": 2},
    ),
    "electra": (transformers.ElectraConfig, {**SMALL, "embedding_size": 16}),
}
# (config, transformers class, our task, number of labels)
CASES = [
    ("bert", "BertModel", "base", None),
    ("bert", "BertForMaskedLM", "masked_lm", None),
    ("bert", "BertForSequenceClassification", "sequence_classification", 3),
    ("bert", "BertForTokenClassification", "token_classification", 5),
    ("bert", "BertForQuestionAnswering", "question_answering", None),
    ("roberta", "RobertaModel", "base", None),
    ("roberta", "RobertaForMaskedLM", "masked_lm", None),
    ("roberta", "RobertaForSequenceClassification", "sequence_classification", 3),
    ("albert", "AlbertModel", "base", None),
    ("albert", "AlbertForPreTraining", "pretraining", None),
    ("albert-groups", "AlbertForSequenceClassification", "sequence_classification", 2),
    ("electra", "ElectraForPreTraining", "pretraining", None),
    ("electra", "ElectraForMaskedLM", "masked_lm", None),
    ("electra", "ElectraForSequenceClassification", "sequence_classification", 4),
]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pair(config: str, hf_class: str, task: str, num_labels: int | None, seed: int = 0):
    """A random transformers model and ours holding its weights."""
    torch.manual_seed(seed)
    cfg_cls, kwargs = CONFIGS[config]
    hf_config = cfg_cls(**kwargs, **({"num_labels": num_labels} if num_labels else {}))
    hf = getattr(transformers, hf_class)(hf_config).eval()
    with torch.no_grad():
        # std 0.3 instead of 0.02 makes attention far from uniform, so masks and positions count
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = build_task_model(config_from_hf(hf_config.to_dict()), task, num_labels or 2)
    if task == "base" and config == "electra":
        assert ours.pooler is None
    theirs = dict(hf.state_dict())
    # a tied parameter is listed under one of its names only; give the map every name
    theirs.update(dict(hf.named_parameters(remove_duplicate=False)))
    tensors = map_for_model(ours).to_ours(theirs, ours.config.n_blocks)
    load_into_model(ours, tensors)
    return hf, ours.eval()


def make_batch(config: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three sequences of 12 tokens, two of them padded at the end, with two segments."""
    kwargs = CONFIGS[config][1]
    pad = kwargs.get("pad_token_id", 0)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, kwargs["vocab_size"], (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    types = torch.zeros_like(ids)
    if kwargs.get("type_vocab_size", 2) > 1:
        types[:, 6:] = 1
        types = types * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def hf_outputs(hf, task: str, out) -> list[torch.Tensor]:
    if task == "base":
        return [out.last_hidden_state]
    if task == "question_answering":
        return [out.start_logits, out.end_logits]
    if task == "pretraining" and hasattr(out, "sop_logits"):
        return [out.prediction_logits, out.sop_logits]
    return [out.logits]


def max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize(("config", "hf_class", "task", "num_labels"), CASES)
def test_hidden_states_and_heads_match(config, hf_class, task, num_labels) -> None:
    hf, ours = make_pair(config, hf_class, task, num_labels)
    batch = make_batch(config)
    with torch.no_grad():
        expected = hf_outputs(hf, task, hf(**batch))
        got = ours(**batch)
        got = list(got) if isinstance(got, tuple) else [got]
        # measured: 0.0 (bit for bit) for BERT, RoBERTa and ELECTRA; <= 5e-7 for ALBERT
        assert max_err(got, expected) <= 1e-4
        if task != "base":
            encoder = ours.bert
            hidden = hf.base_model(**batch).last_hidden_state
            assert max_err([encoder(**batch)], [hidden]) <= 1e-4
        else:
            # no mask and no segment ids: every token is real, one segment
            plain = {"input_ids": batch["input_ids"][:1]}
            assert max_err([ours(**plain)], [hf(**plain).last_hidden_state]) <= 1e-4


def test_gradients_match_with_padding() -> None:
    hf, ours = make_pair("bert", "BertForMaskedLM", "masked_lm", None, seed=2)
    batch = make_batch("bert", seed=3)
    targets = torch.randint(
        0, 99, batch["input_ids"].shape, generator=torch.Generator().manual_seed(4)
    )
    targets = targets.masked_fill(batch["attention_mask"] == 0, -100)
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(hf(**batch).logits.flatten(0, 1), targets.flatten()).backward()
    loss_fn(ours(**batch).flatten(0, 1), targets.flatten()).backward()
    their_grads = {k: p.grad for k, p in hf.named_parameters(remove_duplicate=False)}
    mapped = map_for_model(ours).to_ours(their_grads, ours.config.n_layer)
    for k, p in ours.named_parameters():
        err = (p.grad - mapped[k]).abs().max().item()
        assert err <= 1e-5, f"gradient of {k} differs by {err}"


def test_reference_attention_gives_same_states() -> None:
    _, ours = make_pair("roberta", "RobertaModel", "base", None)
    batch = make_batch("roberta")
    fused = ours(**batch)
    for block in ours.blocks:
        block.attn.implementation = "reference"
    assert (ours(**batch) - fused).abs().max().item() <= 1e-5


def test_roberta_positions_skip_padding() -> None:
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 5, 2, 1, 1]])
    expected = torch.tensor([[2, 3, 4, 5, 6], [2, 3, 4, 1, 1]])
    assert torch.equal(roberta_position_ids(ids, pad_token_id=1), expected)
    # a padded sentence's real tokens get the same states as the unpadded sentence
    _, ours = make_pair("roberta", "RobertaModel", "base", None)
    short = torch.tensor([[0, 5, 6, 2]])
    padded = torch.tensor([[0, 5, 6, 2, 1, 1]])
    mask = (padded != 1).long()
    assert (ours(padded, mask)[:, :4] - ours(short)).abs().max().item() <= 1e-5


EXPORTS = [
    ("bert", "BertModel", "base", None),
    ("bert", "BertForMaskedLM", "masked_lm", None),
    ("roberta", "RobertaForSequenceClassification", "sequence_classification", 3),
    ("albert-groups", "AlbertForPreTraining", "pretraining", None),
    ("electra", "ElectraForPreTraining", "pretraining", None),
    ("electra", "ElectraForMaskedLM", "masked_lm", None),
]


@pytest.mark.parametrize(("config", "hf_class", "task", "num_labels"), EXPORTS)
def test_export_round_trips_and_loads_in_transformers(
    tmp_path, config, hf_class, task, num_labels
) -> None:
    hf, ours = make_pair(config, hf_class, task, num_labels, seed=5)
    save_hf_bert(ours, tmp_path)
    reloaded_hf = getattr(transformers, hf_class).from_pretrained(tmp_path).eval()
    reloaded_ours = load_hf_bert(tmp_path).eval()
    assert type(reloaded_ours) is type(ours)
    batch = make_batch(config, seed=6)
    with torch.no_grad():
        expected = hf_outputs(hf, task, hf(**batch))
        assert max_err(hf_outputs(hf, task, reloaded_hf(**batch)), expected) <= 1e-5
        got = reloaded_ours(**batch)
        assert max_err(list(got) if isinstance(got, tuple) else [got], expected) <= 1e-4
    for k, v in ours.state_dict().items():
        assert torch.equal(v, reloaded_ours.state_dict()[k]), k


def test_encoder_of_a_task_checkpoint_loads_bare(tmp_path) -> None:
    hf, ours = make_pair("bert", "BertForSequenceClassification", "sequence_classification", 3)
    save_hf_bert(ours, tmp_path)
    encoder = load_hf_bert(tmp_path, task="base").eval()
    assert isinstance(encoder, BertModel) and encoder.pooler is not None
    batch = make_batch("bert")
    with torch.no_grad():
        assert max_err([encoder(**batch)], [hf.bert(**batch).last_hidden_state]) <= 1e-4


@pytest.mark.parametrize(
    ("preset", "hf_config"),
    [
        ("bert-base", lambda: transformers.BertConfig()),
        (
            "roberta-base",
            lambda: transformers.RobertaConfig(
                vocab_size=50265, max_position_embeddings=514, type_vocab_size=1
            ),
        ),
        (
            "albert-base-v2",
            lambda: transformers.AlbertConfig(
                vocab_size=30000, hidden_size=768, num_attention_heads=12, intermediate_size=3072
            ),
        ),
        (
            "electra-small",
            lambda: transformers.ElectraConfig(
                hidden_size=256, num_attention_heads=4, intermediate_size=1024
            ),
        ),
        (
            "minilm-l6",
            lambda: transformers.BertConfig(
                hidden_size=384, num_hidden_layers=6, intermediate_size=1536
            ),
        ),
    ],
)
def test_preset_parameter_counts_equal_transformers(preset, hf_config) -> None:
    with torch.device("meta"):
        hf = transformers.AutoModel.from_config(hf_config())
    assert count_parameters(preset_config(preset)) == sum(p.numel() for p in hf.parameters())


def test_bert_pretraining_checkpoint_loads_as_masked_lm(tmp_path) -> None:
    torch.manual_seed(7)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**SMALL)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path).eval()
    assert type(ours).__name__ == "BertForMaskedLM"
    batch = make_batch("bert")
    with torch.no_grad():
        assert max_err([ours(**batch)], [hf(**batch).prediction_logits]) <= 1e-4
