"""``lmarch quantize``: every method writes a run folder that ``lmarch.load`` rebuilds into the
very model quantising in memory gives (logits and state dict equal, not close), that the
commands take (generate's greedy continuation equals the in-memory model's, eval scores it), and
whose weights file shrinks as the method's bits say. Bad input is one line, exit 2."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import lmarch
from lmarch.generation import SamplingConfig
from lmarch.loading import LoadedModel
from lmarch.native import accelerate
from lmarch.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear, NF4Linear
from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear
from lmarch.tasks.generate import generate_text
from lmarch.tasks.quantize import METHODS, quantize_model
from lmarch.tokenizers.char import CharTokenizer

LAYER_TYPE = {
    "int8": Int8WeightOnlyLinear,
    "int4": Int4WeightOnlyLinear,
    "nf4": NF4Linear,
    "q8_0": BlockQ8Linear,
    "q4_0": BlockQ4Linear,
}
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """gpt-char-tiny at 2 layers x 64 wide (so int4's kernel takes its 16-multiple layers),
    150 steps on Shakespeare: enough to write words, ~10 s here."""
    from lmarch.cli.main import main

    root = tmp_path_factory.mktemp("quantize")
    data = root / "text.txt"
    data.write_text(shakespeare_text[:100_000], encoding="utf-8")
    argv = [
        "train", "--preset", "gpt-char-tiny", "--data", str(data), "--out", str(root / "run"),
        "--max-iters", "150", "--n-layer", "2", "--n-embd", "64", "--n-head", "4",
        "--block-size", "64", "--eval-interval", "150", "--eval-iters", "2",
        "--set", "learning_rate=3e-3",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return root / "run"


@pytest.fixture(scope="module")
def folders(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each method's folder, written through the library entry point the CLI calls."""
    from lmarch.tasks.quantize import quantize_to_folder

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for method in METHODS:
        summary = quantize_to_folder(trained_run, method, root / method)
        # 2 blocks x (qkv, out, fc_in, fc_out), plus the head except for nf4
        assert summary["layers"] == (8 if method == "nf4" else 9)
        out[method] = root / method
    return out


def in_memory(run: Path, method: str) -> LoadedModel:
    """The float run quantised in memory, made ready for decoding as lmarch.load does."""
    loaded = lmarch.load(run, quant="none")
    quantize_model(loaded.model, method)
    if method in ("q8_0", "q4_0"):
        accelerate(loaded.model, training=False)
    loaded.quant = method
    return loaded


def ids(n: int = 40) -> torch.Tensor:
    return torch.randint(0, 59, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
def test_reload_equals_quantising_in_memory(trained_run, folders, method):  # type: ignore[no-untyped-def]
    loaded = lmarch.load(folders[method])
    assert loaded.quant == method
    kinds = [type(m) for m in loaded.model.modules()]
    assert kinds.count(LAYER_TYPE[method]) == (8 if method == "nf4" else 9)
    if method == "nf4":
        assert type(loaded.model.lm_head) is nn.Linear  # the head stays float, as in QLoRA
    reference = in_memory(trained_run, method)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids()), reference.model(ids()))
    got, want = loaded.model.state_dict(), reference.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and not the float model: the weights did change
    with torch.no_grad():
        float_logits = lmarch.load(trained_run, quant="none").model(ids())
        assert not torch.equal(loaded.model(ids()), float_logits)


@pytest.mark.parametrize("method", METHODS)
def test_generate_takes_the_folder(cli, trained_run, folders, method):  # type: ignore[no-untyped-def]
    summary = cli.json("generate", folders[method], PROMPT, "--max-new-tokens", "24")
    reference = in_memory(trained_run, method)
    want = "".join(generate_text(reference, PROMPT, 24, SamplingConfig(temperature=0.0)))
    assert summary["text"] == want and summary["quant"] == method
    assert len(summary["token_ids"]) == 24
    # greedy by hand (whole prefix each step, no cache) gives the same tokens
    tok = CharTokenizer.load(folders[method] / "tokenizer.json")
    seq = tok.encode(PROMPT)
    with torch.no_grad():
        for _ in range(24):
            seq.append(int(reference.model(torch.tensor([seq]))[0, -1].argmax()))
    assert summary["token_ids"] == seq[len(PROMPT) :]


def test_the_continuations(cli, folders):  # type: ignore[no-untyped-def]
    """The actual text, for the record: 8-bit methods keep the float model's continuation."""
    texts = {
        m: cli.json("generate", folders[m], PROMPT, "--max-new-tokens", "16")["text"]
        for m in METHODS
    }
    assert texts["int8"] == texts["q8_0"]
    assert all(len(t) == 16 for t in texts.values())


def test_file_sizes_follow_the_bits(trained_run, folders):  # type: ignore[no-untyped-def]
    size = {m: (f / "checkpoint" / "model.safetensors").stat().st_size for m, f in folders.items()}
    float_size = (trained_run / "checkpoint" / "model.safetensors").stat().st_size
    # the float embedding table (59 x 64) and norms are in every file
    assert float_size > max(size["int8"], size["q8_0"])
    assert min(size["int8"], size["q8_0"]) > max(size["int4"], size["q4_0"], size["nf4"])
    assert size["nf4"] < size["int4"]  # nf4 also keeps the tied head as the embedding itself


def test_eval_and_sample_take_the_folder(cli, trained_run, folders):  # type: ignore[no-untyped-def]
    data = trained_run.parent / "text.txt"
    text = cli.json("eval", trained_run, "--data", data)
    for method in ("int8", "q4_0"):
        quantised = cli.json("eval", folders[method], "--data", data)
        # same validation text (the default 0.1 split): 8 bits within 1%, 4 bits within 10%
        bound = 0.01 if method == "int8" else 0.10
        assert abs(quantised["perplexity"] / text["perplexity"] - 1) < bound, (method, quantised)
    code, out, _ = cli("sample", folders["nf4"], "--prompt", PROMPT, "--max-new-tokens", "8",
                       "--temperature", "0")  # fmt: skip
    assert code == 0 and out.startswith(PROMPT) and len(out.strip()) >= len(PROMPT) + 1


def test_refusals(cli, trained_run, folders, tmp_path):  # type: ignore[no-untyped-def]
    out = str(tmp_path / "q")
    line = cli.error("quantize", trained_run, "--method", "int3", "--out", out)
    assert "unknown quantisation method 'int3'" in line and "q4_0" in line
    line = cli.error(
        "quantize", trained_run, "--method", "int4", "--group-size", "48", "--out", out
    )
    assert "int4 takes group size 32 or 64 or 128 or 256, got 48" in line
    line = cli.error(
        "quantize", trained_run, "--method", "int8", "--group-size", "32", "--out", out
    )
    assert "int8 has one scale per output row; --group-size does not apply" in line
    # a group size the layers cannot take: 64 inputs do not split into groups of 256
    line = cli.error(
        "quantize", trained_run, "--method", "int4", "--group-size", "256", "--out", out
    )
    assert "cannot quantise 'lm_head' to int4: int4 with group size 256" in line
    assert "in_features=64" in line and "--group-size" in line
    assert not Path(out).exists()  # nothing written
    line = cli.error("quantize", trained_run, "--method", "int8", "--out", folders["int8"])
    assert f"--out {folders['int8']} exists and is not empty" in line and "--force" in line
    line = cli.error("quantize", folders["int8"], "--method", "int4", "--out", out)
    assert "is already stored quantised (int8)" in line
    line = cli.error("generate", folders["int8"], PROMPT, "--quant", "int4")
    assert "is stored quantised as int8; it cannot be loaded as int4" in line

    # a real model without Linear layers: the bigram table (one nn.Embedding)
    bigram, data = tmp_path / "bigram", trained_run.parent / "text.txt"
    code, _, err = cli("train", "--preset", "bigram-char", "--data", data, "--out", bigram,
                       "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1")  # fmt: skip
    assert code == 0, err
    line = cli.error("quantize", bigram, "--method", "q8_0", "--out", out)
    assert line == (
        "lmarch quantize: error: the model has no Linear layers to quantise to q8_0 (hint: "
        "quantize stores weight-only quantised Linear layers; this model has none)"
    )
    assert not Path(out).exists()


def test_force_writes_over_a_folder(cli, trained_run, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    summary = cli.json("quantize", trained_run, "--method", "q4_0", "--out", out, "--force")
    assert summary["method"] == "q4_0" and summary["layers"] == 9
    assert lmarch.load(out).quant == "q4_0" and (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_smollm2_int8_from_its_gguf(cli, tmp_path):  # type: ignore[no-untyped-def]
    """The real SmolLM2 (read from its GGUF, dequantised) to int8: the folder generates what
    quantising in memory does."""
    out = tmp_path / "smollm2-int8"
    summary = cli.json("quantize", "smollm2-135m", "--method", "int8", "--out", out)
    assert summary["layers"] == 30 * 4 + 1  # fused qkv and gate_up, out, down; the head
    prompt = "The capital of France is"
    got = cli.json("generate", out, prompt, "--max-new-tokens", "8")
    reference = lmarch.load("smollm2-135m", quant="none")
    quantize_model(reference.model, "int8")
    want = "".join(generate_text(reference, prompt, 8, SamplingConfig(temperature=0.0)))
    assert got["text"] == want and "Paris" in want
