"""Write a LLaMA-family model and its tokenizer as a llama.cpp GGUF file (``gguf``'s writer).

The inverse of :mod:`lmarch.weights.gguf_llama`: our names become llama.cpp's
(``blk.{i}.attn_q.weight`` ...), the fused ``qkv`` and ``gate_up`` matrices are cut into their
parts, and the rows of W_Q and W_K are permuted back into llama.cpp's RoPE layout. Matrices are
stored as

    f16    IEEE half precision
    q8_0   blocks of 32: float16 d, 32 int8 q;        w = d q      (8.5 bits a weight)
    q4_0   blocks of 32: float16 d, 16 bytes of q;    w = d (q - 8) (4.5 bits a weight)

quantised by ``gguf.quants.quantize`` (bit for bit llama.cpp's reference quantisers); a matrix
whose rows do not split into blocks of 32 stays f16, and the RMSNorm weights stay float32, as
llama.cpp's converter keeps them. Under q4_0 the output head (or the embedding table tied to it)
is q8_0, as in llama.cpp's own 4-bit files, and such a file runs on lmarch's native block kernels
by default. The file is written beside its destination and renamed into
place, so a failed export leaves no half-written file.

The hyper-parameters go into the ``llama.*`` metadata keys. After writing, the configuration the
file describes (as :func:`~lmarch.weights.gguf_llama.llama_config_from_gguf` reads it) is
compared with the model's: a field the keys cannot carry (QK-norm, sliding windows, biases,
...) is refused by name instead of being dropped silently.

The vocabulary is written as llama.cpp's byte-level BPE (``tokenizer.ggml.model = "gpt2"``):
a character tokenizer over single-byte characters becomes one token per character with no
merges (llama.cpp and lmarch then encode text one character at a time, as the run did); a
byte-level BPE tokenizer is written with its merges, special tokens (as control tokens) and
pre-tokenizer name. GGUF allows an empty array, but ``gguf``'s writer refuses one, so the
empty merge list of a character vocabulary is packed by a two-line extension of the writer.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer, bytes_to_unicode
from lmarch.tokenizers.char import CharTokenizer
from lmarch.tokenizers.gguf_vocab import PRE_TOKENIZERS
from lmarch.weights.gguf import read_gguf
from lmarch.weights.gguf_llama import gguf_llama_map, llama_config_from_gguf

EXPORT_QUANTS = ("f16", "q8_0", "q4_0")
_FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
_QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
# fields that change how a model runs, not what it computes: not carried by the file
_RUNTIME_FIELDS = ("dropout", "attention", "block_size")
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types
# names lmarch reads as GPT-2's split that llama.cpp does not know ("gpt2") or reads as another
# split ("default"); "mpt" and "olmo" are GPT-2's split in both
_NOT_LLAMA_CPP_NAMES = ("default", "gpt2")
# the LlamaConfig fields the llama.* metadata written here carries; the others must keep their
# defaults
_CARRIED_FIELDS = (
    "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
    "head_dim", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "tie_embeddings",
    "dropout", "attention",
)  # fmt: skip


class _NoStrings(tuple):  # type: ignore[type-arg]
    """An empty array of strings, for :class:`_Writer` to pack (a plain ``[]`` has no type)."""


class _Writer(gguf.GGUFWriter):
    """``gguf.GGUFWriter`` that also packs an empty string array (legal GGUF: element type
    STRING, length 0), which the writer itself refuses."""

    def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, *args: Any, **kw: Any) -> bytes:  # type: ignore[override]
        if isinstance(val, _NoStrings):
            head = self._pack("I", gguf.GGUFValueType.ARRAY) if add_vtype else b""
            return head + self._pack("I", gguf.GGUFValueType.STRING) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, *args, **kw)


def _vocabulary(tokenizer: Any) -> dict[str, Any]:
    """GGUF ``tokenizer.ggml.*`` metadata for ``tokenizer`` (refused by name when it has none)."""
    byte_symbol = bytes_to_unicode()
    if isinstance(tokenizer, CharTokenizer):
        wide = [c for c in tokenizer.chars if ord(c) > 127]
        if wide:
            raise LmarchError(
                f"the run's character vocabulary holds {wide[0]!r}, which is more than one byte "
                "in UTF-8: a GGUF byte-level vocabulary cannot spell it without merges",
                hint="train on ASCII text to export as GGUF",
            )
        tokens = [byte_symbol[ord(c)] for c in tokenizer.chars]
        return {
            "tokens": tokens,
            "types": [_NORMAL] * len(tokens),
            "merges": [],
            "pre": "default",  # no merges: any split spells text one character at a time
            "ids": {},
            "add_bos": False,
        }
    if isinstance(tokenizer, ByteLevelBPETokenizer):
        pre = next(
            (
                name
                for name, spec in PRE_TOKENIZERS.items()
                if name not in _NOT_LLAMA_CPP_NAMES
                and spec.pattern == tokenizer.pattern
                and spec.ignore_merges == tokenizer.ignore_merges
            ),
            None,
        )
        if pre is None:
            raise LmarchError("the tokenizer's pre-tokenizer has no llama.cpp name")
        tokens = [""] * tokenizer.vocab_size
        types = [_NORMAL] * tokenizer.vocab_size
        for table, kind in (
            (tokenizer.vocab, _NORMAL),
            (tokenizer.special_tokens, _CONTROL),
            (tokenizer.added_tokens, _USER_DEFINED),
        ):
            for text, i in table.items():
                tokens[i], types[i] = text, kind
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "padding_token_id": tokenizer.pad_token_id,
        }
        return {
            "tokens": tokens,
            "types": types,
            "merges": [f"{a} {b}" for a, b in tokenizer.merges],
            "pre": pre,
            "ids": {k: v for k, v in ids.items() if v is not None},
            "add_bos": tokenizer.add_bos_token,
        }
    raise LmarchError(
        f"a {type(tokenizer).__name__} cannot be written as a GGUF vocabulary",
        hint="GGUF export takes character and byte-level BPE tokenizers",
    )


def _tensor_data(weight: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) to store ``weight`` as: norms float32, matrices in
    ``quant`` (f16 where their rows are not whole blocks of 32)."""
    values = weight.detach().float().cpu().numpy()
    if values.ndim == 1:
        return values, None
    if quant == "f16" or values.shape[-1] % 32:
        return values.astype(np.float16), None
    return gguf.quants.quantize(values, _QTYPES[quant]), _QTYPES[quant]


def _settings(config: LlamaConfig) -> dict[str, Any]:
    """The config's fields as a GGUF file can hold them: defaults that stand for a number made
    explicit, floats rounded to float32."""
    fields = dataclasses.asdict(config)
    fields.update(n_kv_head=config.kv_heads, head_dim=config.dim_per_head)
    # GGUF stores these numbers as float32
    return {k: np.float32(v) if isinstance(v, float) else v for k, v in fields.items()}


def _compare_configs(written: LlamaConfig, ours: LlamaConfig, path: Path) -> None:
    a, b = _settings(written), _settings(ours)
    differ = [k for k in b if k not in _RUNTIME_FIELDS and a.get(k) != b[k]]
    if differ:
        raise LmarchError(
            f"{path}: GGUF's llama metadata cannot carry this model's "
            + ", ".join(f"{k}={b[k]!r}" for k in differ),
            hint="only the LLaMA architecture llama.cpp reads can be exported",
        )


def export_gguf_llama(
    model: Llama,
    tokenizer: Any,
    path: str | os.PathLike[str],
    quant: str = "f16",
    name: str = "lmarch",
) -> dict[str, Any]:
    """Write ``model`` (a :class:`~lmarch.models.llama.Llama`) and ``tokenizer`` to the GGUF
    file ``path``, matrices stored as ``quant`` (see the module docstring). Returns a summary:
    the path, the file's size in bytes and the number of tensors of each ggml type."""
    if quant not in EXPORT_QUANTS:
        raise LmarchError(f"unknown GGUF quantisation {quant!r}", hint=", ".join(EXPORT_QUANTS))
    if not isinstance(model, Llama):
        raise LmarchError(f"{type(model).__name__} has no GGUF export (LLaMA family only)")
    config: LlamaConfig = model.config
    path = Path(path)
    carried = {k: getattr(config, k) for k in _CARRIED_FIELDS}
    _compare_configs(LlamaConfig(**carried), config, path)  # before anything is written
    vocab = _vocabulary(tokenizer)
    if len(vocab["tokens"]) != config.vocab_size:
        raise LmarchError(
            f"the tokenizer has {len(vocab['tokens'])} tokens but the model "
            f"{config.vocab_size} embedding rows"
        )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    hd = config.dim_per_head
    qkv = (config.n_head * hd, config.kv_heads * hd, config.kv_heads * hd)
    try:
        theirs = gguf_llama_map(config).to_theirs(
            state,
            config.n_layer,
            where="model",
            split_sizes={"blocks.{i}.attn.qkv.weight": qkv},
        )
    except LmarchError as exc:  # quantised layers, adapters: not a plain float Llama
        raise LmarchError(
            f"the model's weights are not a plain LLaMA's ({exc})",
            hint="export the float run (before lmarch quantize, with adapters merged)",
        ) from exc

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".gguf.tmp", dir=path.parent)
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        w = _Writer(tmp, "llama")
        w.add_name(name)
        w.add_file_type(int(_FILE_TYPES[quant]))
        w.add_context_length(config.block_size)
        w.add_embedding_length(config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.n_head)
        w.add_head_count_kv(config.kv_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_freq_base(config.rope_theta)
        w.add_rope_dimension_count(config.rotary_dim)
        if hd * config.n_head != config.n_embd:
            w.add_key_length(hd)
            w.add_value_length(hd)
        w.add_vocab_size(config.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        merges = vocab["merges"] or _NoStrings()
        w.add_key_value("tokenizer.ggml.merges", merges, gguf.GGUFValueType.ARRAY)
        for key, value in vocab["ids"].items():
            w.add_uint32(f"tokenizer.ggml.{key}", int(value))
        w.add_add_bos_token(bool(vocab["add_bos"]))
        head = "token_embd.weight" if config.tie_embeddings else "output.weight"
        for tensor_name, weight in theirs.items():
            # the output head one step wider, as llama.cpp's 4-bit files keep it
            wider = quant == "q4_0" and tensor_name == head
            data, raw = _tensor_data(weight, "q8_0" if wider else quant)
            w.add_tensor(tensor_name, data, raw_dtype=raw)
            kind = raw.name if raw is not None else ("F32" if data.ndim == 1 else "F16")
            counts[kind] = counts.get(kind, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with read_gguf(tmp) as written:
            _compare_configs(llama_config_from_gguf(written), config, path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(path), "bytes": path.stat().st_size, "tensor_types": counts}


__all__ = ["EXPORT_QUANTS", "export_gguf_llama"]
