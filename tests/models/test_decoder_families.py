"""Qwen2, Qwen3, Mistral, Phi-3, Gemma 2 and Gemma 3 as LLaMA variants: parity with
transformers on random weights.

Each case builds a tiny random ``transformers`` model of the family (norm gains and biases
perturbed so they matter), saves it with ``save_pretrained``, loads the folder with
:func:`load_hf_decoder` and checks: the same logits over a 2 x 24 batch (float32, max abs error
<= 1e-4) and the same 12 greedy tokens after a 7-token prompt as ``generate``. Sliding windows
are 4 keys, so the 19-token sequences run well past them; Gemma 2's soft caps are small enough
(attention and logits 1.0) that tanh bends the values. Writing goes back through
:func:`save_hf_decoder` and ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lmarch.errors import LmarchError
from lmarch.generation import generate
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.weights.hf_decoders import load_hf_decoder, save_hf_decoder
from lmarch.weights.hf_llama import VARIANT_FIELDS

torch.set_num_threads(1)  # tiny models: threads cost more than they give

_SHAPE = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_LOCAL = {"rope_type": "default", "rope_theta": 10000.0}
_GLOBAL = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}

# family -> (transformers config class, its arguments)
CASES: dict[str, tuple[type, dict[str, Any]]] = {
    # layers from max_window_layers=1 on slide; biases on q/k/v; tied head
    "qwen2": (
        transformers.Qwen2Config,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
             tie_word_embeddings=True),
    ),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, attention_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4, rope_theta=500.0)),
    "phi3": (
        transformers.Phi3Config,
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.5}),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
             attn_logit_softcapping=1.0, final_logit_softcapping=1.0),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"sliding_attention": dict(_LOCAL), "full_attention": dict(_GLOBAL)}),
    ),
}  # fmt: skip


def _hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, extra = CASES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**_SHAPE, **json.loads(json.dumps(extra))})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # gains start at 1 (Gemma: 0) and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
        if family == "gemma2":  # larger scores and logits, so the soft caps bend them
            for name, p in model.named_parameters():
                if "q_proj" in name:
                    p.mul_(8.0)
    return model.eval()


def _saved(family: str, folder: Path, seed: int = 0) -> transformers.PreTrainedModel:
    hf = _hf_model(family, seed)
    hf.save_pretrained(folder)
    return hf


def _ids(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(
        3, _SHAPE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("family", sorted(CASES))
def test_logits_and_greedy_tokens_equal_transformers(tmp_path: Path, family: str) -> None:
    hf = _saved(family, tmp_path)
    ours = load_hf_decoder(tmp_path).eval()
    ids = _ids(1, (2, 24))
    with torch.no_grad():
        err = (ours(ids) - hf(ids).logits).abs().max().item()
    assert err <= 1e-4, f"{family}: max abs logit error {err}"

    prompt = _ids(2, (2, 7))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(generate(ours, prompt, 12), expected)


def test_each_family_reads_as_the_variant_it_is(tmp_path: Path) -> None:
    """The options each family sets, and nothing else (LLaMA's defaults stand)."""
    got = {}
    for family in CASES:
        _saved(family, tmp_path / family)
        got[family] = load_hf_decoder(tmp_path / family).config
    q2, q3, mistral, phi3 = got["qwen2"], got["qwen3"], got["mistral"], got["phi3"]
    g2, g3 = got["gemma2"], got["gemma3_text"]
    assert (q2.attention_bias, q2.attention_out_bias, q2.qk_norm) == (True, False, False)
    assert (q2.sliding_window, q2.layer_types) == (4, ("full", "sliding", "sliding"))
    assert (q3.qk_norm, q3.attention_bias, q3.attention_out_bias, q3.sliding_window) == (
        True, True, None, None,
    )  # fmt: skip
    assert (mistral.sliding_window, mistral.layer_types, mistral.sliding_layers) == (
        4, None, (True, True, True),
    )  # fmt: skip
    assert (phi3.partial_rotary_factor, phi3.rotary_dim, phi3.sliding_window) == (0.5, 8, None)
    for g in (g2, g3):
        assert g.embedding_scale and g.norm_unit_offset and g.sandwich_norm
        assert (g.activation, g.query_pre_attn_scalar, g.sliding_window) == ("gelu_tanh", 24, 4)
    assert (g2.layer_types, g2.attn_logit_softcap, g2.final_logit_softcap) == (
        ("sliding", "full", "sliding"), 1.0, 1.0,
    )  # fmt: skip
    assert not g2.qk_norm and g2.rope_local_theta is None
    assert (g3.qk_norm, g3.rope_theta, g3.rope_local_theta, g3.attn_logit_softcap) == (
        True, 1_000_000.0, 10000.0, None,
    )  # fmt: skip
    assert g3.rope_scaling == {"type": "linear", "factor": 2.0}
    plain = LlamaConfig()  # Phi-3 differs from LLaMA in its file layout and partial RoPE only
    assert all(getattr(phi3, name) == getattr(plain, name) for name in VARIANT_FIELDS)


def test_gemma3_older_config_spelling_reads_the_same(tmp_path: Path) -> None:
    """A Gemma 3 config.json as transformers 4 wrote it (rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern; no layer_types) gives the same model."""
    hf = _saved("gemma3_text", tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        config.pop(key, None)
    config.update(
        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )  # fmt: skip
    path.write_text(json.dumps(config))
    ours = load_hf_decoder(tmp_path).eval()
    assert ours.config.layer_types == ("sliding", "full", "sliding")
    ids = _ids(3, (1, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", sorted(CASES))
def test_written_folder_loads_in_transformers_with_the_same_logits(
    tmp_path: Path, family: str
) -> None:
    """save_hf_decoder writes the family's layout; AutoModelForCausalLM reads it back with the
    original's logits, and we read it back as the same config."""
    hf = _saved(family, tmp_path / "in", seed=5)
    ours = load_hf_decoder(tmp_path / "in").eval()
    written = save_hf_decoder(ours, tmp_path / "out")
    assert written["model_type"] == family
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(4, (1, 20))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
    again = load_hf_decoder(tmp_path / "out")
    assert again.config == ours.config


def test_config_fields_lmarch_does_not_implement_are_refused(tmp_path: Path) -> None:
    _saved("gemma3_text", tmp_path / "g3")
    path = tmp_path / "g3" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_bidirectional_attention": True}))
    with pytest.raises(LmarchError, match="use_bidirectional_attention=True is not supported"):
        load_hf_decoder(tmp_path / "g3")
    _saved("phi3", tmp_path / "phi3")
    path = tmp_path / "phi3" / "config.json"
    config = json.loads(path.read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    path.write_text(json.dumps(config))
    with pytest.raises(LmarchError, match="phi3 config field rope_scaling.rope_type='longrope'"):
        load_hf_decoder(tmp_path / "phi3")
    _saved("qwen2", tmp_path / "q2")
    path = tmp_path / "q2" / "config.json"
    config = json.loads(path.read_text())
    config["layer_types"] = ["full_attention", "chunked_attention", "full_attention"]
    path.write_text(json.dumps(config))
    with pytest.raises(LmarchError, match="qwen2 config field layer_types="):
        load_hf_decoder(tmp_path / "q2")


def test_a_variant_llama_has_no_llama_layout() -> None:
    """save_hf_llama's config writer refuses an option LLaMA's layout cannot hold."""
    from lmarch.weights.hf_llama import llama_config_to_hf

    config = LlamaConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16,
                         intermediate_size=32, qk_norm=True)  # fmt: skip
    with pytest.raises(LmarchError, match="LLaMA layout has no qk_norm=True"):
        llama_config_to_hf(config)


def test_llama_defaults_build_the_same_modules_as_before() -> None:
    """The variant options off: no q/k norms, output norms, window or local rotary; the state
    dict has exactly LLaMA's names."""
    model = Llama(LlamaConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16,
                              intermediate_size=32))  # fmt: skip
    names = {k.split(".", 2)[-1] for k in model.state_dict() if k.startswith("blocks.")}
    assert names == {
        "norm_attn.weight", "attn.qkv.weight", "attn.out.weight", "norm_ffn.weight",
        "ffn.gate_up.weight", "ffn.down.weight",
    }  # fmt: skip
    assert model.rotary_local is None
    assert all(b.attn.sliding_window is None and b.attn.q_norm is None for b in model.blocks)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_static_cache_steps_equal_the_whole_sequence(tmp_path: Path, family: str) -> None:
    """One token at a time over a preallocated cache, positions given as tensors (what the
    compiled decode step does, here eagerly): the window then hides both the unwritten slots
    and the keys that slid out, and each step's logits equal the full forward's."""
    _saved(family, tmp_path)
    ours = load_hf_decoder(tmp_path).eval()
    ids = _ids(6, (1, 14))
    cache = ours.make_cache(1, 32)
    with torch.no_grad():
        whole = ours(ids)
        steps = [ours(ids[:, t : t + 1], cache=cache, start=torch.tensor(t)) for t in range(14)]
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("fields", "config_cls"),
    [
        ("QWEN2_FIELDS", transformers.Qwen2Config),
        ("QWEN3_FIELDS", transformers.Qwen3Config),
        ("MISTRAL_FIELDS", transformers.MistralConfig),
        ("PHI3_FIELDS", transformers.Phi3Config),
        ("GEMMA2_FIELDS", transformers.Gemma2Config),
        ("GEMMA3_FIELDS", transformers.Gemma3TextConfig),
    ],
)
def test_every_transformers_field_is_classified(fields: str, config_cls: type) -> None:
    """Each key transformers writes for the family is implemented, inert or refused, in one
    list only: a field a newer transformers adds fails here first."""
    from lmarch.weights import hf_decoders, hf_gemma

    spec = getattr(hf_decoders, fields, None) or getattr(hf_gemma, fields)
    keys = set(config_cls().to_dict())
    implemented, inert, refused = set(spec.implemented), set(spec.inert), set(spec.all_refused())
    assert keys - (implemented | inert | refused) == set()
    assert not (implemented & inert or implemented & refused or inert & refused)
