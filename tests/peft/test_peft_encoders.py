"""PEFT adapters on the BERT family (BERT, RoBERTa, ALBERT with its shared block, ELECTRA), both
ways against ``peft`` 0.21.2 on random ``transformers`` models; and per-layer ranks and alphas
(PEFT's ``rank_pattern`` / ``alpha_pattern``) on GPT-2 and LLaMA. Outputs agree within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.peft import add_lora, load_adapter, lora_layers, save_adapter
from lmarch.weights.hf_bert import build_task_model, config_from_hf, load_hf_bert, save_hf_bert
from lmarch.weights.hf_gpt2 import save_hf_gpt2
from lmarch.weights.hf_llama import load_hf_llama, save_hf_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

TOL = 1e-4
SMALL = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip
# (transformers config, its class, our task, our LoRA targets, PEFT's target_modules)
ENCODERS = {
    "bert": (
        transformers.BertConfig(**SMALL), "BertModel", "base",
        r"blocks\.\d+\.(attn\.(qkv|out)|ffn\.fc_in)", ["query", "value", "dense"],
    ),
    "roberta": (
        transformers.RobertaConfig(**{**SMALL, "max_position_embeddings": 42, "pad_token_id": 1}),
        "RobertaForMaskedLM", "masked_lm",
        r"bert\.blocks\.\d+\.(attn\.qkv|ffn\.fc_out)", ["key", "output.dense"],
    ),
    "albert": (  # three layers over one shared block: one adapter serves all three
        transformers.AlbertConfig(**{**SMALL, "embedding_size": 16, "num_hidden_layers": 3}),
        "AlbertModel", "base", r"blocks\.0\.(attn\.qkv|ffn\.fc_in)", ["query", "ffn"],
    ),
    "electra": (
        transformers.ElectraConfig(**{**SMALL, "embedding_size": 16}),
        "ElectraForPreTraining", "pretraining",
        r"bert\.blocks\.1\.attn\.(qkv|out)", ["query", "key", "value", "attention.output.dense"],
    ),
}  # fmt: skip


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 99, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomise_b(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _first(out: object) -> torch.Tensor:
    """Our output or transformers': hidden states, or the head's first output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _encoder_pair(kind: str, folder) -> tuple[torch.nn.Module, torch.nn.Module]:  # type: ignore[no-untyped-def]
    hf_config, hf_class, task, _, _ = ENCODERS[kind]
    torch.manual_seed(0)
    ours = build_task_model(config_from_hf(hf_config.to_dict()), task).eval()
    save_hf_bert(ours, folder)
    return ours, getattr(transformers, hf_class).from_pretrained(folder).eval()


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_lmarch_encoder_adapter_loads_in_peft(tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    ours, hf = _encoder_pair(kind, tmp_path / "base")
    add_lora(ours, ENCODERS[kind][3], rank=4, alpha=6)
    _randomise_b(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    batch = _batch()
    with torch.no_grad():
        want = _first(ours(**batch))
        got = _first(theirs(**batch))
        with theirs.disable_adapter():
            plain = _first(theirs(**batch))
    err, effect = (got - want).abs().max().item(), (plain - want).abs().max().item()
    assert err <= TOL
    assert effect > 20 * max(err, 1e-6)  # the adapter is really there


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_peft_encoder_adapter_loads_in_lmarch(tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    _, hf = _encoder_pair(kind, tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=ENCODERS[kind][4])
    theirs = peft.get_peft_model(hf, config).eval()
    _randomise_b(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_hf_bert(tmp_path / "base").eval()
    assert load_adapter(ours, tmp_path / "adapter")
    batch = _batch()
    with torch.no_grad():
        diff = _first(ours(**batch)) - _first(theirs(**batch))
    assert diff.abs().max().item() <= TOL


GPT_CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA_CFG = LlamaConfig(
    vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48
)


def _ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_layer_ranks_and_alphas_cross_to_peft(tmp_path, family) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = (GPT(GPT_CFG) if family == "gpt2" else Llama(LLAMA_CFG)).eval()
    (save_hf_gpt2 if family == "gpt2" else save_hf_llama)(model, tmp_path / "base")
    add_lora(model, r"blocks\.\d+\.attn\.qkv", rank=4, alpha=8)
    add_lora(model, r"blocks\.0\.attn\.out", rank=2, alpha=3)
    add_lora(model, r"blocks\.1\.attn\.out", rank=4, alpha=5)
    _randomise_b(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    out0 = "transformer.h.0.attn.c_proj" if family == "gpt2" else "model.layers.0.self_attn.o_proj"
    out1 = out0.replace(".0.", ".1.")
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {out0: 2}
    assert config["alpha_pattern"] == {out0: 3, out1: 5}
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(auto, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (theirs(_ids()).logits - model(_ids())).abs().max().item() <= TOL


def test_peft_rank_pattern_on_split_parts_folds_each_scale(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    save_hf_llama(Llama(LLAMA_CFG), tmp_path / "base")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"q_proj": 3},
    )  # fmt: skip
    theirs = peft.get_peft_model(auto, config).eval()
    _randomise_b(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_hf_llama(tmp_path / "base").eval()
    load_adapter(ours, tmp_path / "adapter")
    layers = lora_layers(ours)
    assert layers["blocks.0.attn.qkv"].lora_A.shape == (4 + 2, 32)  # q's rank 4 over v's 2
    assert layers["blocks.1.ffn.down"].rank == 6 and layers["blocks.0.ffn.down"].rank == 4
    with torch.no_grad():
        assert (ours(_ids()) - theirs(_ids()).logits).abs().max().item() <= TOL
