"""Hugging Face folders of the four BERT-family encoders load whole — weights and tokenizer — and
reproduce the ``tokenizers`` library's ids and transformers' hidden states.

Each folder is made here as Hugging Face makes one: a random-initialised transformers model saved
with ``save_pretrained`` beside a ``tokenizer.json`` trained with the ``tokenizers`` library on
Shakespeare (WordPiece for BERT and ELECTRA, byte-level BPE with RoBERTa's post-processor, a
SentencePiece-style Unigram with ALBERT's normaliser and template) and a small
``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmarch.data.corpus import shakespeare_documents
from lmarch.loading import load
from lmarch.tasks.embed import encoder_from_loaded, tokenize_batch
from lmarch.tokenizers.base import load_tokenizer
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.hf_fallback import HFTokenizersFallback
from lmarch.tokenizers.wordpiece import WordPieceTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

FAMILIES = ("bert", "roberta", "albert", "electra")
OUR_TOKENIZER = {
    "bert": WordPieceTokenizer,
    "electra": WordPieceTokenizer,
    "roberta": ByteLevelBPETokenizer,
    "albert": HFTokenizersFallback,
}
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _lines() -> list[str]:
    return [
        line.strip()
        for doc in shakespeare_documents()[:6]
        for line in doc.text.splitlines()
        if len(line.strip()) >= 20 and not line.strip().endswith(":")
    ]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(400 training lines, 20 held-out test sentences; every fourth is two lines joined)."""
    lines = _lines()
    train = lines[:400]
    rest = lines[400:]
    step = len(rest) // 20
    test = [" ".join(rest[i * step : i * step + (2 if i % 4 == 0 else 1)]) for i in range(20)]
    return train, test


# ---------------------------------------------------------------- tokenizers, as HF builds them


def _wordpiece(train: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        train, trainers.WordPieceTrainer(vocab_size=500, special_tokens=special)
    )
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    config = {f"{r}_token": f"[{r.upper()}]" for r in ("pad", "unk", "cls", "sep", "mask")}
    return tok, {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, **config}


def _roberta_bpe(train: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(train, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    config = {
        "tokenizer_class": "RobertaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }
    return tok, config


def _albert_unigram(train: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("``", '"'),
            normalizers.Replace("''", '"'),
            normalizers.NFKD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    special = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.UnigramTrainer(vocab_size=500, special_tokens=special, unk_token="<unk>")
    tok.train_from_iterator(train, trainer)
    tok.post_processor = TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    config = {
        "tokenizer_class": "AlbertTokenizerFast",
        "do_lower_case": True,
        "bos_token": "[CLS]",
        "eos_token": "[SEP]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": {"content": "[MASK]", "lstrip": True, "special": True},
    }
    return tok, config


# ---------------------------------------------------------------- models, as HF saves them


def _model(family: str, vocab_size: int):
    t = transformers
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if family == "bert":
        return t.BertForMaskedLM(t.BertConfig(max_position_embeddings=128, **shape))
    if family == "roberta":
        config = t.RobertaConfig(
            max_position_embeddings=130,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **shape,
        )
        return t.RobertaModel(config)
    if family == "albert":
        config = t.AlbertConfig(
            embedding_size=16, max_position_embeddings=128, pad_token_id=0, **shape
        )
        return t.AlbertForMaskedLM(config)
    config = t.ElectraConfig(embedding_size=32, max_position_embeddings=128, **shape)
    return t.ElectraModel(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus) -> dict[str, Path]:
    train, _ = corpus
    makers = {"bert": _wordpiece, "electra": _wordpiece}
    makers.update(roberta=_roberta_bpe, albert=_albert_unigram)
    out = {}
    for i, family in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        tok, config = makers[family](train)
        torch.manual_seed(i)
        model = _model(family, tok.get_vocab_size()).eval()
        model.save_pretrained(folder)
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        out[family] = folder
    return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_and_matches_tokenizers_and_transformers(family, folders, corpus):
    from tokenizers import Tokenizer

    _, sentences = corpus
    folder = folders[family]
    loaded = load(str(folder))
    assert isinstance(loaded.tokenizer, OUR_TOKENIZER[family])

    # token ids, special tokens included, equal the library's for each sentence
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    want = [reference.encode(s) for s in sentences]
    for s, enc in zip(sentences, want, strict=True):
        ids, types = loaded.tokenizer.encode_pair(s)
        assert ids == enc.ids, s
        assert types == enc.type_ids, s
        assert loaded.tokenizer.encode(s) == reference.encode(s, add_special_tokens=False).ids

    # the padded batch the embed task builds, through our encoder and transformers'
    encoder = encoder_from_loaded(loaded)
    batch = tokenize_batch(encoder, sentences)
    mask = batch["attention_mask"].bool()
    assert mask.sum(1).tolist() == [len(enc.ids) for enc in want]
    assert (batch["input_ids"][~mask] == loaded.tokenizer.pad_id).all()
    assert (
        loaded.tokenizer.pad_id == json.loads((folder / "config.json").read_text())["pad_token_id"]
    )
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ours = encoder.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = hf(**batch).last_hidden_state
    assert ours.shape == theirs.shape == (20, mask.shape[1], 48)
    assert mask.float().mean() < 0.8  # the batch really is padded
    error = (ours - theirs)[mask].abs().max().item()
    print(f"{family}: max |ours - transformers| on real tokens = {error:.2e}")
    assert error <= TOL


def test_pairs_and_truncation_match_the_library(folders, corpus):
    """Two segments, cut to 24 ids longest first: the same ids as the ``tokenizers`` library."""
    from tokenizers import Tokenizer

    _, sentences = corpus
    for family in FAMILIES:
        folder = folders[family]
        ours = load(str(folder)).tokenizer
        reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
        reference.enable_truncation(24, strategy="longest_first")
        for a, b in zip(sentences[:10], sentences[10:], strict=True):
            ids, _ = ours.encode_pair(a, b, max_length=24)
            assert ids == reference.encode(a, b).ids, (family, a, b)
            assert len(ids) <= 24


def test_roberta_pair_shape(folders):
    """RoBERTa's pair is <s> A </s> </s> B </s>, one token type, padded with id 1."""
    tok = load(str(folders["roberta"])).tokenizer
    a, b = tok.encode("Good morrow."), tok.encode("Good night.")
    ids, types = tok.encode_pair("Good morrow.", "Good night.")
    assert ids == [0, *a, 2, 2, *b, 2]
    assert types == [0] * len(ids)
    batch = tok.encode_batch(["Hi", "Good morrow, cousin."])
    assert batch["input_ids"][0][-1] == 1 and batch["attention_mask"][0][-1] == 0


def test_fallback_round_trips_through_its_own_file(folders, corpus, tmp_path):
    """The ALBERT tokenizer saved by lmarch (as classify does) loads back with the same ids."""
    _, sentences = corpus
    tok = load(str(folders["albert"])).tokenizer
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.unk_id) == (2, 3, 0, 4, 1)
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, HFTokenizersFallback)
    assert again.encode_batch(sentences) == tok.encode_batch(sentences)
    assert again.vocab_size == tok.vocab_size
    text = "good morrow, cousin"
    assert again.decode(again.encode(text)) == text
