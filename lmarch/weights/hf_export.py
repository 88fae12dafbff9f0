"""Export a model and its tokenizer as a Hugging Face folder that ``transformers`` loads.

The folder holds what ``AutoModelForCausalLM`` / ``AutoModel`` / ``AutoTokenizer`` read:

    config.json + model.safetensors   the family's layout, written by its own writer
                                      (:mod:`hf_gpt2`, :mod:`hf_decoders` for LLaMA and its
                                      variants, :mod:`hf_bert`, :mod:`hf_t5`, :mod:`hf_bart`)
    tokenizer.json                    the ``tokenizers`` library's file: byte-level BPE,
                                      WordPiece, SentencePiece-style Unigram, or a character
                                      vocabulary as a word-level model
    tokenizer_config.json             ``PreTrainedTokenizerFast`` with the special tokens, no
                                      clean-up of spaces on decoding, the chat template
    generation_config.json            BOS / EOS ids, for ``generate`` (causal models)

A CLIP is written as ``CLIPModel`` and ``CLIPProcessor`` read it: its config and weights
(:mod:`hf_clip`), its tokenizer's ``tokenizer.json`` with a ``CLIPTokenizer`` config naming the
start, end and padding tokens, and its image preprocessing as ``preprocessor_config.json``.

A family with no ``transformers`` counterpart (the RNNs, the bigram, the from-scratch
Transformer, the image-text models of :data:`NO_COUNTERPART`) and a quantised model are refused
with one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import Tokenizer, write_json_file

__all__ = ["NO_COUNTERPART", "export_hf_folder", "hf_tokenizer", "save_hf_model"]

# models lmarch trains that no transformers class holds, by class name: why, for the refusal
NO_COUNTERPART = {
    "Blip": "a captioner run (lmarch caption train) has no transformers counterpart: "
    "transformers' BLIP pairs a separate text encoder with its decoder, this captioner has one "
    "causal decoder for captions and matching",
    "FlamingoLM": "a Flamingo run (lmarch flamingo train) has no transformers counterpart: "
    "transformers has no Flamingo model for gated cross-attention layers in a frozen GPT",
}


def _writer(model: nn.Module) -> Callable[[nn.Module, str | Path], Any]:
    """The function writing ``model``'s family in its Hugging Face layout; a family with no
    ``transformers`` counterpart raises :class:`LmarchError`."""
    from lmarch.models.bart import Bart
    from lmarch.models.bert import BertConfig
    from lmarch.models.clip import CLIP
    from lmarch.models.gpt import GPT
    from lmarch.models.llama import Llama
    from lmarch.models.t5 import T5

    if isinstance(model, GPT):
        from lmarch.weights.hf_gpt2 import save_hf_gpt2

        return save_hf_gpt2
    if isinstance(model, Llama):
        from lmarch.weights.hf_decoders import save_hf_decoder

        return save_hf_decoder
    if isinstance(model, T5):
        from lmarch.weights.hf_t5 import save_hf_t5

        return save_hf_t5
    if isinstance(model, Bart):
        from lmarch.weights.hf_bart import save_hf_bart

        return save_hf_bart
    if isinstance(getattr(model, "config", None), BertConfig):
        from lmarch.weights.hf_bert import save_hf_bert

        return save_hf_bert
    if isinstance(model, CLIP):
        from lmarch.weights.hf_clip import save_hf_clip

        return save_hf_clip
    name = type(model).__name__
    raise LmarchError(
        NO_COUNTERPART.get(name, f"a {name} has no Hugging Face transformers counterpart"),
        hint="export works for GPT, LLaMA (and its variants), BERT-family, T5, BART and CLIP",
    )


def save_hf_model(model: nn.Module, out: str | Path) -> str:
    """Write ``model``'s config.json and model.safetensors in its family's Hugging Face layout;
    returns the ``model_type`` written."""
    _writer(model)(model, out)
    return json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))["model_type"]


def _char_tokenizer(chars: list[str]) -> Any:
    """A character vocabulary as a ``tokenizers`` word-level model: every character its own
    pre-token (``isolated`` split on any one character) and the decoder gluing them back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(chars)}
    # no unknown token in the vocabulary: an unseen character is an error, as in lmarch
    hf = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return hf


# sentencepiece's "nmt_nfkc" as lmarch writes it (unigram_normalize.nfkc_rule): NFKC, then
# control characters removed and every whitespace character made a space
_CONTROL_CHARS = r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]"


def _unigram_tokenizer(tok: Any) -> Any:
    """lmarch's SentencePiece-style Unigram model in the ``tokenizers`` library's terms: the
    normaliser (NFKC rule or precompiled charsmap, then sentencepiece's whitespace clean-up), a
    ``Metaspace`` pre-tokenizer that adds the dummy prefix and spells spaces as U+2581 without
    splitting (one Viterbi pass over the whole text, as sentencepiece does), the pieces with
    their scores and byte fallback, and the control pieces as special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from tokenizers.processors import TemplateProcessing

    norm = tok.normalizer
    if not norm.escape_whitespaces or norm.treat_whitespace_as_suffix:
        raise LmarchError("a Unigram tokenizer with unescaped or suffix whitespace has no export")
    pieces = tok.pieces
    hf = Tokenizer(models.Unigram([(p, s) for p, s, _ in pieces], tok.unk_id, tok.byte_fallback))
    steps: list[Any] = []
    if tok.normalization == "nfkc":
        steps += [
            normalizers.NFKC(),
            normalizers.Replace(Regex(_CONTROL_CHARS), ""),
            normalizers.Replace(Regex(r"\s"), " "),
        ]
    elif tok.normalization == "charsmap" and tok.charsmap_bytes:
        steps.append(normalizers.Precompiled(tok.charsmap_bytes))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if steps:
        hf.normalizer = normalizers.Sequence(steps)
    prefix = "always" if norm.add_dummy_prefix else "never"
    hf.pre_tokenizer = pre.Metaspace(replacement="\u2581", prepend_scheme=prefix, split=False)
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []),
        ]
    )
    controls = [p for p, _, kind in pieces if kind == "control"]
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    cls_id, sep_id = getattr(tok, "cls_id", None), getattr(tok, "sep_id", None)
    if cls_id is not None and sep_id is not None:
        cls, sep = tok.id_to_token(cls_id), tok.id_to_token(sep_id)
        hf.post_processor = TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, cls_id), (sep, sep_id)],
        )
    return hf


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """``tokenizer`` as a ``tokenizers.Tokenizer`` giving the same ids: lmarch's byte-level BPE
    and WordPiece convert themselves; a character tokenizer becomes a word-level model over
    single characters, a Unigram one the library's Unigram model. Other kinds are refused."""
    from lmarch.tokenizers.char import CharTokenizer
    from lmarch.tokenizers.unigram import UnigramTokenizer

    if isinstance(tokenizer, CharTokenizer):
        return _char_tokenizer(tokenizer.chars)
    if isinstance(tokenizer, UnigramTokenizer):
        return _unigram_tokenizer(tokenizer)
    to_hf = getattr(tokenizer, "to_hf_tokenizer", None)
    if to_hf is None:
        raise LmarchError(
            f"a {type(tokenizer).__name__} has no tokenizer.json writer here",
            hint="export works with char, byte-level BPE, WordPiece and Unigram tokenizers",
        )
    return to_hf()


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The roles transformers' tokenizer config names, for the tokens this tokenizer has."""
    roles: dict[str, str] = {}
    for role in ("bos", "eos", "pad", "unk", "cls", "sep", "mask"):
        token = getattr(tokenizer, f"{role}_token", None)
        if token is None:
            idx = getattr(tokenizer, f"{role}_id", None)
            to_token = getattr(tokenizer, "id_to_token", None)
            token = to_token(idx) if isinstance(idx, int) and to_token is not None else None
        if isinstance(token, str):
            roles[f"{role}_token"] = token
    return roles


def _token_id(tokenizer: Tokenizer, role: str) -> int | None:
    idx = getattr(tokenizer, f"{role}_token_id", None)
    if idx is None and role == "eos":  # GPT-2's convention: <|endoftext|> ends the text
        specials = getattr(tokenizer, "special_tokens", None)
        idx = specials.get("<|endoftext|>") if isinstance(specials, dict) else None
    return idx if isinstance(idx, int) else None


def _clip_files(
    model: nn.Module, tokenizer: Tokenizer, library: Any, out: Path, preprocessor: Any
) -> list[str]:
    """A CLIP's folder (see the module doc); returns the files written."""
    from lmarch.tokenizers.clip_bpe import BOS, EOS
    from lmarch.weights.hf_clip import save_hf_clip

    token_to_id = getattr(tokenizer, "token_to_id", None)
    start = token_to_id(BOS) if token_to_id is not None else None
    save_hf_clip(model, out, bos_token_id=start)
    files = ["config.json", "model.safetensors"]
    if library is not None:
        library.save(str(out / "tokenizer.json"))
        roles = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, **_special_tokens(tokenizer)}
        config = {"tokenizer_class": "CLIPTokenizer", "clean_up_tokenization_spaces": False,
                  "model_max_length": model.config.block_size, **roles}  # fmt: skip
        write_json_file(out / "tokenizer_config.json", config)
        files += ["tokenizer.json", "tokenizer_config.json"]
    if preprocessor is not None:
        write_json_file(out / "preprocessor_config.json", preprocessor.to_hf_config())
        files.append("preprocessor_config.json")
    return files


def export_hf_folder(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    out: str | Path,
    *,
    chat_template: str | None = None,
    bos_token_id: int | None = None,
    eos_token_ids: tuple[int, ...] = (),
    quant: str = "none",
    preprocessor: Any = None,
) -> dict[str, Any]:
    """Write ``model`` and ``tokenizer`` to ``out`` as a Hugging Face folder (see the module
    doc; an image model's ``preprocessor``, an
    :class:`~lmarch.data.images.ImagePreprocessor`, too); returns what was written:
    ``model_type``, ``files`` and the ``vocab_size`` both sides agree on."""
    if quant != "none":
        raise LmarchError(
            f"this model is quantised ({quant}); the Hugging Face layout holds float weights",
            hint="export the run it was quantised from",
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    _writer(model)  # both checks before writing anything: a refusal leaves no folder
    from lmarch.models.clip import CLIP

    is_clip = isinstance(model, CLIP)
    if tokenizer is None and not is_clip:  # a CLIP's folder may go without one
        raise LmarchError(f"a {type(model).__name__}'s export needs its tokenizer")
    library = None if tokenizer is None else hf_tokenizer(tokenizer)
    if library is not None and vocab is not None and library.get_vocab_size() > vocab:
        raise LmarchError(
            f"the tokenizer has {library.get_vocab_size()} ids, the model's vocabulary {vocab}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_clip:
        files = _clip_files(model, tokenizer, library, out, preprocessor)
        return {"model_type": "clip", "files": files, "vocab_size": vocab, "out": str(out)}
    model_type = save_hf_model(model, out)
    library.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **_special_tokens(tokenizer),
    }
    if chat_template:
        config["chat_template"] = chat_template
    write_json_file(out / "tokenizer_config.json", config)
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # the chat convention's ids, else the tokenizer's own (GPT-2's <|endoftext|> ends a text)
    bos_token_id = bos_token_id if bos_token_id is not None else _token_id(tokenizer, "bos")
    eos = _token_id(tokenizer, "eos")
    eos_token_ids = eos_token_ids or (() if eos is None else (eos,))
    if bos_token_id is not None or eos_token_ids:
        generation = {"bos_token_id": bos_token_id}
        if eos_token_ids:
            generation["eos_token_id"] = (
                eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)
            )
        write_json_file(out / "generation_config.json", generation)
        files.append("generation_config.json")
    return {"model_type": model_type, "files": files, "vocab_size": vocab, "out": str(out)}
