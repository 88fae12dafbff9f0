"""``lmarch.load``: one loader for presets, GGUF files, HF folders and run folders; run folders
load the model their objective trained; commands refuse models they cannot use in one line;
``quant="auto"`` is the native Q4 path on a Q4 GGUF and float32 (with one notice) without the
native kernels; ``weights/`` imports neither ``quant`` nor ``native``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmarch
from lmarch.cli.main import main
from lmarch.errors import LmarchError
from lmarch.loading import ChatConvention, LoadedModel, Pooling, load
from lmarch.models.bert import (
    BertForMaskedLM,
    BertForPooledClassification,
    ElectraForPreTraining,
)
from lmarch.models.heads import encoder_of
from lmarch.train.objectives import objective_model
from lmarch.weights.checkpoint import find_checkpoint, read_json
from lmarch.weights.safetensors_io import load_into_model, load_tensors

ROOT = Path(__file__).resolve().parents[1]
# two steps of a tiny model: a real run folder in about a second
TINY_RUN = {
    "max_iters": 2, "lr_decay_iters": 2, "eval_interval": 2, "eval_iters": 1,
    "batch_size": 4, "block_size": 32, "warmup_iters": 0, "log_interval": 1,
}  # fmt: skip


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text) -> dict[str, Path]:
    """A clm (gpt-char-tiny), an mlm and an rtd (bert-tiny) run folder, two steps each."""
    from lmarch.train.run import train_run

    root = tmp_path_factory.mktemp("runs")
    text = root / "text.txt"
    text.write_text(shakespeare_text[:30_000], encoding="utf-8")
    out = {}
    for name, preset, objective in [
        ("clm", "gpt-char-tiny", None),
        ("mlm", "bert-tiny", "mlm"),
        ("rtd", "bert-tiny", "rtd"),
    ]:
        out[name] = root / name
        train_run(
            preset, str(text), out[name], dict(TINY_RUN), callbacks=[], log=lambda *_: None,
            objective=objective,
        )  # fmt: skip
    return out


def test_import_lmarch_stays_light() -> None:
    """``lmarch.load`` is there, but ``import lmarch`` alone does not import torch."""
    light = "import sys, lmarch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert lmarch.load is load and lmarch.LoadedModel is LoadedModel


def _lmarch_imports(package: str) -> list[tuple[str, str]]:
    """(file, imported lmarch subpackage) for every import of an lmarch subpackage, at any
    depth (imports inside functions too), in the files under lmarch/<package>."""
    found = []
    for path in sorted((ROOT / "lmarch" / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module == "lmarch":  # from lmarch import native
                    names = [f"lmarch.{a.name}" for a in node.names]
            found += [(path.name, n.split(".")[1]) for n in names if n.startswith("lmarch.")]
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("weights", {"quant", "native", "loading"}),  # weights/ only reads and writes files
        ("quant", {"loading"}),
        ("native", {"loading"}),
        ("models", {"loading", "weights", "quant", "native"}),
    ],
)
def test_layers_import_downwards_only(package: str, forbidden: set[str]) -> None:
    offenders = [(f, sub) for f, sub in _lmarch_imports(package) if sub in forbidden]
    assert offenders == []


def test_smollm2_preset_is_typed() -> None:
    """The preset's chat convention comes from the GGUF metadata, in typed fields."""
    loaded = load("smollm2-135m", quant="none", context=256)
    assert (loaded.name, loaded.family, loaded.objective, loaded.quant) == (
        "smollm2-135m", "llama", "causal-lm", "none"
    )  # fmt: skip
    assert loaded.chat.stop_token_ids == (2,) and loaded.chat.bos_token_id == 1
    assert loaded.chat.add_bos is False and "<|im_start|>" in loaded.chat.template
    assert isinstance(loaded.chat, ChatConvention) and loaded.pooling is None
    assert loaded.labels is None and loaded.load_s > 0
    assert not hasattr(loaded, "extra")


def test_default_generate_is_q4_and_greedy_equals_float32(capsys) -> None:
    """No flags: the SmolLM2 GGUF runs on its own Q4 blocks (``quant`` "q4" in --json) and
    its greedy tokens equal ``--quant none``'s (float32)."""
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    answers = {}
    for flags in ([], ["--quant", "none"]):
        code, out, err = run_cli(
            capsys, "generate", "smollm2-135m", prompt, "--max-new-tokens", "12",
            "--ignore-eos", "--json", *flags,
        )  # fmt: skip
        assert code == 0 and "notice" not in err, err
        summary = json.loads(out.strip().splitlines()[-1])
        answers[summary["quant"]] = summary["token_ids"]
    assert sorted(answers) == ["none", "q4"]
    assert len(answers["none"]) == 12 and answers["q4"] == answers["none"]


def test_auto_without_native_kernels_falls_back_with_one_notice() -> None:
    """LMARCH_NATIVE=0: the default loads float32 and says so in exactly one stderr line."""
    env = {**os.environ, "LMARCH_NATIVE": "0"}
    argv = ["generate", "smollm2-135m", "Hello", "--max-new-tokens", "2", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "lmarch", *argv], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["quant"] == "none"
    notices = [line for line in done.stderr.splitlines() if "notice" in line]
    assert len(notices) == 1 and "native kernels unavailable" in notices[0], done.stderr
    assert "Traceback" not in done.stderr and "warn" not in done.stderr.lower()


def test_explicit_quant_none_and_non_gguf_auto_are_float(runs) -> None:
    assert load(runs["clm"]).quant == "none"  # auto on a run folder: float
    loaded = load(runs["clm"], dtype=torch.float64)
    assert loaded.quant == "none" and next(loaded.model.parameters()).dtype == torch.float64
    with pytest.raises(LmarchError, match="unknown quantisation 'int3'"):
        load(runs["clm"], quant="int3")
    with pytest.raises(
        LmarchError, match="dtype torch.bfloat16 is for float models, not quant 'int8'"
    ):
        load(runs["clm"], quant="int8", dtype=torch.bfloat16)


def _checkpoint_model(run: Path) -> torch.nn.Module:
    """The run's training module rebuilt and filled by hand (the oracle for ``load``)."""
    from lmarch.models.registry import config_from_dict

    config = read_json(run / "config.json")
    model = objective_model(config["objective"], config_from_dict(config["model"]))
    tensors = load_tensors(find_checkpoint(run) / "model.safetensors")
    load_into_model(model, tensors, source=str(run))
    return model.eval()


def test_mlm_run_loads_its_masked_lm(runs) -> None:
    """An mlm run is the masked LM it trained, head included: its logits equal the
    checkpoint's module exactly."""
    loaded = load(runs["mlm"])
    assert isinstance(loaded.model, BertForMaskedLM)
    assert (loaded.family, loaded.objective) == ("bert", "masked-lm")
    assert loaded.pooling == Pooling("mean")
    ids = torch.tensor([loaded.tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), _checkpoint_model(runs["mlm"])(ids))


def test_the_plain_run_reader_refuses_other_objectives(runs) -> None:
    """weights.checkpoint.load_run builds next-token models only; it names lmarch.load."""
    from lmarch.weights.checkpoint import load_run

    with pytest.raises(LmarchError, match=r"is a mlm run; .*hint: load it with lmarch.load"):
        load_run(runs["mlm"])
    model, _, config = load_run(runs["clm"])
    assert config["objective"] == "clm" and type(model).__name__ == "GPT"


def test_rtd_run_loads_its_discriminator(runs) -> None:
    """An rtd run is ELECTRA's discriminator (the generator trained beside it is dropped):
    replaced-token logits equal the checkpoint's discriminator's."""
    loaded = load(runs["rtd"])
    assert isinstance(loaded.model, ElectraForPreTraining)
    assert loaded.objective == "replaced-token-detection"
    reference = _checkpoint_model(runs["rtd"]).discriminator
    ids = torch.tensor([loaded.tokenizer.encode("Now is the winter of our discontent")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), reference(ids))
    assert encoder_of(loaded.model) is loaded.model.bert


def test_classifier_run_loads_with_its_labels(runs, tmp_path) -> None:
    """A classify-train folder loads as the pooled classifier with its labels and the input
    length it was trained with."""
    from lmarch.data.classification import ClassificationData, Example
    from lmarch.tasks.classify import ClassifyConfig, train_classifier

    rows = [Example(f"{w} {w} {w}", lab) for w, lab in [("sword", "war"), ("kiss", "love")] * 8]
    data = ClassificationData("toy", rows, rows[:4])
    train_classifier(
        str(runs["mlm"]), data, tmp_path / "clf", ClassifyConfig(epochs=1, batch_size=8),
        baseline=False, callbacks=[], log=lambda *_: None,
    )  # fmt: skip
    loaded = load(tmp_path / "clf")
    assert isinstance(loaded.model, BertForPooledClassification)
    assert loaded.objective == "classifier" and loaded.labels == ("love", "war")
    assert loaded.pooling == Pooling("mean", False, 32)  # the encoder's 32 positions cap 128


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "{mlm}", "hi"], "{mlm} holds a masked-LM (bert); generate needs a causal LM"),
        (["sample", "{rtd}"], "holds a replaced-token detector (bert); sample needs a causal LM"),
        (["eval", "{mlm}"], "holds a masked-LM (bert); eval needs a causal LM"),
        (["chat", "{mlm}"], "chat needs a causal LM"),
        (
            ["embed", "{clm}", "{text}", "--out", "{tmp}/v.npy"],
            "holds a causal LM (gpt); embed needs a BERT-family encoder",
        ),
        (["search", "{clm}", "q", "--index", "{text}"], "search needs a BERT-family encoder"),
        (["classify", "predict", "{mlm}", "text"], "classify predict needs a classifier run"),
        (
            ["classify", "train", "--model", "{clm}", "--data", "{text}", "--out", "{tmp}/c"],
            "classify train needs a BERT-family encoder",
        ),
    ],
)
def test_commands_refuse_models_they_cannot_use(runs, argv, needle, tmp_path, capsys) -> None:
    text = tmp_path / "lines.jsonl"
    rows = [{"text": f"word {i}", "label": "xy"[i % 2]} for i in range(20)]
    text.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fill = {k: str(v) for k, v in runs.items()} | {"text": str(text), "tmp": str(tmp_path)}
    code, _, err = run_cli(capsys, *[a.format(**fill) for a in argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert needle.format(**fill) in lines[0]


def test_tokenizer_larger_than_the_vocabulary_is_one_clear_error(tmp_path, shakespeare_text):
    """An HF folder whose tokenizer.json has 400 ids for a 300-row embedding table."""
    from lmarch.models import GPT, GPTConfig
    from lmarch.tokenizers import ByteLevelBPETokenizer
    from lmarch.weights.hf_gpt2 import save_hf_gpt2

    tok = ByteLevelBPETokenizer.train(shakespeare_text[:20_000], vocab_size=400)
    tok.to_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    save_hf_gpt2(
        GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=8)), tmp_path
    )
    with pytest.raises(
        LmarchError, match="the tokenizer has 400 ids but the model's vocabulary holds only 300"
    ):
        load(tmp_path)


# --------------------------------------------------------------- a small Q8_0 / F32 GGUF llama


def _tiny_llama_gguf(path: Path, layer_type: str) -> Path:
    """A 2-layer LLaMA GGUF (width 64, 2 query / 1 KV heads, SwiGLU 128, tied embeddings) with
    random weights, its layers stored as ``layer_type`` ("Q8_0" or "F32"), the embedding table
    as Q8_0, and a 260-token byte-level BPE vocabulary in its metadata."""
    import gguf
    from gguf.quants import quantize

    from lmarch.tokenizers.bpe import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["ab", "abc", "<s>", "</s>"]
    w = gguf.GGUFWriter(path, "llama")
    for key, value in [
        ("block_count", 2), ("context_length", 128), ("embedding_length", 64),
        ("feed_forward_length", 128), ("attention.head_count", 2),
        ("attention.head_count_kv", 1),
    ]:  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [1] * 258 + [3, 3])
    w.add_array("tokenizer.ggml.merges", ["a b", "ab c"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 258)
    w.add_uint32("tokenizer.ggml.eos_token_id", 259)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], kind: str) -> None:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if kind == "F32":
            w.add_tensor(name, data)
        else:
            q = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(name, quantize(data, q), raw_dtype=q)

    add("token_embd.weight", (260, 64), "Q8_0")
    add("output_norm.weight", (64,), "F32")
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (64,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (64,), "F32")
        for name, shape in [
            ("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)),
            ("attn_output", (64, 64)), ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)),
            ("ffn_down", (64, 128)),
        ]:  # fmt: skip
            add(f"blk.{i}.{name}.weight", shape, layer_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_auto_takes_a_q8_0_file_as_stored(tmp_path) -> None:
    """A GGUF whose layers are Q8_0 runs on those blocks by default (quant "q8"): every
    projection holds the file's weights exactly (the float loader's dequantised ones), and
    greedy tokens equal the float32 model's. Layers stored in float: auto is float."""
    from lmarch.generation import GenerationStats, SamplingConfig
    from lmarch.loading.speed import gguf_native_scheme
    from lmarch.quant.blockq import BlockQ8Linear
    from lmarch.quant.gguf import load_gguf_llama_blocks
    from lmarch.tasks.generate import generate_text

    q8 = _tiny_llama_gguf(tmp_path / "q8.gguf", "Q8_0")
    f32 = _tiny_llama_gguf(tmp_path / "f32.gguf", "F32")
    assert gguf_native_scheme(q8) == "q8" and gguf_native_scheme(f32) is None
    assert load(f32).quant == "none"
    fast, exact = load(q8), load(q8, quant="none")
    assert fast.quant == "q8" and exact.quant == "none"
    blocks, _ = load_gguf_llama_blocks(q8, scheme="q8")
    for name in ["blocks.0.attn.qkv", "blocks.1.ffn.gate_up", "blocks.1.ffn.down", "lm_head"]:
        layer = blocks.get_submodule(name)
        assert isinstance(layer, BlockQ8Linear)
        assert torch.equal(layer.dequantized_weight(), exact.model.get_submodule(name).weight)
    answers = []
    for loaded in (fast, exact):
        stats = GenerationStats()
        greedy = SamplingConfig(temperature=0.0)
        for _ in generate_text(loaded, "abc ab", 16, greedy, ignore_eos=True, stats=stats):
            pass
        answers.append(stats.token_ids)
    assert len(answers[0]) == 16 and answers[0] == answers[1]


def test_a_run_whose_tokenizer_outgrew_its_model_is_one_line(runs, tmp_path, capsys) -> None:
    """A run folder whose tokenizer.json was replaced by a larger one: `lmarch sample` says
    both sizes in one line (exit 2) instead of an index error inside the embedding."""
    import shutil

    from lmarch.tokenizers.char import CharTokenizer

    run = tmp_path / "run"
    shutil.copytree(runs["clm"], run)
    rows = load(runs["clm"]).model.config.vocab_size
    CharTokenizer([chr(0x4E00 + i) for i in range(rows + 5)]).save(run / "tokenizer.json")
    code, _, err = run_cli(capsys, "sample", str(run), "--max-new-tokens", "2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"the tokenizer has {rows + 5} ids but the model's vocabulary holds only {rows}" in err
