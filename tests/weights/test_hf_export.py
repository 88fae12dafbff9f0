"""``lmarch export RUN --format hf --out DIR``: transformers reads the folder as the same model.

Each case exports an lmarch run folder (one ``lmarch train`` wrote, or its layout written here:
random weights, a tokenizer trained on real Shakespeare) through the command line and loads the
result with ``transformers`` alone: ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` give the
logits of lmarch's model of the run (float32, max abs error <= 1e-4) and ``AutoTokenizer``
gives lmarch's token ids for a passage it was not trained on, and decodes them back to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import lmarch
from lmarch.models.bert import BertConfig
from lmarch.models.heads import build_bert_task_model
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.models.registry import config_to_dict
from lmarch.models.rnn import RecurrentLM, RNNConfig
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.char import CharTokenizer
from lmarch.tokenizers.wordpiece import WordPieceTokenizer
from lmarch.weights.model_folder import write_model_folder

torch.set_num_threads(1)  # tiny models: threads cost more than they give


def _run(folder: Path, model: torch.nn.Module, tokenizer, objective: str = "clm") -> Path:
    torch.manual_seed(0)
    with torch.no_grad():  # norm gains and biases start at 1 / 0: perturb every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run_config = {"model": config_to_dict(model.config), "objective": objective}
    return write_model_folder(folder, model.eval(), tokenizer, run_config)


def _passage(text: str) -> str:
    return text[150_000:150_600]  # past the 20,000 characters the tokenizers learnt from


def _same_tokens(out: Path, tokenizer, text: str, specials: bool = False) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf.encode(text, add_special_tokens=specials)
    assert ids == tokenizer.encode(text)
    assert hf.decode(ids) == tokenizer.decode(ids)


def _logits_match(ours: torch.nn.Module, theirs: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        err = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert err <= 1e-4, f"max abs logit error {err}"


def test_a_trained_gpt_run_with_its_character_tokenizer(
    tmp_path: Path, cli, tiny_run: Path, shakespeare_text: str
) -> None:
    """The run ``lmarch train --preset gpt-char-tiny`` wrote (shrunk; see conftest)."""
    summary = cli.json("export", tiny_run, "--format", "hf", "--out", tmp_path / "hf")
    assert summary["model_type"] == "gpt2" and "tokenizer.json" in summary["files"]
    loaded = lmarch.load(str(tiny_run))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = _passage(shakespeare_text)
    ids = torch.tensor([loaded.tokenizer.encode(text)[:32]])
    _logits_match(loaded.model, theirs, ids)
    _same_tokens(tmp_path / "hf", loaded.tokenizer, text)


def test_llama_with_byte_level_bpe(tmp_path: Path, cli, shakespeare_text: str) -> None:
    tokenizer = ByteLevelBPETokenizer.train(shakespeare_text[:20_000], vocab_size=320)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4,
                         n_kv_head=2, n_embd=32, intermediate_size=64, tie_embeddings=True)  # fmt: skip
    run = _run(tmp_path / "run", Llama(config), tokenizer)
    summary = cli.json("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert summary["model_type"] == "llama"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = _passage(shakespeare_text)
    ids = torch.tensor([tokenizer.encode(text)[:60]])
    _logits_match(lmarch.load(str(run)).model, theirs, ids)
    _same_tokens(tmp_path / "hf", tokenizer, text)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == tokenizer.special_tokens["<|endoftext|>"]


def test_bert_masked_lm_with_wordpiece(tmp_path: Path, cli, shakespeare_text: str) -> None:
    lines = [line for line in shakespeare_text[:20_000].splitlines() if line.strip()]
    tokenizer = WordPieceTokenizer.train(lines, vocab_size=400)
    config = BertConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2,
                        n_embd=32, intermediate_size=64)  # fmt: skip
    model = build_bert_task_model(config, "masked_lm")
    run = _run(tmp_path / "run", model, tokenizer, objective="mlm")
    summary = cli.json("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert summary["model_type"] == "bert"
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    text = _passage(shakespeare_text)
    ids = torch.tensor([tokenizer.encode(text)[:60]])
    _logits_match(lmarch.load(str(run)).model, theirs, ids)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf.encode("to be, or not")[0] == tokenizer.cls_id  # [CLS] ... [SEP], as BERT's
    assert hf.mask_token_id == tokenizer.mask_id


def test_a_family_without_a_transformers_class_is_refused(tmp_path: Path, cli) -> None:
    tokenizer = CharTokenizer.from_text("abc ")
    config = RNNConfig(vocab_size=4, block_size=16, n_layer=1, hidden_size=8, n_embd=8)
    run = _run(tmp_path / "run", RecurrentLM(config), tokenizer)
    line = cli.error("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert "a RecurrentLM has no Hugging Face transformers counterpart" in line
    assert not (tmp_path / "hf").exists()


def test_an_unknown_format_is_refused(tmp_path: Path, cli) -> None:
    line = cli.error("export", tmp_path, "--format", "onnx", "--out", tmp_path / "x")
    assert "invalid choice: 'onnx'" in line


@pytest.mark.parametrize("spec", ["no/such/run"])
def test_a_missing_run_is_refused(tmp_path: Path, cli, spec: str) -> None:
    line = cli.error("export", tmp_path / spec, "--format", "hf", "--out", tmp_path / "x")
    assert "no model at" in line


def test_t5_seq2seq_run(tmp_path: Path, cli, shakespeare_text: str) -> None:
    """A sequence-to-sequence run: AutoModelForSeq2SeqLM gives the same teacher-forced logits."""
    from lmarch.models.t5 import T5, T5Config

    tokenizer = ByteLevelBPETokenizer.train(shakespeare_text[:20_000], vocab_size=300)
    config = T5Config(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                      head_dim=16, intermediate_size=64, dropout=0.0)  # fmt: skip
    run = _run(tmp_path / "run", T5(config), tokenizer, objective="seq2seq")
    assert cli.json("export", run, "--format", "hf", "--out", tmp_path / "hf")["model_type"] == "t5"
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    ours = lmarch.load(str(run)).model
    ids = torch.tensor([tokenizer.encode(_passage(shakespeare_text))[:40]])
    target = ids[:, :12]
    with torch.no_grad():
        err = ours(ids, decoder_input_ids=target) - theirs(ids, decoder_input_ids=target).logits
    assert err.abs().max().item() <= 1e-4


def test_a_llama_variant_exports_as_its_family_and_loads_back(
    tmp_path: Path, cli, shakespeare_text: str
) -> None:
    """A LLaMA trained with QK-norm and a sliding window is written as Qwen3 (the layout that
    has both); transformers and lmarch.load read the folder with the run's logits."""
    tokenizer = ByteLevelBPETokenizer.train(shakespeare_text[:20_000], vocab_size=300)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4,
                         n_kv_head=2, n_embd=32, intermediate_size=64, qk_norm=True,
                         sliding_window=8, layer_types=("sliding", "full"))  # fmt: skip
    run = _run(tmp_path / "run", Llama(config), tokenizer)
    assert cli.json("export", run, "--format", "hf", "--out", tmp_path / "hf")["model_type"] == (
        "qwen3"
    )
    ours = lmarch.load(str(run)).model
    ids = torch.tensor([tokenizer.encode(_passage(shakespeare_text))[:40]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _logits_match(ours, theirs, ids)
    again = lmarch.load(str(tmp_path / "hf"))
    assert (again.model.config.qk_norm, again.model.config.layer_types) == (
        True,
        ("sliding", "full"),
    )
    _logits_match(again.model, theirs, ids)
    assert again.tokenizer.encode("to be, or not") == tokenizer.encode("to be, or not")


def test_albert_with_a_unigram_tokenizer(tmp_path: Path, cli, shakespeare_text: str) -> None:
    """ALBERT's preset tokenizer: a SentencePiece-style Unigram with byte fallback becomes the
    library's Unigram model with the same ids, emoji and ligatures included."""
    from lmarch.tokenizers.unigram_train import ALBERT_SPECIAL_PIECES, train_unigram

    tokenizer = train_unigram(
        shakespeare_text[:20_000], 400, byte_fallback=True, special_pieces=ALBERT_SPECIAL_PIECES
    )
    config = BertConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2,
                        n_embd=32, intermediate_size=64, variant="albert", embedding_size=16)  # fmt: skip
    run = _run(tmp_path / "run", build_bert_task_model(config, "masked_lm"), tokenizer, "mlm")
    assert cli.json("export", run, "--format", "hf", "--out", tmp_path / "hf")["model_type"] == (
        "albert"
    )
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    text = _passage(shakespeare_text) + "  caf\u00e9\t\ufb01ne \U0001f642  "
    ids = torch.tensor([tokenizer.encode(text)[:60]])
    _logits_match(lmarch.load(str(run)).model, theirs, ids)
    _same_tokens(tmp_path / "hf", tokenizer, text)


@pytest.mark.slow
def test_smollm2_exports_as_a_chat_model_transformers_runs(tmp_path: Path, cli) -> None:
    """The real SmolLM2 GGUF, dequantised: transformers gives lmarch's logits, the GGUF
    vocabulary's ids, and with the exported chat template answers and stops at <|im_end|>."""
    cli.json("export", "smollm2-135m", "--format", "hf", "--out", tmp_path / "hf")
    loaded = lmarch.load("smollm2-135m", quant="none")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The capital of France is Paris. Shakespeare wrote 'Hamlet' \u2014 caf\u00e9 \U0001f642"
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == loaded.tokenizer.encode(text) and hf.decode(ids) == text
    _logits_match(loaded.model, theirs, torch.tensor([ids]))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = theirs.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = hf.decode(out[0, prompt["input_ids"].shape[1] :])
    assert answer == "The capital of France is Paris.<|im_end|>"
