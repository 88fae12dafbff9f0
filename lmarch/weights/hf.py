"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.models.validate import ConfigError
from lmarch.nn.init import empty_weights
from lmarch.weights.safetensors_io import (
    atomic_write,
    load_into_model,
    load_tensors,
    save_tensors,
)

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LmarchError(
            f"no config.json in {folder}", hint="is this a Hugging Face model folder?"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise LmarchError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def build_from_weights(make: Callable[[], M], tensors: dict[str, Tensor], source: str) -> M:
    """``make()`` built on the meta device, then given ``tensors`` (as float32 where they are
    floating point). Nothing is allocated before the tensors' names and shapes are checked
    against the model, so a config.json that claims absurd sizes is refused, not allocated."""
    with empty_weights():
        model = make()
    floats = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    load_into_model(model, floats, source=source, assign=True)
    for module in model.modules():  # buffers are not in the file (rotary tables)
        if hasattr(module, "reset_tables"):
            module.reset_tables("cpu")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LmarchError(f"{source}: no weights for {left[:5]}")
    return model


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of the folder: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_tensors(single)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise LmarchError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmarchError(f"{index} is not a valid safetensors index: {exc}") from exc
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_tensors(folder / shard))
    return tensors


def write_hf_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write config.json and model.safetensors (``format: pt`` metadata, as transformers expects)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# ---- which config.json fields change the model ----------------------------------------------

# Fields every transformers config carries that leave a model's logits unchanged: bookkeeping,
# token ids (used by tokenizers and generation, not by the forward pass), the dtype the weights
# were saved in, output switches, training-only settings, classification labels (the LM heads
# loaded here do not use them) and which attention kernel to run (the same function).
COMMON_INERT = (
    "_name_or_path", "name_or_path", "transformers_version", "architectures", "model_type",
    "dtype", "torch_dtype", "output_hidden_states", "output_attentions", "return_dict",
    "use_return_dict", "torchscript", "use_cache", "initializer_range", "gradient_checkpointing",
    "chunk_size_feed_forward", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "attn_implementation", "_attn_implementation", "_commit_hash", "tie_encoder_decoder",
)  # fmt: skip

# Fields any transformers model honours through shared code (masks, loading, remote code)
# that lmarch does not implement: accepted only at these values (transformers' defaults).
COMMON_REFUSED: dict[str, tuple[Any, ...]] = {
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
    "cross_attention_hidden_size": (None,),
    "is_causal": (True,),  # False gives the decoder a bidirectional mask
    "sliding_window": (None,),
    "attention_chunk_size": (None,),
    "layer_types": (None,),
    "pruned_heads": ({}, None),
    "quantization_config": (None,),
    "auto_map": (None,),  # the folder's own modelling code could read any field
}


@dataclass(frozen=True)
class HFConfigFields:
    """How lmarch treats the fields of one family's Hugging Face ``config.json``.

    ``implemented`` fields change our model as they change transformers'; ``inert`` ones do not
    change the logits in either (the reason beside each); ``refused`` ones are accepted only at
    the listed values. Keys in none of them are not read by transformers' model code for this
    family either (legacy keys such as GPT-2's ``n_ctx``, generation defaults), so ignoring
    them keeps parity.
    """

    family: str
    implemented: tuple[str, ...]
    inert: tuple[str, ...]
    refused: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def all_refused(self) -> dict[str, tuple[Any, ...]]:
        """This family's refused fields and the common ones, less those it implements (Mistral
        implements ``sliding_window``)."""
        refused = {**COMMON_REFUSED, **self.refused}
        return {k: v for k, v in refused.items() if k not in self.implemented}

    def check(self, hf: dict[str, Any], where: str = "config.json") -> None:
        """Raise :class:`LmarchError` naming the first refused field whose value is not one of
        those lmarch implements."""
        for key, accepted in self.all_refused().items():
            if key in hf and not any(_same(hf[key], a) for a in accepted):
                raise LmarchError(
                    f"{where}: {self.family} config field {key}={hf[key]!r} is not supported",
                    hint=f"lmarch implements only {key}={accepted[0]!r}",
                )


def _same(value: Any, accepted: Any) -> bool:
    if accepted is None:
        return value is None
    # True == 1 in Python: a config's booleans and numbers must match in kind as well
    return type(value) is type(accepted) and value == accepted


def refuse(where: str, family: str, key: str, value: Any, supported: str) -> LmarchError:
    """The error for a config field whose value lmarch does not implement."""
    return LmarchError(
        f"{where}: {family} config field {key}={value!r} is not supported",
        hint=f"lmarch implements {supported}",
    )


def build_config(make: Callable[[], T], hf_names: dict[str, str], where: str, family: str) -> T:
    """``make()`` (a Config constructor), with a range error restated in terms of the
    ``config.json`` field it came from (``hf_names``: our field -> theirs)."""
    try:
        return make()
    except ConfigError as exc:
        key = hf_names.get(exc.field or "", exc.field)
        raise LmarchError(f"{where}: {family} config field {key}: {exc}") from exc
