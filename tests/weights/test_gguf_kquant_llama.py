"""A tiny LLaMA GGUF written with K-quant (and other block) tensors by the gguf package's
writer: lmarch loads it in float exactly as the gguf package dequantises it (and close to what
llama.cpp computes), keeps its Q4_K / Q6_K blocks as stored under the default q4 scheme, and
generates the same greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmarch.loading import load
from lmarch.loading.speed import gguf_native_scheme
from lmarch.models.llama import Llama
from lmarch.nn.init import empty_weights
from lmarch.quant.kquants import KQuantEmbedding, RowConcatLinear
from lmarch.weights.gguf import read_gguf
from lmarch.weights.gguf_kquants import BLOCK_SHAPES
from lmarch.weights.gguf_llama import gguf_llama_map, llama_config_from_gguf
from lmarch.weights.safetensors_io import load_into_model

WIDTH, HIDDEN, VOCAB = 256, 512, 260
# byte offsets of the float16 constants in a block, and a size for them that gives weights of
# a few hundredths (random codes)
HALVES = {
    "Q2_K": ((80, 82), 2e-3),
    "Q3_K": ((108,), 1e-3),
    "Q4_K": ((0, 2), 2e-4),
    "Q5_K": ((0, 2), 5e-5),
    "Q6_K": ((208,), 5e-5),
    "Q5_0": ((0,), 5e-3),
    "Q5_1": ((0, 2), 3e-3),
    "IQ4_NL": ((0,), 1e-3),
}
# (tensor, shape) of one layer; stored types of layer 0 and layer 1 for the two files
LAYER = [
    ("attn_q", (WIDTH, WIDTH)), ("attn_k", (128, WIDTH)), ("attn_v", (128, WIDTH)),
    ("attn_output", (WIDTH, WIDTH)), ("ffn_gate", (HIDDEN, WIDTH)),
    ("ffn_up", (HIDDEN, WIDTH)), ("ffn_down", (WIDTH, HIDDEN)),
]  # fmt: skip
Q4_K_M = [  # as llama.cpp's Q4_K_M mixes them: v and down in Q6_K in some layers
    ["Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q4_K", "Q6_K"],
    ["Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K"],
]
Q5_K_M = [  # Q5_K with Q6_K for some v and down projections
    ["Q5_K", "Q5_K", "Q6_K", "Q5_K", "Q5_K", "Q5_K", "Q6_K"],
    ["Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q5_K"],
]
EVERY_TYPE = [
    ["Q2_K", "Q3_K", "Q5_K", "Q5_0", "Q5_1", "IQ4_NL", "Q4_K"],
    ["Q6_K", "Q4_K", "Q2_K", "Q3_K", "Q5_K", "Q5_0", "IQ4_NL"],
]


def random_tensor(rng: np.random.Generator, shape: tuple[int, int], type_name: str) -> np.ndarray:
    """Random valid blocks of ``type_name`` for a [rows, cols] tensor: random code bytes,
    positive float16 constants of the size in HALVES."""
    size, nbytes = BLOCK_SHAPES[type_name]
    n_blocks = shape[0] * shape[1] // size
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    offsets, scale = HALVES[type_name]
    for offset in offsets:
        halves = (np.abs(rng.standard_normal(n_blocks)) * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(shape[0], -1)


def write_llama(path: Path, layer_types: list[list[str]], embedding_type: str) -> Path:
    """A 2-layer LLaMA GGUF (width 256, 4 query / 2 KV heads, SwiGLU 512, embeddings tied to
    the head, stored as ``embedding_type``) with a 260-token byte-level BPE vocabulary."""
    from lmarch.tokenizers.bpe import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["ab", "abc", "<s>", "</s>"]
    w = gguf.GGUFWriter(path, "llama")
    for key, value in [
        ("block_count", 2), ("context_length", 128), ("embedding_length", WIDTH),
        ("feed_forward_length", HIDDEN), ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
    ]:  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "olmo")  # GPT-2's split, a name llama.cpp knows
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [1] * 258 + [3, 3])
    w.add_array("tokenizer.ggml.merges", ["a b", "ab c"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 258)
    w.add_uint32("tokenizer.ggml.eos_token_id", 259)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, int], type_name: str) -> None:
        qtype = gguf.GGMLQuantizationType[type_name]
        w.add_tensor(name, random_tensor(rng, shape, type_name), raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, WIDTH), embedding_type)
    norm = (1.0 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
    w.add_tensor("output_norm.weight", norm)
    for i, types in enumerate(layer_types):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        for (name, shape), type_name in zip(LAYER, types):
            add(f"blk.{i}.{name}.weight", shape, type_name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def oracle_model(path: Path) -> Llama:
    """A float32 Llama whose every weight is ``gguf.quants.dequantize`` of the file's tensor."""
    f = read_gguf(path)
    config = llama_config_from_gguf(f)
    with empty_weights():
        model = Llama(config)
    tensors = {}
    for name in f.tensor_names:
        data, type_name, shape = f.raw(name)
        values = gguf.quants.dequantize(np.array(data), gguf.GGMLQuantizationType[type_name])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(values).reshape(shape)).float()
    ours = gguf_llama_map(config).to_ours(tensors, config.n_layer, where=str(path))
    load_into_model(model, ours, source=str(path), assign=True)
    model.rotary.reset_tables("cpu")
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kquant_llama")
    return {
        "q4_k_m": write_llama(root / "q4_k_m.gguf", Q4_K_M, "Q6_K"),
        "q5_k_m": write_llama(root / "q5_k_m.gguf", Q5_K_M, "Q5_K"),
        "every": write_llama(root / "every.gguf", EVERY_TYPE, "Q5_K"),
    }


IDS = torch.tensor([[258, 97, 98, 99, 256, 32, 120, 257, 100, 101, 102, 10]])


@pytest.mark.parametrize("which", ["q4_k_m", "q5_k_m", "every"])
def test_float_load_equals_the_gguf_package_dequantisation(files, which: str) -> None:
    """Every block type, loaded with --quant none: the logits are the oracle's, exactly."""
    loaded = load(str(files[which]), quant="none")
    assert loaded.quant == "none"
    with torch.no_grad():
        ours, theirs = loaded.model(IDS), oracle_model(files[which])(IDS)
    ours = ours[0] if isinstance(ours, tuple) else ours
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert torch.isfinite(theirs).all() and theirs.std() > 0.1
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("which", ["q4_k_m", "q5_k_m"])
def test_a_k_quant_file_runs_on_its_own_blocks_by_default(files, which: str) -> None:
    """Q4_K or Q5_K and Q6_K layers (a mixed fused qkv too) and the tied K-quant head and
    embedding are kept as stored and dequantise to the float model's weights bit for bit; the
    logits of the native products stay within 5e-4 of the float model's range; greedy tokens are
    equal."""
    from lmarch.generation import GenerationStats, SamplingConfig
    from lmarch.tasks.generate import generate_text

    path = files[which]
    assert gguf_native_scheme(path) == "q4" and gguf_native_scheme(files["every"]) is None
    fast, exact = load(str(path)), load(str(path), quant="none")
    assert fast.quant == "q4"
    model = fast.model
    main_type, head_type = ("Q4_K", "Q6_K") if which == "q4_k_m" else ("Q5_K", "Q5_K")
    assert isinstance(model.blocks[0].attn.qkv, RowConcatLinear)
    assert model.blocks[1].attn.qkv.type_name == main_type
    assert model.blocks[0].ffn.down.type_name == "Q6_K"
    assert model.blocks[1].ffn.down.type_name == main_type
    assert model.lm_head.type_name == head_type and isinstance(model.tok_emb, KQuantEmbedding)
    for name in ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.ffn.gate_up", "lm_head"]:
        weight = exact.model.get_submodule(name).weight
        assert torch.equal(model.get_submodule(name).dequantized_weight(), weight), name
    with torch.no_grad():
        assert torch.equal(model.tok_emb(IDS), exact.model.tok_emb(IDS))
        y, ref = model(IDS), exact.model(IDS)
    y = y[0] if isinstance(y, tuple) else y
    ref = ref[0] if isinstance(ref, tuple) else ref
    # each product is within 1e-4 of its float counterpart (tests/quant/test_kquants.py); two
    # layers of a random model amplify that up to ~1.5e-4 at some positions
    assert (y - ref).abs().max().item() <= 5e-4 * ref.abs().max().item()
    answers = []
    for loaded in (fast, exact):
        stats = GenerationStats()
        greedy = SamplingConfig(temperature=0.0)
        for _ in generate_text(loaded, "abc ab", 16, greedy, ignore_eos=True, stats=stats):
            pass
        answers.append(stats.token_ids)
    assert len(answers[0]) == 16 and answers[0] == answers[1]


def test_lmarch_generate_runs_a_k_quant_file(files, cli) -> None:
    """The command line: the same 8 greedy tokens from the q4 blocks as from float32."""
    runs = {}
    for quant in ("auto", "none"):
        summary = cli.json(
            "generate", files["q4_k_m"], "abc", "--max-new-tokens", "8", "--ignore-eos",
            "--quant", quant,
        )  # fmt: skip
        runs[quant] = summary
    assert runs["auto"]["quant"] == "q4", json.dumps(runs["auto"])
    assert runs["auto"]["token_ids"] == runs["none"]["token_ids"]
    assert len(runs["auto"]["token_ids"]) == 8


@pytest.mark.parametrize("which", ["q4_k_m", "every"])  # "every" holds Q5_K too
def test_llama_cpp_computes_the_same_logits(files, which: str) -> None:
    """llama.cpp (llama-cpp-python, where installed), a second implementation of every block
    layout, gives the float model's logits to 2% of their range (it rounds activations to 8
    bits; measured 0.5-0.9%) and the same top token at every position; a misread layout would
    be off by the whole range."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cpp = llama_cpp.Llama(
        model_path=str(files[which]), n_ctx=64, n_threads=1, verbose=False, logits_all=True
    )
    ids = IDS[0].tolist()
    cpp.eval(ids)
    theirs = torch.from_numpy(np.asarray(cpp.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = load(str(files[which]), quant="none").model(IDS)
    ours = (ours[0] if isinstance(ours, tuple) else ours)[0]
    assert (ours - theirs).abs().max().item() <= 0.02 * ours.abs().max().item()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_a_compiled_decode_step_gives_the_same_tokens(files) -> None:
    """torch.compile keeps the K-quant products as opaque operators (and the numpy embedding
    lookup outside the graph): greedy tokens equal the eager ones."""
    from lmarch.generation import GenerationStats, SamplingConfig
    from lmarch.tasks.generate import generate_text, prepare_for_decoding

    answers = []
    for compile in (False, True):
        loaded = load(str(files["q4_k_m"]))
        prepare_for_decoding(loaded, compile=compile)
        stats = GenerationStats()
        greedy = SamplingConfig(temperature=0.0)
        for _ in generate_text(loaded, "abc ab", 8, greedy, ignore_eos=True, stats=stats):
            pass
        answers.append(stats.token_ids)
    assert len(answers[0]) == 8 and answers[0] == answers[1]
