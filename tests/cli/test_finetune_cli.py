"""`lmarch finetune` and `lmarch merge` from the command line, and the other commands (generate,
chat, eval) on the folders they write; bad input is one line and exit code 2."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import lmarch
from lmarch.generation import SamplingConfig
from lmarch.peft import lora_layers
from lmarch.tasks.chat import ChatSession
from lmarch.tasks.evaluate import evaluate_run
from lmarch.tasks.finetune import finetune
from lmarch.tasks.generate import generate_text
from lmarch.weights.safetensors_io import load_tensors, save_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

# a few LoRA steps on the tiny_run GPT: the plumbing, not the learning (tests/tasks does that)
QUICK = ["--max-iters", "8", "--block-size", "32", "--batch-size", "4", "--eval-iters", "2"]


def quiet(*_: object) -> None:
    """A log function that prints nothing."""


@pytest.fixture
def data(tiny_run: Path) -> Path:
    """The 60,000 characters tiny_run trained on (its character vocabulary covers them)."""
    return tiny_run.parent / "tiny.txt"


def _greedy(spec: Path, prompt: str, n: int) -> str:
    loaded = lmarch.load(str(spec))
    return "".join(generate_text(loaded, prompt, n, SamplingConfig(temperature=0.0)))


def test_finetune_then_generate_eval_and_merge(cli, tiny_run, data, tmp_path) -> None:
    out, merged = tmp_path / "lora", tmp_path / "merged"
    summary = cli.json(
        "finetune", tiny_run, "--data", data, "--out", out, *QUICK,
        "--rank", "2", "--alpha", "4", "--targets", "attn.qkv|ffn.fc_in",
    )  # fmt: skip
    # rank 2 on qkv (32 -> 96) and fc_in (32 -> 128) of the one block
    assert summary["method"] == "lora" and summary["iters"] == 8
    assert summary["trainable_params"] == 2 * ((32 + 96) + (32 + 128)) == 576
    assert summary["trainable_share"] == pytest.approx(576 / summary["total_params"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 4.0
    assert adapter["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]

    # generate: the fine-tuned model's greedy tokens, as the library gives them
    gen = cli.json("generate", out, "ROMEO:", "--max-new-tokens", "12", "--ignore-eos")
    assert gen["text"] == _greedy(out, "ROMEO:", 12) and gen["quant"] == "none"
    # eval: the adapter model's exact held-out loss
    scored = cli.json("eval", out, "--data", data)
    assert scored == evaluate_run(out, str(data))

    assert cli.json("merge", out, "--out", merged)["merged_layers"] == 2
    gen_merged = cli.json("generate", merged, "ROMEO:", "--max-new-tokens", "12", "--ignore-eos")
    assert gen_merged["token_ids"] == gen["token_ids"]
    assert cli.json("eval", merged, "--data", data)["loss"] == pytest.approx(
        scored["loss"], abs=1e-5
    )


def test_resume_from_the_command_line(cli, tiny_run, data, tmp_path) -> None:
    out = tmp_path / "run"
    cli.json("finetune", tiny_run, "--data", data, "--out", out, *QUICK)
    first = load_tensors(out / "adapter_model.safetensors")
    assert "fine-tunes" in cli.error("finetune", "smollm2-135m", "--out", out, "--resume")
    summary = cli.json("finetune", "--out", out, "--resume", "--max-iters", "12")
    assert summary["iters"] == 12
    second = load_tensors(out / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)  # it trained on


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer, 32-wide LLaMA (random weights) with SmolLM2's tokenizer and chat template,
    saved as a run folder: a chat model small enough to fine-tune in a second."""
    from lmarch.loading.saving import save_loaded
    from lmarch.models.llama import Llama, LlamaConfig

    loaded = lmarch.load("smollm2-135m", quant="none")
    torch.manual_seed(0)
    loaded.model = Llama(
        LlamaConfig(
            vocab_size=49152, block_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
            intermediate_size=64, tie_embeddings=True,
        )
    )  # fmt: skip
    return save_loaded(loaded, tmp_path_factory.mktemp("chat_base") / "base")


def test_chat_with_a_finetuned_chat_model(cli, chat_base, tmp_path, monkeypatch) -> None:
    text = tmp_path / "chat.txt"
    text.write_text("hello there, how are you today?\n" * 200, encoding="utf-8")
    out = tmp_path / "lora"
    settings = {"max_iters": 3, "block_size": 16, "batch_size": 2, "eval_iters": 1}
    finetune(str(chat_base), str(text), out, settings, callbacks=[], log=quiet)
    loaded = lmarch.load(str(out))
    assert loaded.chat_template and len(lora_layers(loaded.model)) == 4
    session = ChatSession(loaded, SamplingConfig(temperature=0.0), max_new_tokens=6)
    want = "".join(session.send("hello"))

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    code, stdout, err = cli("chat", out, "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0, err
    assert stdout == want + "\n"


def _finetune_quick(cli, base: Path, data: Path, out: Path) -> Path:
    cli.json("finetune", base, "--data", data, "--out", out, *QUICK)
    return out


def test_bad_input_is_one_line(cli, tiny_run, data, tmp_path) -> None:
    base = ["finetune", tiny_run, "--data", data, "--out", tmp_path / "x"]
    assert "--targets 'nope' matches no Linear layer" in cli.error(*base, "--targets", "nope")
    assert "LoRA rank 64 is larger than layer" in cli.error(*base, "--rank", "64")
    assert "unknown fine-tuning method 'dora'" in cli.error(*base, "--method", "dora")
    assert "unknown setting 'lora_r'" in cli.error(*base, "--set", "lora_r=4")
    assert "nothing to resume" in cli.error("finetune", "--out", tmp_path / "y", "--resume")
    assert "holds no adapter to merge" in cli.error("merge", tiny_run, "--out", tmp_path / "m")
    line = cli.error("finetune", tiny_run, "--data", data, "--out", tiny_run)
    assert "is the model's own folder; it would be overwritten" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()
    # a folder lmarch quantize wrote: fine-tuning starts from float weights
    assert cli("quantize", tiny_run, "--method", "int8", "--out", tmp_path / "q")[0] == 0
    line = cli.error("finetune", tmp_path / "q", "--data", data, "--out", tmp_path / "x")
    assert "is stored quantised (int8); fine-tuning starts from float weights" in line

    # an adapter run whose base changes after training, then disappears
    own_base = tmp_path / "own_base"
    shutil.copytree(tiny_run, own_base)
    out = _finetune_quick(cli, own_base, data, tmp_path / "run")
    assert "loads with quant auto or none" in cli.error("generate", out, "hi", "--quant", "int8")
    weights = own_base / "checkpoint" / "model.safetensors"
    tensors = load_tensors(weights)
    tensors["tok_emb.weight"] = tensors["tok_emb.weight"] * 1.01
    save_tensors(tensors, weights)
    assert "are not the ones the adapter was trained on" in cli.error("generate", out, "hi")
    shutil.rmtree(own_base)
    line = cli.error("eval", out)
    assert "its base model" in line and "cannot be loaded" in line
