"""A training run from names: preset + data + overrides -> tokenizer, model, Trainer, run folder.

This is what ``lmarch train`` does; the CLI only parses arguments and calls :func:`train_run`.
Overrides use nanoGPT's names and go to whichever config owns the key (model or training).

The objective picks the batches and the loss the one Trainer runs: next-token prediction
(``clm``, decoders) on random windows of the token stream, or, for the BERT family, masked LM
(``mlm``, Devlin et al. 2019) or ELECTRA's replaced-token detection (``rtd``, Clark et al.
2020) on padded batches of ``[CLS] lines... [SEP]`` sequences (see
:mod:`lmarch.train.objectives`). Encoder-decoders (T5, the Transformer, BART / Marian) train
on (source, target) pairs: T5's span corruption (``span``) or BART's denoising (``denoise``)
of windows of the text (:mod:`lmarch.data.noising`), or the rows of a JSONL file of
``{"source", "target"}`` (``seq2seq``, :mod:`lmarch.data.seq2seq`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmarch.data.batches import RandomBlockSampler, StreamSampler
from lmarch.data.corpus import load_documents, train_val_split
from lmarch.data.masking import MaskedLMBatches, MaskedLMCollator, pack_lines
from lmarch.data.noising import T5_EXTRA_IDS, add_sentinels, noising_batches, seq2seq_unigram
from lmarch.data.seq2seq import (
    Seq2SeqBatches,
    Seq2SeqSpecials,
    encode_pairs,
    read_pairs,
    split_pairs,
)
from lmarch.data.shakespeare_tasks import is_bundled_task, task_pairs
from lmarch.errors import LmarchError
from lmarch.models.registry import (
    FAMILIES,
    build_model,
    config_from_dict,
    config_to_dict,
    family_of_config,
    get_preset,
    replace_config,
)
from lmarch.settings import build_config, route_settings
from lmarch.tokenizers.base import Tokenizer, load_tokenizer
from lmarch.tokenizers.kinds import build_tokenizer
from lmarch.train.callbacks import LossPlot, ProgressBar
from lmarch.train.config import TrainConfig, merge_saved_settings
from lmarch.train.distributed import is_main, teardown
from lmarch.train.objectives import (
    SEQ2SEQ_OBJECTIVES,
    masking_for,
    objective_loss,
    objective_model,
)
from lmarch.train.parallelize import describe_memory
from lmarch.train.tbptt import CarriedStateLoss
from lmarch.train.trainer import Callback, Trainer, TrainResult, causal_lm_loss
from lmarch.weights.checkpoint import read_json, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def parse_set_options(items: Sequence[str]) -> dict[str, str]:
    """``["n_layer=4", "dropout=0.1"]`` -> ``{"n_layer": "4", "dropout": "0.1"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmarchError(f"--set expects key=value, got {item!r}", hint="e.g. --set n_layer=4")
        out[key.strip()] = value.strip()
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Overrides from a TOML file: top-level keys, or keys inside ``[model]`` / ``[train]``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmarchError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LmarchError(f"{path} is not valid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("model", "train"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def split_overrides(
    family: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route each key to the model config or the training config, parsing strings by field type."""
    model_cls = FAMILIES[family].config_cls
    model_over, train_over = route_settings(overrides, model_cls, TrainConfig)
    return model_over, train_over


ENCODER_OBJECTIVES = ("mlm", "rtd")
# what each encoder-decoder family trains with, its default (which plain text allows) first
SEQ2SEQ_FAMILIES = {
    "t5": ("span", "seq2seq"),
    "transformer": ("denoise", "seq2seq"),
    "bart": ("denoise", "seq2seq"),
}


def resolve_objective(family: str, objective: str | None) -> str:
    """The objective of a run: ``clm`` for decoders, ``mlm`` (default) or ``rtd`` for the
    BERT family, ``span`` (default) or ``seq2seq`` for T5, ``denoise`` (default) or
    ``seq2seq`` for the Transformer and BART / Marian; a mismatch is the user's error."""
    if family in SEQ2SEQ_FAMILIES:
        allowed = SEQ2SEQ_FAMILIES[family]
        objective = objective or allowed[0]
        if objective not in allowed:
            raise LmarchError(
                f"a {family} model trains with --objective {' or '.join(allowed)}, not "
                f"{objective!r}"
            )
        return objective
    if objective in ("span", "denoise", "seq2seq"):
        raise LmarchError(
            f"--objective {objective} needs an encoder-decoder preset, not the {family} family",
            hint="e.g. --preset t5-tiny (span), bart-tiny (denoise)",
        )
    if family == "bert":
        objective = objective or "mlm"
        if objective not in ENCODER_OBJECTIVES:
            raise LmarchError(
                f"a BERT-family model trains with --objective mlm or rtd, not {objective!r}"
            )
        return objective
    objective = objective or "clm"
    if objective != "clm":
        raise LmarchError(
            f"--objective {objective} needs a BERT-family preset, not the {family} family",
            hint="e.g. --preset bert-tiny",
        )
    return objective


def masked_lm_sequences(
    tokenizer: Tokenizer, text: str, max_length: int, whole_word: bool = False
) -> tuple[list[list[int]], list[list[int]] | None]:
    """The text's non-empty lines tokenised and packed into ``[CLS] ... [SEP]`` sequences of
    at most ``max_length`` tokens, with per-sequence word ids when ``whole_word``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if whole_word and not hasattr(tokenizer, "word_ids"):
        raise LmarchError(
            f"whole-word masking needs a tokenizer that knows its words (WordPiece), not "
            f"{type(tokenizer).__name__}",
            hint="drop --whole-word",
        )
    ids = [tokenizer.encode(line) for line in lines]
    words = [tokenizer.word_ids(line) for line in lines] if whole_word else None
    return pack_lines(ids, max_length, tokenizer.cls_id, tokenizer.sep_id, words)


def masked_lm_batches(
    tokenizer: Tokenizer,
    text: str,
    max_length: int,
    batch_size: int,
    objective: str,
    whole_word: bool,
    seed: int,
) -> MaskedLMBatches:
    """Masked batches of ``text`` for the ``mlm`` or ``rtd`` objective."""
    seqs, words = masked_lm_sequences(tokenizer, text, max_length, whole_word)
    if not seqs:
        raise LmarchError("no text left to make masked-LM sequences from")
    collator = MaskedLMCollator(
        tokenizer.mask_id,
        tokenizer.vocab_size,
        tokenizer.special_ids,
        masking_for(objective, whole_word),
    )
    return MaskedLMBatches(
        seqs,
        collator,
        batch_size,
        tokenizer.pad_id,
        word_ids=words,
        seed=seed,
        with_noise=objective == "rtd",
    )


def encode(tokenizer: Tokenizer, text: str) -> Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def read_run_data(data: str, objective: str, val_fraction: float) -> tuple[str, str, list, list]:
    """``(train text, val text, train pairs, val pairs)``: the corpus split as
    :func:`train_val_split` does, or for ``seq2seq`` the JSONL rows split by
    :func:`lmarch.data.seq2seq.split_pairs` (their texts, one per line, train a tokenizer)."""
    if objective != "seq2seq":
        train_text, val_text = train_val_split(load_documents(data), val_fraction)
        return train_text, val_text, [], []
    if is_bundled_task(data):  # shakespeare-piglatin / -speakers: split by play already
        train, val = task_pairs(data, "train"), task_pairs(data, "valid")
    else:
        train, val = split_pairs(read_pairs(data), val_fraction)

    def text(rows: list) -> str:
        return "\n".join(f"{r.source}\n{r.target}" for r in rows)

    return text(train), text(val), train, val


def _token_id(tokenizer: Tokenizer, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def seq2seq_token_ids(config: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    """The special-token fields of an encoder-decoder ``config`` taken from its tokenizer:
    padding and end of sequence; the decoder starts with the padding token (T5, Marian), the
    beginning token (the Transformer) or the end token (BART), as each family does."""
    pad = _token_id(tokenizer, "pad_id", "pad_token_id")
    eos = _token_id(tokenizer, "eos_id", "eos_token_id", "sep_id")
    bos = _token_id(tokenizer, "bos_id", "bos_token_id", "cls_id")
    if pad is None or eos is None:
        raise LmarchError(
            f"an encoder-decoder needs padding and end-of-sequence tokens; this "
            f"{type(tokenizer).__name__} lacks {'padding' if pad is None else 'an end token'}"
        )
    family = family_of_config(config).name
    if family == "t5":
        return {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}
    ids: dict[str, Any] = {"pad_token_id": pad, "eos_token_id": eos, "forced_eos_token_id": None}
    if family == "bart":
        marian = config.variant == "marian"
        ids["forced_eos_token_id"] = eos
        ids["bos_token_id"] = None if marian else bos
        ids["decoder_start_token_id"] = pad if marian or bos is None else eos
        if config.forced_bos_token_id is not None:
            ids["forced_bos_token_id"] = bos
        return ids
    ids["bos_token_id"] = bos
    ids["decoder_start_token_id"] = bos if bos is not None else pad
    return ids


def seq2seq_tokenizer(
    family: str, config: Any, kind: str, train_text: str, val_text: str
) -> Tokenizer:
    """The vocabulary an encoder-decoder run trains: for a Unigram kind, T5's layout
    (``<pad> </s> <unk>``) with T5's 100 sentinels (T5) or a ``<mask>`` (Marian, for
    denoising); any other kind as :func:`build_tokenizer` makes it (T5 then gets sentinels
    added, which only a Unigram vocabulary can take)."""
    if kind == "unigram":
        if family == "t5":
            return seq2seq_unigram(train_text, config.vocab_size, extra_ids=T5_EXTRA_IDS)
        return seq2seq_unigram(train_text, config.vocab_size, mask_token=True)
    tokenizer = build_tokenizer(kind, train_text, val_text, config.vocab_size)
    return add_sentinels(tokenizer) if family == "t5" else tokenizer


def seq2seq_batches(
    tokenizer: Tokenizer,
    config: Any,
    objective: str,
    texts: tuple[str, str],
    pairs: tuple[list, list],
    batch_size: int,
    seed: int,
    log=print,
) -> tuple[Seq2SeqBatches, Seq2SeqBatches, str]:
    """Train and val batches of an encoder-decoder objective, and a line saying their sizes:
    noised windows of the text (``span``, ``denoise``) or the encoded rows (``seq2seq``;
    rows longer than ``block_size`` are cut, with a notice)."""
    specials = Seq2SeqSpecials.of(config)
    length = config.block_size
    out = []
    if objective == "seq2seq":
        cut = 0
        for i, rows in enumerate(pairs):
            encoded, n_cut = encode_pairs(tokenizer, rows, specials, length, length)
            cut += n_cut
            out.append(Seq2SeqBatches(encoded, batch_size, specials, seed=seed + i))
        if cut:
            log(f"notice: {cut} rows were cut to the model's {length} tokens")
        sizes = f"{len(pairs[0]):,} train / {len(pairs[1]):,} val pairs"
        return out[0], out[1], sizes
    for i, (text, split) in enumerate(zip(texts, ("training text", "validation text"))):
        ids = tokenizer.encode(text)
        out.append(
            noising_batches(
                tokenizer, ids, objective, specials, length, batch_size, seed + i, split
            )
        )
    sizes = (
        f"{len(out[0].examples):,} train / {len(out[1].examples):,} val windows of "
        f"{out[0].block_size} tokens, objective {objective}"
    )
    return out[0], out[1], sizes


def clm_batches(
    config: Any, train_ids: Tensor, val_ids: Tensor, train_cfg: TrainConfig
) -> tuple[Any, Any]:
    """Next-token batches of ``config.block_size`` tokens from each split: random windows
    (:class:`RandomBlockSampler`), or for a recurrent model contiguous streams it carries its
    state along (:class:`StreamSampler`, truncated BPTT)."""
    recurrent = family_of_config(config).name == "rnn"
    sampler = StreamSampler if recurrent else RandomBlockSampler
    size, batch, seed = config.block_size, train_cfg.batch_size, train_cfg.seed
    try:
        return sampler(train_ids, size, batch, seed), sampler(val_ids, size, batch, seed + 1)
    except ValueError as exc:
        raise LmarchError(str(exc), hint="give more text or --set block_size=SMALLER") from None


def clm_loss(config: Any) -> Any:
    """The next-token loss for ``config``'s family: with the state carried between batches for
    a recurrent model (:class:`~lmarch.train.tbptt.CarriedStateLoss`), else per window."""
    return CarriedStateLoss() if family_of_config(config).name == "rnn" else causal_lm_loss


def train_run(
    preset: str | None,
    data: str,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] | None = None,
    log=print,
    objective: str | None = None,
    whole_word: bool = False,
) -> TrainResult:
    """Train ``preset`` on ``data`` into run folder ``out`` (or continue it with ``resume``).

    On resume the run's saved configs are used, with ``overrides`` applied on top (typically a
    larger ``max_iters``). ``callbacks`` default to a progress bar and the loss plot.
    ``objective`` is ``clm`` (decoders; the default) or ``mlm`` (the BERT family's default) /
    ``rtd``, or for encoder-decoders (:func:`resolve_objective`) ``span`` / ``denoise`` on
    text or ``seq2seq`` with ``data`` a JSONL of ``{"source", "target"}`` rows (the last
    ``val_fraction`` of them for validation); ``whole_word`` switches masked LM to whole-word
    masking.
    """
    out = Path(out)
    overrides = dict(overrides or {})
    main_rank = is_main()  # under torchrun only rank 0 logs and writes the run folder
    if not main_rank:
        log = _silent
    if resume:
        if not (out / "config.json").is_file():
            raise LmarchError(f"nothing to resume in {out}", hint="drop --resume to start a run")
        saved = read_json(out / "config.json")
        family = saved["model"]["family"]
        model_over, train_over = split_overrides(family, overrides)
        if model_over:
            raise LmarchError(f"cannot change model settings on resume: {sorted(model_over)}")
        train_cfg = build_config(TrainConfig, merge_saved_settings(saved["train"], train_over))
        model_cfg = config_from_dict(saved["model"])
        tokenizer = load_tokenizer(out / "tokenizer.json")
        if preset is not None and saved.get("preset") not in (None, preset):
            raise LmarchError(
                f"{out} holds a run of preset {saved['preset']!r}, not {preset!r}",
                hint="--resume continues the run as it was started: drop --preset or give the same",
            )
        data = saved.get("data", data)
        preset = saved.get("preset")
        objective = resolve_objective(family, saved.get("objective"))
        whole_word = bool(saved.get("whole_word", False))
        train_text, val_text, train_pairs, val_pairs = read_run_data(
            data, objective, train_cfg.val_fraction
        )
    else:
        if preset is None:
            raise LmarchError("no preset given", hint="e.g. --preset gpt-char-tiny")
        p = get_preset(preset)
        if p.use == "weights":
            raise LmarchError(
                f"preset {preset} holds real pretrained weights; it is not trained from scratch",
                hint="use it with generate, chat or embed, or fine-tune it with classify train",
            )
        if not p.trainable:
            raise LmarchError(
                f"preset {preset} is shape only (parameter and FLOP accounting); it is not "
                "trained here",
                hint="'lmarch presets' lists the trainable ones (use column 'train')",
            )
        objective = resolve_objective(p.family, objective)
        model_over, train_over = split_overrides(p.family, overrides)
        # both configs are checked before any text is read or any tokenizer trained
        train_cfg = build_config(TrainConfig, {**p.train, **train_over})
        model_cfg = replace_config(p.config, **model_over)
        train_text, val_text, train_pairs, val_pairs = read_run_data(
            data, objective, train_cfg.val_fraction
        )
        if objective in SEQ2SEQ_OBJECTIVES:
            tokenizer = seq2seq_tokenizer(p.family, model_cfg, p.tokenizer, train_text, val_text)
            ids = seq2seq_token_ids(model_cfg, tokenizer)
            model_cfg = replace_config(model_cfg, vocab_size=tokenizer.vocab_size, **ids)
        else:
            tokenizer = build_tokenizer(p.tokenizer, train_text, val_text, model_cfg.vocab_size)
            model_cfg = replace_config(model_cfg, vocab_size=tokenizer.vocab_size)
    if objective in SEQ2SEQ_OBJECTIVES:
        train_batches, val_batches, sizes = seq2seq_batches(
            tokenizer,
            model_cfg,
            objective,
            (train_text, val_text),
            (train_pairs, val_pairs),
            train_cfg.batch_size,
            train_cfg.seed,
            log,
        )
    elif objective == "clm":
        block_size = model_cfg.block_size
        train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
        if len(val_ids) <= block_size + 1:
            raise LmarchError(
                f"the validation split has only {len(val_ids)} tokens, too few for block_size "
                f"{block_size}",
                hint="give more text or --set block_size=SMALLER",
            )
        train_batches, val_batches = clm_batches(model_cfg, train_ids, val_ids, train_cfg)
        sizes = f"{len(train_ids):,} train / {len(val_ids):,} val tokens"
    else:
        make = functools.partial(
            masked_lm_batches,
            tokenizer,
            max_length=model_cfg.max_positions,
            batch_size=train_cfg.batch_size,
            objective=objective,
            whole_word=whole_word,
        )
        train_batches = make(train_text, seed=train_cfg.seed)
        val_batches = make(val_text, seed=train_cfg.seed + 1)
        sizes = (
            f"{len(train_batches.sequences):,} train / {len(val_batches.sequences):,} val "
            f"sequences, objective {objective}"
        )
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg) if objective == "clm" else objective_model(objective, model_cfg)
    if not resume and main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        tokenizer.save(out / "tokenizer.json")
    if main_rank:
        write_json(
            out / "config.json",
            {
                "preset": preset,
                "data": data,
                "objective": objective,
                "whole_word": whole_word,
                "model": config_to_dict(model_cfg),
                "train": dataclasses.asdict(train_cfg),
            },
        )
    log(
        f"{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab "
        f"{tokenizer.vocab_size}, {sizes}"
    )
    trainer = Trainer(
        model,
        train_batches,
        val_batches,
        train_cfg,
        out_dir=out,
        loss_fn=clm_loss(model_cfg) if objective == "clm" else objective_loss(objective, model_cfg),
        callbacks=[ProgressBar(), LossPlot()] if callbacks is None else callbacks,
    )
    if trainer.distributed:
        log(describe_memory(trainer.model, train_cfg.strategy, trainer.dist.world_size))
    try:
        return trainer.fit(resume=resume)
    finally:
        trainer.release()
        teardown()  # leave the process group (if the strategy started one)


def _silent(*args: Any, **kwargs: Any) -> None:
    """The ``log`` of ranks other than 0."""
