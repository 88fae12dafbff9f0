"""Gemma 3 GGUF files without the real download: a tiny synthetic ``gemma3`` file written with
``gguf``'s writer loads into the LLaMA decoder with Gemma's options and gives the logits
``transformers`` gives for the same file; its SentencePiece BPE vocabulary gives the ids of the
tokenizer ``transformers`` builds from the same metadata; the chunked preset joins its parts
atomically and refuses damaged or missing ones by name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.loading import load
from lmarch.loading.sources import Source, read_gguf_gemma3
from lmarch.loading.speed import choose_quant
from lmarch.quant.blockq import BlockQ8Embedding, BlockQ8Linear
from lmarch.quant.gguf_gemma import load_gguf_gemma3_blocks
from lmarch.quant.kquants import KQuantLinear
from lmarch.tokenizers.base import load_tokenizer
from lmarch.tokenizers.gguf_spm import SentencePieceBPETokenizer, spm_tokenizer_from_gguf
from lmarch.weights.chunked import ChunkedFile, assemble
from lmarch.weights.gguf import read_gguf
from lmarch.weights.gguf_gemma import gguf_architecture, load_gguf_gemma3

gguf = pytest.importorskip("gguf")

N_LAYER, D, HEADS, KV, HD, FF, WINDOW = 6, 32, 2, 1, 256, 64, 4
# key_length 256: transformers' GGUF path always scales scores by 1/sqrt(256) (its default
# query_pre_attn_scalar), llama.cpp and lmarch by the head width; real Gemma 3 files agree.
META: dict[str, Any] = {
    "context_length": 64, "embedding_length": D, "block_count": N_LAYER,
    "feed_forward_length": FF, "attention.head_count": HEADS, "attention.head_count_kv": KV,
    "attention.key_length": HD, "attention.value_length": HD,
    "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1000.0,
    "attention.sliding_window": WINDOW,
}  # fmt: skip
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  ", "   "]
CHARS = list("▁abcdefghijklmnopqrstuvwxyzTH.,!?'")
MERGED = ["▁t", "th", "he", "▁th", "the", "▁the", "in", "▁a", "an", "▁an", "and", "▁and", "er",
          "ab", "bc", "abc", "▁▁", "re", "▁w", "ll", "ea", "es", "on", "st"]  # fmt: skip
BYTES = [f"<0x{b:02X}>" for b in range(256)]
TOKENS = CONTROL + USER + BYTES + CHARS + MERGED
TYPES = [3] * len(CONTROL) + [4] * len(USER) + [6] * 256 + [1] * (len(CHARS) + len(MERGED))
VOCAB = len(TOKENS)


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"token_embd.weight": (VOCAB, D), "output_norm.weight": (D,)}
    for i in range(N_LAYER):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (HEADS * HD, D),
            f"blk.{i}.attn_k.weight": (KV * HD, D), f"blk.{i}.attn_v.weight": (KV * HD, D),
            f"blk.{i}.attn_q_norm.weight": (HD,), f"blk.{i}.attn_k_norm.weight": (HD,),
            f"blk.{i}.attn_output.weight": (D, HEADS * HD),
            f"blk.{i}.post_attention_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
            f"blk.{i}.ffn_gate.weight": (FF, D), f"blk.{i}.ffn_up.weight": (FF, D),
            f"blk.{i}.ffn_down.weight": (D, FF), f"blk.{i}.post_ffw_norm.weight": (D,),
        }  # fmt: skip
    return shapes


# llama.cpp's Gemma 3 "Q4_K_M" mix: widths that are not a multiple of 256 (D here, 640 in
# the 270M model) cannot be K-quants, so q, k, gate and up fall back to Q5_0
MIXED = {
    "token_embd": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0",
    "attn_output": "Q4_K", "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": "Q8_0",
}  # fmt: skip


def _q4_k(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random Q4_K super-blocks (gguf cannot quantise to Q4_K) with d and dmin ~2e-4."""
    n_blocks = shape[0] * shape[1] // 256
    blocks = rng.integers(0, 256, (n_blocks, 144), dtype=np.uint8)
    for offset in (0, 2):
        halves = (np.abs(rng.standard_normal(n_blocks)) * 2e-4).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(shape[0], -1)


def _write(
    path: Path,
    meta: dict[str, Any] = META,
    drop: str | None = None,
    q8: bool = False,
    types: dict[str, str] | None = None,
) -> Path:
    """A tiny gemma3 file; ``q8``: every matrix in Q8_0; ``types``: the stored type of each
    matrix by its name (``attn_q``, ...; float32 where unnamed)."""
    w = gguf.GGUFWriter(path, "gemma3")
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(f"gemma3.{key}", value)
        else:
            w.add_uint32(f"gemma3.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(TYPES)])
    w.add_token_types(TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    rng = np.random.default_rng(0)
    for name, shape in _shapes().items():
        if name == drop:
            continue
        scale = 0.02 if len(shape) == 2 and "token_embd" not in name else 1.0
        # llama.cpp stores Gemma's norm gains as 1 + w: values around 1
        base = 1.0 if len(shape) == 1 else 0.0
        value = (base + scale * rng.standard_normal(shape)).astype(np.float32)
        type_name = "Q8_0" if q8 else (types or {}).get(name.split(".")[-2])
        if type_name == "Q4_K":
            w.add_tensor(name, _q4_k(rng, shape), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        elif type_name is not None and len(shape) == 2:
            kind = gguf.GGMLQuantizationType[type_name]
            w.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf")


def test_metadata_becomes_gemma3_config(tiny_file: Path) -> None:
    model, _ = load_gguf_gemma3(tiny_file)
    c = model.config
    assert c.layer_types == ("sliding",) * 5 + ("full",)
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta) == (WINDOW, 1000.0, 10000.0)
    assert (c.n_head, c.kv_heads, c.dim_per_head, c.query_pre_attn_scalar) == (2, 1, 256, 256.0)
    assert c.qk_norm and c.sandwich_norm and c.norm_unit_offset and c.embedding_scale
    assert c.tie_embeddings and c.activation == "gelu_tanh" and c.block_size == 64
    # stored 1 + w, held as w
    stored = read_gguf(tiny_file).load("blk.3.post_ffw_norm.weight")
    torch.testing.assert_close(model.blocks[3].post_norm_ffn.weight, stored - 1)
    assert gguf_architecture(tiny_file) == "gemma3"


def test_logits_equal_transformers_loading_the_same_file(tiny_file: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_file.parent), gguf_file=tiny_file.name, dtype=torch.float32
    ).eval()
    model, _ = load_gguf_gemma3(tiny_file)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    # 14 tokens > the window of 4: the sliding and the global layers both matter
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max().item() > 0.1  # not a degenerate all-zero comparison


def _transformers_tokenizer(path: Path) -> Any:
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    return convert_gguf_tokenizer(arch, tokenizer_dict)[0]


TEXTS = [
    "the theater and an abc", " the", "  the   and\n\nthe\n", "Hé! ünïcode 🤖 ok?",
    "<start_of_turn>user\nthe<end_of_turn>\n<start_of_turn>model\n", "abcbc abcab bcabc",
    "<bos><eos>x<unk>", "tttthhhheee", "", "  ", "\n\n\n",
]  # fmt: skip


def test_vocabulary_gives_transformers_ids(tiny_file: Path) -> None:
    theirs = _transformers_tokenizer(tiny_file)
    ours = spm_tokenizer_from_gguf(read_gguf(tiny_file).metadata)
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("the and") == [TOKENS.index("the"), TOKENS.index("▁and")]
    assert ours.encode("é")[0] == TOKENS.index("<0xC3>")  # byte fallback


def test_tokenizer_saves_and_loads(tiny_file: Path, tmp_path: Path) -> None:
    ours = spm_tokenizer_from_gguf(read_gguf(tiny_file).metadata)
    ours.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")  # as a run folder's tokenizer is read back
    assert isinstance(back, SentencePieceBPETokenizer)
    for text in TEXTS:
        assert back.encode(text) == ours.encode(text)


def test_loaded_model_has_gemma_turns(tiny_file: Path) -> None:
    loaded = read_gguf_gemma3(Source("gguf", tiny_file, "tiny"), 32)
    assert loaded.chat.stop_token_ids == (1, 5)  # <eos>, <end_of_turn>
    assert loaded.chat.add_bos and loaded.chat.bos_token_id == 2
    assert loaded.model.config.block_size == 32
    from lmarch.tokenizers.chat import render_chat

    text = render_chat(loaded.chat_template, [{"role": "user", "content": "hi"}], True)
    assert text == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(LmarchError, match="load as --quant q4 .* or none .*, not as --quant q8"):
        read_gguf_gemma3(Source("gguf", tiny_file, "tiny"), 32, "q8")


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("gemma") / "mixed.gguf", types=MIXED)


def test_auto_quant_keeps_a_gemma_files_blocks(tiny_file: Path, mixed_file: Path) -> None:
    assert choose_quant("auto", "gguf", mixed_file, "cpu", None) == "q4"
    assert choose_quant("auto", "gguf", tiny_file, "cpu", None) == "none"  # float32 matrices


def test_a_block_load_parses_the_file_once(
    mixed_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmarch.weights.gguf as reader

    parse, calls = reader._parse, []
    monkeypatch.setattr(reader, "_parse", lambda *a: calls.append(a) or parse(*a))
    loaded = load(mixed_file)  # auto: choosing q4 parses it, the loader reuses that parse
    assert loaded.quant == "q4" and len(calls) == 1
    assert isinstance(loaded.model.blocks[0].attn.qkv, BlockQ8Linear)


def test_blocks_are_the_files_weights_exactly(mixed_file: Path) -> None:
    """Every matrix of the block model dequantises to the float loader's weight bit for bit
    (Q5_0 re-encoded as Q8_0 included); the q4 model holds no float matrix."""
    model, _ = load_gguf_gemma3_blocks(mixed_file)
    ref, _ = load_gguf_gemma3(mixed_file)
    block, ref_block = model.blocks[2], ref.blocks[2]
    kinds = {
        "attn.qkv": BlockQ8Linear,  # Q5_0, Q5_0, Q8_0: one Q8_0 layer
        "attn.out": KQuantLinear,
        "ffn.gate_up": BlockQ8Linear,
        "ffn.down": BlockQ8Linear,
    }
    for name, kind in kinds.items():
        layer = block.get_submodule(name)
        assert type(layer) is kind, name
        expected = ref_block.get_submodule(name).weight
        assert torch.equal(layer.dequantized_weight(), expected), name
    assert isinstance(model.tok_emb, BlockQ8Embedding)
    assert model.tok_emb.codes is model.lm_head.codes  # one table for embedding and head
    assert torch.equal(model.lm_head.dequantized_weight(), ref.lm_head.weight)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert floats and all(t.dim() == 1 for t in floats)  # norm gains only


def test_block_model_logits_follow_the_float_model(mixed_file: Path) -> None:
    model, _ = load_gguf_gemma3_blocks(mixed_file)
    ref, _ = load_gguf_gemma3(mixed_file)
    ids = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids)
    # the native kernels round each block of 32 activations to 16-bit integers: measured
    # 1.5e-3 on logits up to 35 (4e-5 of the largest); allowed 2e-4 of it
    assert (ours - theirs).abs().max().item() <= 2e-4 * theirs.abs().max().item()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize(
    ("meta", "drop", "message"),
    [
        ({**META, "attention.sliding_window_pattern": 0}, None, "sliding_window_pattern=0 must"),
        ({**META, "expert_count": 4}, None, "metadata gemma3.expert_count is not supported"),
        ({**META, "attention.value_length": 128}, None, "value_length=128 differs"),
        ({k: v for k, v in META.items() if k != "attention.sliding_window"}, None, "missing"),
        (META, "blk.2.attn_k_norm.weight", "tensor 'blk.2.attn_k_norm.weight' is missing"),
        ({**META, "embedding_length": 16}, None, f"'token_embd.weight' has shape ({VOCAB}, 32)"),
    ],
)
def test_bad_files_are_refused_by_name(
    tmp_path: Path, meta: dict[str, Any], drop: str | None, message: str
) -> None:
    path = _write(tmp_path / "bad.gguf", meta, drop)
    with pytest.raises(LmarchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_gguf_gemma3(path)


def _fake_parts(root: Path, chunks: list[bytes]) -> ChunkedFile:
    """Chunk packages ``fakepart{n}`` under ``root`` (put on sys.path by the caller)."""
    parts = []
    for n, chunk in enumerate(chunks):
        pkg = root / f"lmarch_fakepart{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"w.part{n}").write_bytes(chunk)
        parts.append((pkg.name, f"data/w.part{n}"))
    import hashlib

    whole = b"".join(chunks)
    return ChunkedFile("w.bin", tuple(parts), len(whole), hashlib.sha256(whole).hexdigest(), "X")


def test_chunks_join_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = _fake_parts(tmp_path / "site", [b"abc" * 1000, b"def" * 999, b"g"])
    out = assemble(spec, tmp_path / "cache")
    assert out.read_bytes() == b"abc" * 1000 + b"def" * 999 + b"g"
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.bin"]  # no temp file left
    (tmp_path / "site" / "lmarch_fakepart2" / "data" / "w.part2").unlink()
    assert assemble(spec, tmp_path / "cache") == out  # joined once: the parts are not reread
    out.unlink()
    with pytest.raises(LmarchError, match=r"w.bin: part .*w.part2 is missing: run X"):
        assemble(spec, tmp_path / "cache")


def test_damaged_or_missing_chunks_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = _fake_parts(tmp_path / "site", [b"abc", b"def"])
    damaged = ChunkedFile(spec.name, spec.parts, spec.size, "0" * 64, "X")
    with pytest.raises(LmarchError, match="the joined parts have SHA-256"):
        assemble(damaged, tmp_path / "cache")
    assert not (tmp_path / "cache" / "w.bin").exists()
    short = ChunkedFile(spec.name, spec.parts, 7, None, "X")
    with pytest.raises(LmarchError, match="the parts hold 6 bytes, the whole file has 7"):
        assemble(short, tmp_path / "cache")
    gone = ChunkedFile("g.bin", (("lmarch_no_such_part", "x"),), 1, None, "make gemma")
    with pytest.raises(LmarchError, match="package lmarch_no_such_part is missing.*make gemma"):
        assemble(gone, tmp_path / "cache")
    assert "lmarch_no_such_part" not in sys.modules


def test_missing_gemma_package_is_one_line_naming_make_gemma(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmarch.loading import sources

    real = sources.CHUNKED_PRESETS["gemma3-270m"]
    absent = (("lmarch_gemma_part_absent", real.parts[0][1]), *real.parts[1:])
    monkeypatch.setitem(
        sources.CHUNKED_PRESETS,
        "gemma3-270m",
        ChunkedFile(real.name, absent, 1, None, real.install),
    )
    monkeypatch.setenv("LMARCH_CACHE", str(tmp_path))  # no joined file from an earlier install
    code, out, err = cli("generate", "gemma3-270m", "Hello")
    assert code == 2 and out == ""
    line = "gemma-3-270m-q4_k_m.gguf is not installed (package lmarch_gemma_part_absent is missing)"
    assert line in err and "run make gemma" in err and len(err.strip().splitlines()) <= 2
