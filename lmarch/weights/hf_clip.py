"""CLIP and ViT in the Hugging Face layout (``CLIPModel``, ``CLIPVisionModel``, ``ViTModel``).

Their query/key/value projections are three matrices, ours one fused ``qkv``: their rows are
concatenated on the way in and cut in three on the way out. ViT stores its class token as
[1, 1, d] and its position table as [1, N + 1, d]; ours are [d] and [N + 1, d] (the learned
position table of :mod:`lmarch.nn.position`), so those two are reshaped. A CLIP checkpoint
holds the two towers under ``vision_model.`` and ``text_model.``, which have their own depths:
each tower is renamed by its own map.

Every ``config.json`` field either changes our model as it changes transformers' or is refused
by name (:data:`CLIP_TEXT_FIELDS`, :data:`CLIP_VISION_FIELDS`, :data:`VIT_FIELDS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.models.clip import CLIP, CLIPConfig, clip_vision_config
from lmarch.models.vit import ViT, ViTConfig
from lmarch.weights.hf import (
    COMMON_INERT,
    HFConfigFields,
    build_config,
    build_from_weights,
    read_hf_config,
    read_hf_weights,
    write_hf_folder,
)
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import unique_state_dict

CLIP_TYPES = ("clip", "clip_vision_model")
VIT_TYPES = ("vit",)
_ACT_FROM_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
              "relu": "relu", "silu": "silu"}  # fmt: skip
_TRAINING_ONLY = ("attention_dropout", "dropout", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "initializer_factor")  # fmt: skip

CLIP_TEXT_FIELDS = HFConfigFields(
    "CLIP text",
    implemented=(
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
        "eos_token_id",  # the position the text is read at
    ),
    inert=(
        *(k for k in COMMON_INERT if k != "eos_token_id"), *_TRAINING_ONLY,
        "projection_dim",  # CLIPModel's projection width is the top-level field
    ),
)  # fmt: skip
CLIP_VISION_FIELDS = HFConfigFields(
    "CLIP vision",
    implemented=(
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
    ),
    inert=(*COMMON_INERT, *_TRAINING_ONLY, "projection_dim"),
)  # fmt: skip
CLIP_FIELDS = HFConfigFields(
    "CLIP",
    implemented=("text_config", "vision_config", "projection_dim"),
    inert=(*COMMON_INERT, "initializer_factor",
           "logit_scale_init_value"),  # the scale itself is a stored tensor
)  # fmt: skip
VIT_FIELDS = HFConfigFields(
    "ViT",
    implemented=(
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias",
        "pooler_output_size", "pooler_act",
    ),
    inert=(*COMMON_INERT, *_TRAINING_ONLY,
           "encoder_stride"),  # the masked-image-modelling decoder's, not ViTModel's
    refused={"pooler_act": ("tanh",)},
)  # fmt: skip


def _pair(ours: str, theirs: str) -> list[Rule]:
    """A layer's weight and bias."""
    return [Rule(f"{ours}.{x}", f"{theirs}.{x}") for x in ("weight", "bias")]


def _layer_rules(layer: str, attn: str, qkv: tuple[str, str, str], modules: tuple) -> list[Rule]:
    """The per-block rules shared by every tower: their block prefix ``layer``, their
    attention prefix and q/k/v names, and theirs for our (attn.out, norm_attn, norm_ffn,
    ffn.fc_in, ffn.fc_out)."""
    ours = ("attn.out", "norm_attn", "norm_ffn", "ffn.fc_in", "ffn.fc_out")
    fused = [
        Rule(f"blocks.{{i}}.attn.qkv.{x}", tuple(f"{layer}{attn}{n}.{x}" for n in qkv))
        for x in ("weight", "bias")
    ]
    return fused + [r for o, t in zip(ours, modules) for r in _pair(f"blocks.{{i}}.{o}", layer + t)]


_CLIP_LAYER = ("self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
# each CLIP tower's own tensors around the shared blocks: ours -> theirs (under the tower's
# prefix), single tensors and weight + bias pairs
_CLIP_TOWERS = {
    "vision": (
        {"class_token": "embeddings.class_embedding",
         "patch_embed.weight": "embeddings.patch_embedding.weight",
         "positions.weight": "embeddings.position_embedding.weight"},
        {"embed_norm": "pre_layrnorm", "norm": "post_layernorm"},
    ),
    "text": (
        {"tokens.weight": "embeddings.token_embedding.weight",
         "positions.weight": "embeddings.position_embedding.weight"},
        {"norm": "final_layer_norm"},
    ),
}  # fmt: skip


def _clip_tower_map(tower: str, p: str) -> WeightMap:
    tensors, pairs = _CLIP_TOWERS[tower]
    layer = f"{p}encoder.layers.{{i}}."
    return WeightMap(
        [
            *(Rule(ours, p + theirs) for ours, theirs in tensors.items()),
            *(r for ours, theirs in pairs.items() for r in _pair(ours, p + theirs)),
            *_layer_rules(layer, "self_attn.", ("q_proj", "k_proj", "v_proj"), _CLIP_LAYER),
        ],
        ignore=[r"position_ids$"],
    )


def clip_vision_map(p: str = "vision_model.") -> WeightMap:
    """Our CLIP image tower (:class:`~lmarch.models.vit.ViT`, variant "clip") <-> theirs."""
    return _clip_tower_map("vision", p)


def clip_text_map(p: str = "text_model.") -> WeightMap:
    """Our CLIP text tower <-> theirs."""
    return _clip_tower_map("text", p)


def _flatten(t: Tensor) -> Tensor:
    return t.reshape(-1) if t.dim() == 3 else t


def vit_map(pooler: bool, qkv_bias: bool = True) -> WeightMap:
    """Our ViT (variant "vit") <-> transformers' ``ViTModel`` (with its pooler and q/k/v biases
    or without)."""
    rules = _layer_rules(
        "encoder.layer.{i}.", "attention.attention.", ("query", "key", "value"),
        ("attention.output.dense", "layernorm_before", "layernorm_after", "intermediate.dense",
         "output.dense"),
    )  # fmt: skip
    if not qkv_bias:
        rules = [r for r in rules if r.ours != "blocks.{i}.attn.qkv.bias"]
    return WeightMap(
        [
            Rule("class_token", "embeddings.cls_token", load_fns=(_flatten,),
                 save_fns=(lambda t: t.reshape(1, 1, -1),)),
            Rule("patch_embed.weight", "embeddings.patch_embeddings.projection.weight"),
            Rule("patch_embed.bias", "embeddings.patch_embeddings.projection.bias"),
            Rule("positions.weight", "embeddings.position_embeddings",
                 load_fns=(lambda t: t.reshape(t.shape[-2], t.shape[-1]),),
                 save_fns=(lambda t: t.unsqueeze(0),)),
            *rules,
            *_pair("norm", "layernorm"),
            *(_pair("pooler", "pooler.dense") if pooler else []),
        ],
        ignore=[r"mask_token$"],  # masked-image-modelling's input token, unused by ViTModel
    )  # fmt: skip


def _activation(hf: dict[str, Any], default: str, where: str) -> str:
    act = hf.get("hidden_act", default)
    if act not in _ACT_FROM_HF:
        raise LmarchError(
            f"{where}: activation hidden_act={act!r} is not supported",
            hint=f"lmarch implements {sorted(_ACT_FROM_HF)}",
        )
    return _ACT_FROM_HF[act]


def _square(hf: dict[str, Any], key: str, default: int, where: str) -> int:
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise LmarchError(
            f"{where}: {key}={value!r} is not supported", hint="a square size, one integer"
        )
    return value


# our name -> transformers' of the fields every tower shares (error messages use them too)
_TOWER_NAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head":
                "num_attention_heads", "intermediate_size": "intermediate_size",
                "layer_norm_eps": "layer_norm_eps"}  # fmt: skip
_VISION_NAMES = {**_TOWER_NAMES, "n_channels": "num_channels"}
# transformers' defaults of those fields, then of hidden_act, for each kind of tower
_TOWER_DEFAULTS = {"text": (512, 12, 8, 2048, 1e-5, "quick_gelu"),
                   "vision": (768, 12, 12, 3072, 1e-5, "quick_gelu"),
                   "vit": (768, 12, 12, 3072, 1e-12, "gelu")}  # fmt: skip


def _tower_from_hf(hf: dict[str, Any], tower: str, where: str) -> dict[str, Any]:
    *defaults, act = _TOWER_DEFAULTS[tower]
    values = {ours: hf.get(theirs, d) for (ours, theirs), d in zip(_TOWER_NAMES.items(), defaults)}
    return {**values, "activation": _activation(hf, act, where)}


def _tower_to_hf(c: Any) -> dict[str, Any]:
    values = {theirs: getattr(c, ours) for ours, theirs in _TOWER_NAMES.items()}
    return {**values, "hidden_act": _ACT_TO_HF[c.activation]}


def clip_vision_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ViTConfig:
    """Our CLIP image-tower config from a transformers ``CLIPVisionConfig`` dict (its defaults
    for absent keys)."""
    CLIP_VISION_FIELDS.check(hf, where)
    values = dict(
        image_size=_square(hf, "image_size", 224, where),
        patch_size=_square(hf, "patch_size", 32, where),
        n_channels=hf.get("num_channels", 3),
        **_tower_from_hf(hf, "vision", where),
    )
    return build_config(lambda: clip_vision_config(**values), _VISION_NAMES, where, "CLIP vision")


def clip_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> CLIPConfig:
    """Our CLIPConfig from a transformers ``CLIPConfig`` dict."""
    CLIP_FIELDS.check(hf, where)
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise LmarchError(f"{where}: text_config and vision_config must be objects")
    CLIP_TEXT_FIELDS.check(text, f"{where} text_config")
    values = dict(
        vocab_size=text.get("vocab_size", 49408),
        block_size=text.get("max_position_embeddings", 77),
        **_tower_from_hf(text, "text", f"{where} text_config"),
        eos_token_id=text.get("eos_token_id", 49407),
        pad_token_id=text.get("pad_token_id", 1),
        projection_dim=hf.get("projection_dim", 512),
        vision=clip_vision_config_from_hf(vision, f"{where} vision_config"),
    )
    names = {**_VISION_NAMES, "block_size": "max_position_embeddings"}
    return build_config(lambda: CLIPConfig(**values), names, where, "CLIP")


def vit_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ViTConfig:
    """Our ViTConfig (variant "vit") from a transformers ``ViTConfig`` dict."""
    VIT_FIELDS.check(hf, where)
    values = _tower_from_hf(hf, "vit", where)
    if hf.get("pooler_output_size", values["n_embd"]) != values["n_embd"]:
        raise LmarchError(
            f"{where}: ViT pooler_output_size={hf['pooler_output_size']!r} is not supported",
            hint="lmarch implements a pooler as wide as hidden_size",
        )
    values.update(
        image_size=_square(hf, "image_size", 224, where),
        patch_size=_square(hf, "patch_size", 16, where),
        n_channels=hf.get("num_channels", 3),
        qkv_bias=hf.get("qkv_bias", True),
    )
    return build_config(lambda: ViTConfig(**values), _VISION_NAMES, where, "ViT")


def _part(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _towers(config: CLIPConfig) -> list[tuple[str, str, WeightMap, Any]]:
    """(our prefix, theirs, the name map, the tower's config) of each CLIP tower."""
    return [
        ("vision.", "vision_model.", clip_vision_map(), config.vision),
        ("text.", "text_model.", clip_text_map(), config),
    ]


def load_hf_clip(folder: str | Path) -> CLIP:
    """A :class:`~lmarch.models.clip.CLIP` holding the weights of a ``CLIPModel`` folder."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    where = str(folder / "config.json")
    if hf.get("model_type") != "clip":
        raise LmarchError(
            f"{where}: model_type {hf.get('model_type')!r} is not a whole CLIP model",
            hint="load a clip_vision_model folder with load_hf_clip_vision",
        )
    config = clip_config_from_hf(hf, where)
    theirs = read_hf_weights(folder)
    source = str(folder)
    known = (
        "vision_model.",
        "text_model.",
        "visual_projection.",
        "text_projection.",
        "logit_scale",
    )
    extra = [k for k in theirs if not k.startswith(known)]
    if extra:
        raise LmarchError(f"{source}: unexpected tensors {extra[:5]}")
    ours = {
        mine + k: v
        for mine, prefix, names, tower in _towers(config)
        for k, v in names.to_ours(_part(theirs, prefix), tower.n_layer, source).items()
    }
    for name in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
        if name not in theirs:
            raise LmarchError(f"{source}: tensor {name!r} is missing")
        ours[name] = theirs[name]
    return build_from_weights(lambda: CLIP(config), ours, source)


def load_hf_clip_vision(folder: str | Path) -> ViT:
    """The image tower (variant "clip") of a ``CLIPVisionModel`` or ``CLIPModel`` folder."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    where = str(folder / "config.json")
    kind = hf.get("model_type")
    if kind == "clip":
        vision = hf.get("vision_config") or {}
        config = clip_vision_config_from_hf(vision, f"{where} vision_config")
    elif kind == "clip_vision_model":
        config = clip_vision_config_from_hf(hf, where)
    else:
        raise LmarchError(f"{where}: model_type {kind!r} is not a CLIP image tower")
    theirs = read_hf_weights(folder)
    # transformers < 5 saved a CLIPVisionModel under vision_model.; 5 saves it bare
    prefix = (
        "vision_model." if kind == "clip" or "vision_model.pre_layrnorm.weight" in theirs else ""
    )
    if kind == "clip":
        theirs = _part(theirs, prefix)
    ours = clip_vision_map(prefix).to_ours(theirs, config.n_layer, str(folder))
    return build_from_weights(lambda: ViT(config), ours, str(folder))


def load_hf_vit(folder: str | Path) -> ViT:
    """A :class:`~lmarch.models.vit.ViT` holding a ``ViTModel`` folder's weights (a task
    checkpoint's ``vit.`` encoder too; its head is not part of the encoder)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    where = str(folder / "config.json")
    if hf.get("model_type") not in VIT_TYPES:
        raise LmarchError(f"{where}: model_type {hf.get('model_type')!r} is not ViT")
    theirs = read_hf_weights(folder)
    if any(k.startswith("vit.") for k in theirs):
        theirs = {k[len("vit.") :]: v for k, v in theirs.items() if k.startswith("vit.")}
    pooler = "pooler.dense.weight" in theirs
    config = vit_config_from_hf(hf, where)
    if pooler:
        config = ViTConfig(**{**config.__dict__, "add_pooler": True})
    ours = vit_map(pooler, config.qkv_bias).to_ours(theirs, config.n_layer, str(folder))
    return build_from_weights(lambda: ViT(config), ours, str(folder))


def clip_config_to_hf(config: CLIPConfig, bos_token_id: int | None = None) -> dict[str, Any]:
    """The transformers ``CLIPConfig`` dict of our config (``bos_token_id``: the tokenizer's
    start token, which the model never reads; None leaves transformers' default)."""
    v = config.vision
    bos = {} if bos_token_id is None else {"bos_token_id": bos_token_id}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.projection_dim,
        "text_config": {
            "model_type": "clip_text_model",
            **_tower_to_hf(config),
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.block_size,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            **bos,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **_tower_to_hf(v),
            "num_channels": v.n_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
        },
    }


def save_hf_clip(model: CLIP, folder: str | Path, bos_token_id: int | None = None) -> None:
    """Write ``model`` as a transformers ``CLIPModel`` folder (config.json + model.safetensors;
    ``bos_token_id`` as in :func:`clip_config_to_hf`)."""
    c = model.config
    ours = unique_state_dict(model)
    theirs: dict[str, Tensor] = {}
    for mine, _, names, tower in _towers(c):
        fused = ("blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.bias")
        sizes = dict.fromkeys(fused, (tower.n_embd,) * 3)
        theirs |= names.to_theirs(_strip(ours, mine), tower.n_layer, split_sizes=sizes)
    for name in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
        theirs[name] = ours[name].contiguous()
    write_hf_folder(folder, clip_config_to_hf(c, bos_token_id), theirs)


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_hf_vision_family(folder: str | Path) -> nn.Module:
    """What a folder's ``model_type`` names: a whole CLIP, a CLIP image tower or a ViT."""
    kind = read_hf_config(folder).get("model_type")
    if kind == "clip":
        return load_hf_clip(folder)
    if kind == "clip_vision_model":
        return load_hf_clip_vision(folder)
    if kind in VIT_TYPES:
        return load_hf_vit(folder)
    raise LmarchError(
        f"{folder}: model_type {kind!r} is not a vision model lmarch reads",
        hint="one of clip, clip_vision_model, vit",
    )


__all__ = [
    "CLIP_FIELDS",
    "CLIP_TEXT_FIELDS",
    "CLIP_TYPES",
    "CLIP_VISION_FIELDS",
    "VIT_FIELDS",
    "VIT_TYPES",
    "clip_config_from_hf",
    "clip_config_to_hf",
    "clip_text_map",
    "clip_vision_config_from_hf",
    "clip_vision_map",
    "load_hf_clip",
    "load_hf_clip_vision",
    "load_hf_vision_family",
    "load_hf_vit",
    "save_hf_clip",
    "vit_config_from_hf",
    "vit_map",
]
