"""The Unigram tokenizer encodes exactly as sentencepiece 0.2.3 does.

Models are trained here with sentencepiece itself on the bundled tinyshakespeare (Unigram, small
vocabularies, with and without byte fallback, with user-defined and control symbols); lmarch
reads the ``.model`` file by itself and must give the same ids on the whole corpus (line by line
and in chunks), on 1,000 seeded random Unicode strings (mixed scripts, whitespace runs, emoji,
combining marks, control characters, the symbols themselves) and under other normaliser and
whitespace settings; decoding must equal sentencepiece's too.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.errors import LmarchError
from lmarch.tokenizers.base import load_tokenizer
from lmarch.tokenizers.unigram import UnigramTokenizer

spm = pytest.importorskip("sentencepiece")
assert spm.__version__ == "0.2.3"

CORPUS = TINY_SHAKESPEARE.read_text(encoding="utf-8")
POOLS = [
    "abcdefghijklmnopqrstuvwxyz ",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    " " * 5 + "\t\n\r\u3000\u00a0\u2002\u200b",
    "éèêüñçßøåÆ",
    "e\u0301a\u0308c\u0327\u0301\u0308",
    "日本語のテキスト漢字カタカナ",
    "русский текст",
    "العربية",
    "한국어",
    "😀👍🏽🇫🇷👨‍👩‍👧🎉",
    "\x00\x01\x07\x1b\x7f\x85\u200d\ufeff",
    "ﬁ①Ａ½™㎏ｶ",
    "0123456789",
    ".,;:!?'\"-()[]<>",
    "▁",
]
SYMBOLS = ["[MASK]", "<sep>", "[CLS]", "<s>", "</s>", "<unk>"]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """``n`` strings of up to 60 characters from :data:`POOLS`, special symbols mixed in."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 60)):
            if rng.random() < 0.03:
                parts.append(rng.choice(SYMBOLS))
            else:
                parts.append(rng.choice(rng.choice(POOLS)))
        out.append("".join(parts))
    return out


def _train(folder: Path, name: str, text: str, vocab_size: int, **options) -> Path:
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / f"{name}.txt"),
        model_prefix=str(folder / name),
        vocab_size=vocab_size,
        model_type="unigram",
        minloglevel=2,
        num_threads=1,
        **options,
    )
    return folder / f"{name}.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two sentencepiece models of tinyshakespeare: byte fallback on (1000 pieces) and off
    (800 pieces), both with user-defined ``[MASK]`` and ``<sep>`` and a control ``[CLS]``."""
    folder = tmp_path_factory.mktemp("spm")
    symbols = dict(user_defined_symbols=["[MASK]", "<sep>"], control_symbols=["[CLS]"])
    return {
        "bytes": _train(folder, "bytes", CORPUS, 1000, byte_fallback=True, **symbols),
        "unk": _train(folder, "unk", CORPUS, 800, byte_fallback=False, **symbols),
    }


@pytest.mark.parametrize("kind", ["bytes", "unk"])
def test_whole_corpus_same_ids_as_sentencepiece(models, kind) -> None:
    """The whole of tinyshakespeare gives sentencepiece's ids: line by line for one model, in
    4,000-character chunks (newlines and runs of spaces inside) for the other."""
    ours = UnigramTokenizer.from_sentencepiece(models[kind])
    ref = spm.SentencePieceProcessor(model_file=str(models[kind]))
    if kind == "bytes":
        texts = CORPUS.splitlines()
    else:
        texts = [CORPUS[i : i + 4000] for i in range(0, len(CORPUS), 4000)]
    assert sum(map(len, texts)) >= len(CORPUS) - CORPUS.count("\n")
    want = ref.encode(texts)
    assert sum(map(len, want)) > 250_000
    assert [i for i, text in enumerate(texts) if ours.encode(text) != want[i]] == []


@pytest.mark.parametrize("kind", ["bytes", "unk"])
def test_random_unicode_same_ids_and_text_as_sentencepiece(models, kind) -> None:
    """1,000 seeded strings: same ids; decoding those ids gives sentencepiece's text."""
    ours = UnigramTokenizer.from_sentencepiece(models[kind])
    ref = spm.SentencePieceProcessor(model_file=str(models[kind]))
    texts = random_strings(1000)
    want = ref.encode(texts)
    assert [t for t, w in zip(texts, want, strict=True) if ours.encode(t) != w] == []
    assert [t for t, w in zip(texts, want, strict=True) if ours.decode(w) != ref.decode(w)] == []
    # the strings did reach the cases they are for
    ids = {i for w in want for i in w}
    assert ours.token_to_id("[MASK]") in ids and ours.token_to_id("<sep>") in ids
    if kind == "bytes":
        assert ours.token_to_id("<0xF0>") in ids  # an emoji spelled in bytes
    else:
        assert ours.unk_id in ids


@pytest.mark.parametrize(
    "options",
    [
        dict(add_dummy_prefix=False, remove_extra_whitespaces=False),
        dict(treat_whitespace_as_suffix=True),
        dict(normalization_rule_name="identity"),
        dict(normalization_rule_name="nfkc_cf", byte_fallback=True),
        dict(split_by_whitespace=False, allow_whitespace_only_pieces=True),
    ],
    ids=["no-prefix-keep-spaces", "suffix", "identity", "nfkc_cf", "whitespace-pieces"],
)
def test_other_normaliser_settings_same_ids(tmp_path, options) -> None:
    """The whitespace and normalisation settings of the model's spec are followed."""
    path = _train(tmp_path, "m", CORPUS[:150_000], 400, user_defined_symbols=["[MASK]"], **options)
    ours = UnigramTokenizer.from_sentencepiece(path)
    ref = spm.SentencePieceProcessor(model_file=str(path))
    texts = random_strings(300, seed=1) + CORPUS[150_000:200_000].splitlines()
    want = ref.encode(texts)
    assert [t for t, w in zip(texts, want, strict=True) if ours.encode(t) != w] == []
    assert [t for t, w in zip(texts, want, strict=True) if ours.decode(w) != ref.decode(w)] == []


def test_encoding_details(models) -> None:
    """Exact pieces for a few cases: the dummy prefix, collapsed spaces, NFKC, byte fallback,
    a user-defined symbol kept whole and a control symbol read as text."""
    tok = UnigramTokenizer.from_sentencepiece(models["bytes"])
    assert tok.tokenize("  ROMEO:   But soft ") == tok.tokenize("ROMEO: But soft")
    assert tok.tokenize("ROMEO:")[0].startswith("▁")
    assert tok.encode("ﬁre") == tok.encode("fire")  # NFKC: the ligature is two letters
    # a character outside the vocabulary is its UTF-8 bytes
    assert tok.tokenize("é")[-2:] == ["<0xC3>", "<0xA9>"]
    assert tok.tokenize("日")[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert "[MASK]" in tok.tokenize("a[MASK]b") and "[CLS]" not in tok.tokenize("a[CLS]b")
    unk = UnigramTokenizer.from_sentencepiece(models["unk"])
    # a run of unknown characters is one unknown id
    assert unk.encode("日本語") == [unk.encode("日本語")[0], unk.unk_id]
    assert unk.decode(unk.encode("a 日本語 b")) == "a  \u2047  b"


def test_round_trip_decode(models) -> None:
    """With byte fallback, text already in normal form comes back exactly."""
    tok = UnigramTokenizer.from_sentencepiece(models["bytes"])
    for text in [
        "First Citizen: Before we proceed any further, hear me speak.",
        "Ünïcödé, 日本語 and emoji 😀👍🏽 with [MASK] inside",
        CORPUS[:3000].replace("\n", " ").replace("  ", " ").strip(),
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.token_to_id("[CLS]"), *tok.encode("hi")]) == "hi"
    assert tok.decode([tok.token_to_id("[CLS]")], skip_special_tokens=False) == "[CLS]"
    with pytest.raises(LmarchError, match="token id 5000 is not in 0..999"):
        tok.decode([5000])


def test_save_and_load(models, tmp_path) -> None:
    """The JSON file reads back (through load_tokenizer) into a tokenizer with the same ids."""
    tok = UnigramTokenizer.from_sentencepiece(models["bytes"])
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, UnigramTokenizer)
    assert again.pieces == tok.pieces
    texts = random_strings(200, seed=2)
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (again.cls_id, again.unk_id, again.mask_id) == (tok.cls_id, tok.unk_id, tok.mask_id)


def test_roles_and_encoder_input(models) -> None:
    """Roles come from the usual names; encode_pair builds [CLS] A [SEP] B [SEP]."""
    tok = UnigramTokenizer.from_sentencepiece(models["bytes"], roles={"sep": "<sep>"})
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.cls_id == tok.token_to_id("[CLS]") and tok.sep_id == tok.token_to_id("<sep>")
    assert tok.pad_id is None and tok.mask_id == tok.token_to_id("[MASK]")
    ids, types = tok.encode_pair("Good morrow", "Good night")
    a, b = tok.encode("Good morrow"), tok.encode("Good night")
    assert ids == [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    with pytest.raises(LmarchError, match="the pad token '<pad>' is not in the vocabulary"):
        UnigramTokenizer.from_sentencepiece(models["bytes"], roles={"pad": "<pad>"})


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = bytes([number << 3 | wire])
    if wire == 2:
        return key + bytes([len(payload)]) + payload
    return key + payload


def test_bad_model_files_are_refused(models, tmp_path) -> None:
    """A file that is not a sentencepiece Unigram model gives one LmarchError line naming it."""
    cases = {
        "text.model": b'{"type": "unigram"}',
        "random.model": bytes(random.Random(0).randrange(256) for _ in range(4000)),
        "truncated.model": models["bytes"].read_bytes()[:5000],
        "empty.model": b"",
    }
    # a well-formed message with a BPE trainer spec
    piece = _field(1, 2, b"<unk>") + _field(2, 5, struct.pack("<f", 0.0)) + _field(3, 0, b"\x02")
    cases["bpe.model"] = _field(1, 2, piece) + _field(2, 2, _field(3, 0, b"\x02"))
    # a Unigram model without an unknown piece
    cases["no_unk.model"] = _field(1, 2, _field(1, 2, b"a") + _field(2, 5, b"\0\0\0\0"))
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(LmarchError) as err:
            UnigramTokenizer.from_sentencepiece(path)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, name
        if name == "bpe.model":
            assert "sentencepiece BPE model; only Unigram models are read" in message
        elif name == "no_unk.model":
            assert "exactly one unknown piece" in message
        else:
            assert "is not a sentencepiece model" in message, (name, message)
    with pytest.raises(LmarchError, match="cannot read"):
        UnigramTokenizer.from_sentencepiece(tmp_path / "missing.model")


# ---------------------------------------------------------------- Hugging Face files


def _hf_tokenizer_json(model_path: Path, out: Path) -> Path:
    """A ``tokenizer.json`` for a sentencepiece model, laid out as transformers' converter
    writes T5's: Precompiled charsmap + Replace(" {2,}"), WhitespaceSplit + Metaspace, the
    control and user-defined pieces as added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    from lmarch.tokenizers.sentencepiece_model import read_sentencepiece_model

    m = read_sentencepiece_model(model_path)
    unk = next(i for i, (_, _, t) in enumerate(m.pieces) if t == 2)
    tok = Tokenizer(models.Unigram([(p, s) for p, s, _ in m.pieces], unk, m.byte_fallback))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(m.precompiled_charsmap), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre.Sequence(
        [pre.WhitespaceSplit(), pre.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(p, special=True) for p, _, t in m.pieces if t == 3])
    tok.add_tokens([AddedToken(p, special=False) for p, _, t in m.pieces if t == 4])
    tok.save(str(out))
    return out


@pytest.mark.parametrize("kind", ["bytes", "unk"])
def test_tokenizer_json_reads_as_its_sentencepiece_model(models, kind, tmp_path) -> None:
    """A Unigram tokenizer.json converted from a sentencepiece model encodes as that model:
    sentencepiece's ids on the random strings and the corpus lines, which are also the
    ``tokenizers`` library's ids for every corpus line. (On the random strings the library
    departs from sentencepiece itself: it reads ``<s>`` in text as the control token and
    U+0085 as whitespace.)"""
    from tokenizers import Tokenizer

    from lmarch.tokenizers.unigram_hf import unigram_from_tokenizer_json

    path = _hf_tokenizer_json(models[kind], tmp_path / "tokenizer.json")
    ours = unigram_from_tokenizer_json(path)
    ref = spm.SentencePieceProcessor(model_file=str(models[kind]))
    texts = random_strings(500, seed=3)
    want = ref.encode(texts)
    assert [t for t, w in zip(texts, want, strict=True) if ours.encode(t) != w] == []
    lines = CORPUS.splitlines()[:6000]
    library = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(lines, False)]
    assert library == ref.encode(lines)
    assert [line for line, w in zip(lines, library, strict=True) if ours.encode(line) != w] == []
    assert [ours.decode(w) for w in want[:100]] == [ref.decode(w) for w in want[:100]]


def test_hf_folders(models, tmp_path) -> None:
    """An encoder folder with a converted Unigram tokenizer.json or a bare spiece.model gets
    lmarch's tokenizer with the roles tokenizer_config.json names; a pipeline lmarch does not
    reproduce goes to the library, and a bare spiece.model that needs lower-casing is refused."""
    import json

    from tokenizers import Tokenizer, normalizers

    from lmarch.tokenizers.hf_fallback import HFTokenizersFallback
    from lmarch.tokenizers.hf_json import encoder_tokenizer_from_hf_folder

    config = {"cls_token": "[CLS]", "sep_token": "<sep>", "mask_token": "[MASK]"}
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "spiece.model").write_bytes(models["bytes"].read_bytes())
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    converted = tmp_path / "converted"
    converted.mkdir()
    _hf_tokenizer_json(models["bytes"], converted / "tokenizer.json")
    (converted / "tokenizer_config.json").write_text(json.dumps(config))
    for folder in (bare, converted):
        tok = encoder_tokenizer_from_hf_folder(folder)
        assert isinstance(tok, UnigramTokenizer)
        assert (tok.cls_id, tok.sep_id, tok.mask_id) == tuple(
            tok.token_to_id(t) for t in ("[CLS]", "<sep>", "[MASK]")
        )
        assert tok.encode("Good morrow, cousin.") == UnigramTokenizer.from_sentencepiece(
            models["bytes"]
        ).encode("Good morrow, cousin.")
    # ALBERT-style normalisers in tokenizers' own terms: the library runs that file
    lowered = Tokenizer.from_file(str(converted / "tokenizer.json"))
    lowered.normalizer = normalizers.Sequence([normalizers.Lowercase(), lowered.normalizer])
    lowered.save(str(converted / "tokenizer.json"))
    assert isinstance(encoder_tokenizer_from_hf_folder(converted), HFTokenizersFallback)
    (bare / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": True}))
    with pytest.raises(LmarchError, match="asks to lower-case or strip accents"):
        encoder_tokenizer_from_hf_folder(bare)


def test_unsupported_tokenizer_json_is_refused_by_name(models, tmp_path) -> None:
    import json

    from lmarch.tokenizers.unigram_hf import unigram_from_tokenizer_json

    path = _hf_tokenizer_json(models["unk"], tmp_path / "tokenizer.json")
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    path.write_text(json.dumps(data))
    with pytest.raises(LmarchError, match=r"pre-tokenizer \['Whitespace'\] is not read"):
        unigram_from_tokenizer_json(path)
    data["model"] = {"type": "BPE", "vocab": {}, "merges": []}
    path.write_text(json.dumps(data))
    with pytest.raises(LmarchError, match="not a Unigram tokenizer.json"):
        unigram_from_tokenizer_json(path)


def test_corrupted_model_files_fail_cleanly(models, tmp_path) -> None:
    """200 randomly damaged copies of a real .model file: each is refused with LmarchError or
    reads into a tokenizer that encodes and decodes; no other exception, no hang."""
    data = models["bytes"].read_bytes()
    rng = random.Random(0)
    texts = random_strings(20, seed=4)
    outcomes = {"refused": 0, "read": 0}
    for _ in range(200):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path = tmp_path / "damaged.model"
        path.write_bytes(bytes(damaged))
        try:
            tok = UnigramTokenizer.from_sentencepiece(path)
        except LmarchError as exc:
            assert str(path) in str(exc)
            outcomes["refused"] += 1
            continue
        for text in texts:
            tok.decode(tok.encode(text))
        outcomes["read"] += 1
    assert outcomes["refused"] >= 10 and outcomes["read"] >= 100, outcomes


def test_albert_folder_with_spiece_model(tmp_path, cli) -> None:
    """An ALBERT folder holding only spiece.model (ALBERT's layout, trained by sentencepiece)
    loads with lmarch's tokenizer: [CLS] + sentencepiece's ids + [SEP]; the embed command runs
    on it; with a damaged spiece.model the command prints one line and exits 2."""
    transformers = pytest.importorskip("transformers")
    import json

    import torch

    from lmarch.loading import load

    folder = tmp_path / "albert"
    folder.mkdir()
    model_path = _train(
        tmp_path, "albert", CORPUS[:100_000], 500, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        control_symbols=["[CLS]", "[SEP]"], user_defined_symbols=["[MASK]"],
    )  # fmt: skip
    (folder / "spiece.model").write_bytes(model_path.read_bytes())
    roles = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**roles, "mask_token": "[MASK]"}))
    config = transformers.AlbertConfig(
        vocab_size=500, embedding_size=16, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AlbertModel(config).save_pretrained(folder)
    tok = load(str(folder)).tokenizer
    assert isinstance(tok, UnigramTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    ref = spm.SentencePieceProcessor(model_file=str(model_path))
    for text in CORPUS[100_000:101_000].splitlines() + random_strings(50, seed=6):
        assert tok.encode_pair(text)[0] == [2, *ref.encode(text), 3]
    lines = tmp_path / "lines.txt"
    lines.write_text("Good morrow, cousin.\nWhat light through yonder window breaks?\n")
    summary = cli.json("embed", folder, lines, "--out", tmp_path / "v.npy")
    assert (summary["lines"], summary["dim"]) == (2, 32) and (tmp_path / "v.npy").is_file()
    (folder / "spiece.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0f not a model")
    message = cli.error("embed", folder, lines, "--out", tmp_path / "w.npy")
    assert "spiece.model is not a sentencepiece model" in message


def test_word_ids_group_pieces_by_word(models) -> None:
    """word_ids numbers the words of the text: the pieces of word k decode to its k-th
    whitespace-separated word (bytes of an unseen character stay in their word)."""
    from lmarch.train.run import masked_lm_sequences

    tok = UnigramTokenizer.from_sentencepiece(models["bytes"])
    for text in CORPUS.splitlines()[:400] + ["Zounds, 日本語 😀 ça [MASK] va"]:
        ids, words = tok.encode(text), tok.word_ids(text)
        assert len(ids) == len(words)
        groups = [[i for i, w in zip(ids, words, strict=True) if w == k] for k in set(words)]
        assert [tok.decode(g).strip() for g in groups] == text.split()
    seqs, word_ids = masked_lm_sequences(tok, CORPUS[:5000], 64, whole_word=True)
    assert word_ids is not None and [len(s) for s in seqs] == [len(w) for w in word_ids]
