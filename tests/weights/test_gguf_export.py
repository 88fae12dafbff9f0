"""``export_gguf_llama``: a LLaMA run written as GGUF (f16, q8_0, q4_0 with gguf's writer) reads
back through lmarch bit for bit: every weight is exactly its f16 / quantised value, the logits
equal the run model's with those weights, the vocabulary gives the run's ids; and what GGUF
cannot carry is refused by name."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.loading import load
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.quant.apply import quantize_
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.char import CharTokenizer
from lmarch.weights.gguf import read_gguf
from lmarch.weights.gguf_export import export_gguf_llama

PASSAGE = "ROMEO:\nBut, soft! what light?\n"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """``lmarch train --preset llama-tiny`` (2 layers, context 32, 2 iterations of batch 2) on
    60,000 characters."""
    from lmarch.cli.main import main

    root = tmp_path_factory.mktemp("llama_run")
    data = root / "tiny.txt"
    data.write_text(shakespeare_text[:60_000], encoding="utf-8")
    argv = [
        "train", "--preset", "llama-tiny", "--data", str(data), "--out", str(root / "run"),
        "--max-iters", "2", "--n-layer", "2", "--eval-iters", "1", "--eval-interval", "2",
        "--batch-size", "2", "--block-size", "32",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return root / "run"


def stored_value(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """What a matrix becomes in the file: f16, or gguf's quantise-then-dequantise."""
    if weight.ndim == 1:
        return weight
    if quant == "f16":
        return weight.half().float()
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    values = weight.detach().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype))


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_export_reads_back_bit_for_bit(llama_run: Path, tmp_path: Path, quant: str) -> None:
    run = load(str(llama_run), quant="none")
    path = tmp_path / f"model-{quant}.gguf"
    summary = export_gguf_llama(run.model, run.tokenizer, path, quant)
    matrix_type = quant.upper()
    want_types = (
        {matrix_type: 16, "F32": 5} if quant != "q4_0" else {"Q4_0": 15, "Q8_0": 1, "F32": 5}
    )
    assert summary["tensor_types"] == want_types and summary["bytes"] == path.stat().st_size
    assert read_gguf(path).tensor_info("output.weight").type_name == (
        "Q8_0" if quant == "q4_0" else matrix_type
    )

    back = load(str(path), quant="none")
    expected = Llama(run.model.config).eval()
    state = {}
    for name, weight in run.model.state_dict().items():
        wide = quant == "q4_0" and name == "lm_head.weight"
        state[name] = stored_value(weight, "q8_0" if wide else quant)
        if name in dict(back.model.named_parameters()):
            got = back.model.get_parameter(name)
            assert torch.equal(got, state[name]), name
    expected.load_state_dict(state)
    ids = torch.tensor([run.tokenizer.encode(PASSAGE)])
    assert back.tokenizer.encode(PASSAGE) == ids[0].tolist()
    assert back.tokenizer.decode(ids[0].tolist()) == PASSAGE
    with torch.no_grad():
        ours, theirs = back.model(ids), expected(ids)
    ours = ours[0] if isinstance(ours, tuple) else ours
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert torch.equal(ours, theirs)


def test_a_q4_0_export_runs_on_the_native_blocks_like_float(llama_run: Path, tmp_path) -> None:
    """The q4_0 file (q8_0 head) loads by default on lmarch's block kernels, with the same
    greedy tokens as its float32 reading."""
    from lmarch.generation import GenerationStats, SamplingConfig
    from lmarch.tasks.generate import generate_text

    run = load(str(llama_run), quant="none")
    path = tmp_path / "q4.gguf"
    export_gguf_llama(run.model, run.tokenizer, path, "q4_0")
    fast, exact = load(str(path)), load(str(path), quant="none")
    assert fast.quant == "q4"
    answers = []
    for loaded in (fast, exact):
        stats = GenerationStats()
        greedy = SamplingConfig(temperature=0.0)
        for _ in generate_text(loaded, "ROMEO:", 12, greedy, ignore_eos=True, stats=stats):
            pass
        answers.append(stats.token_ids)
    assert len(answers[0]) == 12 and answers[0] == answers[1]


def _tiny(**changes: object) -> Llama:
    config = LlamaConfig(
        **{"vocab_size": 4, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 64,
           "intermediate_size": 64, **changes},
    )  # fmt: skip
    return Llama(config).eval()


def test_what_gguf_cannot_carry_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tok = CharTokenizer(["a", "b", "c", " "])
    with pytest.raises(LmarchError, match="cannot carry this model's qk_norm=True"):
        export_gguf_llama(_tiny(qk_norm=True), tok, path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    with pytest.raises(LmarchError, match="holds 'é', which is more than one byte"):
        export_gguf_llama(_tiny(), CharTokenizer(["a", "b", "é", " "]), path)
    with pytest.raises(LmarchError, match="the tokenizer has 3 tokens but the model 4"):
        export_gguf_llama(_tiny(), CharTokenizer(["a", "b", "c"]), path)
    with pytest.raises(LmarchError, match="unknown GGUF quantisation 'q5_k'"):
        export_gguf_llama(_tiny(), tok, path, "q5_k")
    quantised = _tiny()
    quantize_(quantised, "int8")
    with pytest.raises(LmarchError, match="weights are not a plain LLaMA's"):
        export_gguf_llama(quantised, tok, path)
    with pytest.raises(LmarchError, match="Linear has no GGUF export"):
        export_gguf_llama(torch.nn.Linear(2, 2), tok, path)  # type: ignore[arg-type]
    export_gguf_llama(_tiny(tie_embeddings=True), tok, path, "q8_0")
    f = read_gguf(path)
    assert "output.weight" not in f and f.tensor_info("token_embd.weight").type_name == "Q8_0"
    assert np.asarray(f.metadata["tokenizer.ggml.merges"]).size == 0
    shutil.rmtree(tmp_path)


def test_lmarch_export_format_gguf(llama_run: Path, tiny_run: Path, tmp_path: Path, cli) -> None:
    """The command writes the file (its summary counts the tensors of each type, and lmarch
    reads back what it says); a run of another family, and --quant with --format hf, are one
    line each (exit 2)."""
    out = tmp_path / "run.gguf"
    summary = cli.json("export", llama_run, "--format", "gguf", "--quant", "q8_0", "--out", out)
    assert summary["out"] == str(out) and summary["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert summary["model_type"] == "gguf (q8_0)"
    f = read_gguf(out)
    assert f.metadata["general.name"] == load(str(llama_run)).name
    assert {f.tensor_info(n).type_name for n in f.tensor_names} == {"Q8_0", "F32"}
    line = cli.error("export", tiny_run, "--format", "gguf", "--out", tmp_path / "gpt.gguf")
    assert "GPT has no GGUF export (LLaMA family only)" in line
    line = cli.error("export", llama_run, "--format", "hf", "--quant", "q4_0", "--out", tmp_path)
    assert "--quant applies to --format gguf, not hf" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.gguf"]


def _llama_cpp_model(path: Path, n_ctx: int = 64):  # type: ignore[no-untyped-def]
    llama_cpp = pytest.importorskip("llama_cpp")  # installed by `make bench`
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=1, verbose=False, logits_all=True
    )


def test_llama_cpp_reads_the_export_as_lmarch_does(llama_run: Path, tmp_path: Path) -> None:
    """llama.cpp (llama-cpp-python) loads the f16 file, spells the passage with the run's
    ids, and its logits over it are lmarch's to 2e-3 (it multiplies in f16; measured 4e-4)."""
    run = load(str(llama_run), quant="none")
    path = tmp_path / "f16.gguf"
    export_gguf_llama(run.model, run.tokenizer, path, "f16")
    cpp = _llama_cpp_model(path)
    ids = cpp.tokenize(PASSAGE.encode(), add_bos=False, special=False)
    assert ids == run.tokenizer.encode(PASSAGE)
    cpp.eval(ids)
    theirs = np.asarray(cpp.scores[: len(ids)])
    with torch.no_grad():
        ours = load(str(path), quant="none").model(torch.tensor([ids]))
    ours = (ours[0] if isinstance(ours, tuple) else ours)[0].numpy()
    assert np.abs(theirs - ours).max() <= 2e-3


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_lmarchs(tmp_path: Path, shakespeare_text: str, cli) -> None:
    """A llama-tiny run trained 100 steps (loss ~2.5), exported as f16, q8_0 and q4_0: 24
    greedy tokens from llama.cpp equal lmarch's on the same file (float32 for f16, lmarch's
    native Q8_0 / Q4 kernels for the others)."""
    from lmarch.generation import GenerationStats, SamplingConfig
    from lmarch.tasks.generate import generate_text

    data = tmp_path / "tiny.txt"
    data.write_text(shakespeare_text[:60_000], encoding="utf-8")
    cli.json(
        "train", "--preset", "llama-tiny", "--data", data, "--out", tmp_path / "run",
        "--max-iters", "100", "--n-layer", "2", "--batch-size", "4", "--block-size", "32",
        "--warmup-iters", "10", "--learning-rate", "3e-3", "--eval-iters", "1",
    )  # fmt: skip
    for quant, lmarch_quant in (("f16", "none"), ("q8_0", "q8"), ("q4_0", "q4")):
        path = tmp_path / f"{quant}.gguf"
        cli.json("export", tmp_path / "run", "--format", "gguf", "--quant", quant, "--out", path)
        cpp = _llama_cpp_model(path, n_ctx=32)
        cpp.eval(cpp.tokenize(b"ROMEO:\n", add_bos=False, special=False))
        theirs = []
        for _ in range(24):
            theirs.append(int(np.argmax(cpp.scores[cpp.n_tokens - 1])))
            cpp.eval([theirs[-1]])
        loaded = load(str(path))
        assert loaded.quant == lmarch_quant
        stats = GenerationStats()
        greedy = SamplingConfig(temperature=0.0)
        for _ in generate_text(loaded, "ROMEO:\n", 24, greedy, ignore_eos=True, stats=stats):
            pass
        assert stats.token_ids == theirs, quant


def test_a_byte_level_bpe_vocabulary_round_trips(tmp_path: Path, shakespeare_text: str) -> None:
    """A Llama with a byte-level BPE tokenizer trained on Shakespeare: the file's vocabulary
    (merges, the special token as a control token, GPT-2's split named "mpt") gives lmarch's
    ids for a passage it was not trained on, in lmarch and in llama.cpp (where installed)."""
    tok = ByteLevelBPETokenizer.train(shakespeare_text[:20_000], vocab_size=320)
    path = tmp_path / "bpe.gguf"
    export_gguf_llama(_tiny(vocab_size=320), tok, path, "q8_0")
    meta = read_gguf(path).metadata
    assert meta["tokenizer.ggml.pre"] == "mpt"
    assert meta["tokenizer.ggml.token_type"][319] == 3 and len(meta["tokenizer.ggml.merges"]) == 63
    text = shakespeare_text[150_000:150_400] + "<|endoftext|>"
    want = tok.encode(text)
    assert load(str(path)).tokenizer.encode(text) == want
    if importlib.util.find_spec("llama_cpp") is not None:
        cpp = _llama_cpp_model(path)
        assert cpp.tokenize(text.encode(), add_bos=False, special=True) == want
