"""LoRA adapters cross between lmarch and ``peft`` (0.21.2) in PEFT's on-disk format, both ways,
on tiny random GPT-2 and LLaMA models: the same logits within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.peft import add_lora, load_adapter, lora_layers, save_adapter
from lmarch.weights.hf_gpt2 import load_hf_gpt2, save_hf_gpt2
from lmarch.weights.hf_llama import load_hf_llama, save_hf_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# peft 0.21.2 calls a transformers method that transformers now marks deprecated: not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

TOL = 1e-4
GPT_CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA_CFG = LlamaConfig(
    vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48
)


def _ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))


def _randomise_b(model: torch.nn.Module) -> None:
    """B starts at zero (a no-op adapter); give it values so the test sees the adapter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _base(family: str, folder) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT(GPT_CFG).eval()
        save_hf_gpt2(model, folder)
    else:
        model = Llama(LLAMA_CFG).eval()
        save_hf_llama(model, folder)
    return model


CASES = {
    # family: (lmarch pattern, expected HF modules per layer, PEFT target_modules)
    "gpt2": (
        r"blocks\.\d+\.(attn\.(qkv|out)|ffn\.(fc_in|fc_out))",
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        ["c_attn", "c_proj", "c_fc"],
    ),
    "llama": (
        r"blocks\.\d+\.(attn\.(qkv|out)|ffn\.(gate_up|down))",
        [
            "mlp.down_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        ],
        ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lmarch_adapter_loads_in_peft(tmp_path, family, rslora):  # type: ignore[no-untyped-def]
    pattern, hf_modules, _ = CASES[family]
    model = _base(family, tmp_path / "base")
    add_lora(model, pattern, rank=4, alpha=8, rslora=rslora)
    _randomise_b(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    assert config["target_modules"] == sorted(
        f"{prefix}.{i}.{m}" for i in range(2) for m in hf_modules
    )
    assert config["fan_in_fan_out"] is (family == "gpt2")

    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(auto, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
        got = theirs(ids).logits

    assert (got - want).abs().max().item() <= TOL
    # the adapter changes the logits: the comparison above is not between two base models
    with torch.no_grad(), theirs.disable_adapter():
        plain = theirs(ids).logits
    assert (plain - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_adapter_loads_in_lmarch(tmp_path, family):  # type: ignore[no-untyped-def]
    _, _, targets = CASES[family]
    _base(family, tmp_path / "base")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=targets,
        fan_in_fan_out=family == "gpt2",
        use_rslora=True,
    )
    theirs = peft.get_peft_model(auto, lora).eval()
    _randomise_b(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = (load_hf_gpt2 if family == "gpt2" else load_hf_llama)(tmp_path / "base").eval()
    names = load_adapter(ours, tmp_path / "adapter")
    # LLaMA: q_proj + v_proj -> attn.qkv, gate_proj + up_proj -> ffn.gate_up (block adapters)
    assert len(names) == 8
    if family == "llama":
        assert ours.blocks[0].attn.qkv.lora_A.shape == (8, 32)  # q's and v's A stacked
        # rank 8 with PEFT's scale for r = 4: not one PEFT rank, so not written back
        with pytest.raises(LmarchError, match="cannot be written with one PEFT rank"):
            save_adapter(ours, tmp_path / "back")
    assert all(layer.scaling == 12 / 2.0 for layer in lora_layers(ours).values())
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL


def test_fused_llama_adapter_round_trips_at_its_rank(tmp_path):  # type: ignore[no-untyped-def]
    model = _base("llama", tmp_path / "base")
    add_lora(model, r"blocks\.\d+\.(attn\.qkv|ffn\.gate_up)", rank=3, alpha=5)
    _randomise_b(model)
    save_adapter(model, tmp_path / "a")
    again = load_hf_llama(tmp_path / "base").eval()
    load_adapter(again, tmp_path / "a")
    # the parts share A, so the fused layer is rank 3 again, not 3 x 3
    for name, layer in lora_layers(again).items():
        original = lora_layers(model)[name]
        assert torch.equal(layer.lora_A, original.lora_A)
        assert torch.equal(layer.lora_B, original.lora_B)
        assert layer.scaling == original.scaling
    ids = _ids()
    with torch.no_grad():
        assert (again(ids) - model(ids)).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("bias", "all"),
        ("modules_to_save", ["lm_head"]),
        ("layer_replication", [[0, 1]]),
    ],
)
def test_unsupported_peft_options_are_refused(tmp_path, field, value):  # type: ignore[no-untyped-def]
    model = GPT(GPT_CFG)
    add_lora(model, r"blocks\.0\.attn\.qkv", rank=2)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(LmarchError, match=f"option {field}=.* is not supported"):
        load_adapter(GPT(GPT_CFG), tmp_path / "a")


def test_adapter_for_another_base_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    model = GPT(GPT_CFG)
    add_lora(model, r"blocks\.0\.attn\.qkv", rank=2)
    save_adapter(model, tmp_path / "a")
    wider = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=64))
    with pytest.raises(LmarchError, match="an adapter for another base model"):
        load_adapter(wider, tmp_path / "a")
    assert lora_layers(wider) == {}  # nothing half-loaded
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(LmarchError, match=r"has rank 2, the config says r=4"):
        load_adapter(GPT(GPT_CFG), tmp_path / "a")
