"""Translation and summarisation with encoder-decoder models: train, run and evaluate.

Both tasks are the same machinery on ``{"source": ..., "target": ...}`` rows (a JSONL file, or
one of the bundled tasks of :mod:`lmarch.data.shakespeare_tasks`); they differ only in their
name and in the bundled task a user reaches for (``shakespeare-piglatin`` for translate,
``shakespeare-speakers`` for summarize).

- :func:`train_seq2seq` trains a preset from scratch (through :func:`lmarch.train.run.train_run`
  with the ``seq2seq`` objective) or fine-tunes a model folder (an HF T5 / BART / Marian folder
  or an earlier seq2seq run) with the same Trainer and batches
  (:mod:`lmarch.data.seq2seq`), then scores the result on the held-out rows.
- :func:`translate_texts` decodes sources greedily (y_t = argmax p(y | y_<t, x)) or with beam
  search (:func:`lmarch.generation.seq2seq.seq2seq_beam_search`).
- :func:`evaluate_seq2seq` decodes every row of a split and scores the outputs with
  :func:`score_outputs`: corpus BLEU and chrF from ``sacrebleu`` (Papineni et al. 2002; Popović
  2015) and mean ROUGE-1/2/L F1 from ``rouge-score`` (Lin 2004), all on a 0-100 scale, plus the
  share of outputs equal to their reference.

A source longer than the encoder's positions is cut to fit with a notice, or refused with
``truncate=False``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmarch.data.seq2seq import (
    Seq2SeqBatches,
    Seq2SeqPair,
    Seq2SeqSpecials,
    encode_pairs,
    read_pairs,
    split_pairs,
)
from lmarch.data.shakespeare_tasks import SEQ2SEQ_TASKS, SPLITS, is_bundled_task, task_pairs
from lmarch.errors import LmarchError, LmarchNotice
from lmarch.models.heads import SEQ2SEQ

TASKS = ("translate", "summarize")
TASK_FILE = "seq2seq_task.json"  # written beside the run's checkpoints
DEFAULT_MAX_NEW_TOKENS = 128
# decoding settings besides num_beams / max_new_tokens (BeamSearchConfig field names), and the
# ones that also apply to greedy decoding
SEARCH_SETTINGS = (
    "min_new_tokens",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "renormalize_logits",
)
GREEDY_SETTINGS = ("max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "bad_words_ids")
_DATA_HINT = f"give a .jsonl file of {{source, target}} rows or one of {list(SEQ2SEQ_TASKS)}"


# --- rows ------------------------------------------------------------------------------------------


def read_rows(data: str, split: str = "test") -> list[Seq2SeqPair]:
    """The rows ``data`` names: a bundled task's ``split``, or every row of a JSONL file
    (``split`` applies to bundled tasks only; a file is used whole)."""
    if is_bundled_task(data):
        return task_pairs(data, split)
    if split not in SPLITS:
        raise LmarchError(f"unknown split {split!r}", hint=f"one of {list(SPLITS)}")
    path = Path(data).expanduser()
    if not path.is_file():
        raise LmarchError(f"data not found: {data}", hint=_DATA_HINT)
    return read_pairs(path)


# --- scoring ---------------------------------------------------------------------------------------


def score_outputs(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU and chrF (``sacrebleu.corpus_bleu`` / ``corpus_chrf`` with their defaults), the
    mean ROUGE-1, ROUGE-2 and ROUGE-L F1 of ``rouge_score.RougeScorer`` (no stemming), each
    0-100, and ``exact_match``, the percentage of outputs equal to their reference."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise LmarchError(
            f"scoring needs sacrebleu and rouge-score ({exc.name} is not installed)",
            hint="pip install sacrebleu==2.6.0 rouge-score==0.1.2 (or lmarch[dev])",
        ) from None
    if len(hypotheses) != len(references) or not references:
        raise ValueError("score_outputs needs as many outputs as references, at least one")
    hyps, refs = list(hypotheses), list(references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hyps, refs):
        for key, value in scorer.score(ref, hyp).items():
            rouge[key] += value.fmeasure
    n = len(refs)
    return {
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        **{key: 100.0 * total / n for key, total in rouge.items()},
        "exact_match": 100.0 * sum(h == r for h, r in zip(hyps, refs)) / n,
    }


# --- decoding --------------------------------------------------------------------------------------


def load_seq2seq(spec: str | Path, command: str = "translate run") -> Any:
    """:func:`lmarch.load` of ``spec``, refused in one line unless it is an encoder-decoder."""
    from lmarch.loading import load

    loaded = load(spec)
    if loaded.objective != SEQ2SEQ:
        raise LmarchError(
            f"{loaded.name} holds {loaded.describe()}; {command} needs an encoder-decoder "
            "(T5, BART, Marian or a seq2seq run)"
        )
    return loaded


def _task_info(spec: str | Path) -> dict[str, Any]:
    path = Path(spec) / TASK_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def _source(loaded: Any, text: str, truncate: bool) -> tuple[list[int], int]:
    """(encoder ids of ``text``, its length before any cut)."""
    model = loaded.model
    specials = Seq2SeqSpecials.of(model.config)
    ids = specials.wrap(loaded.tokenizer.encode(text))
    limit = int(model.max_positions)
    if len(ids) <= limit:
        return ids, len(ids)
    if not truncate:
        raise LmarchError(
            f"the source has {len(ids)} tokens, more than the encoder's {limit}",
            hint="shorten it, or drop --no-truncate to cut it to fit",
        )
    return [*ids[: limit - 1], specials.eos_id], len(ids)


def source_ids(loaded: Any, text: str, truncate: bool = True) -> list[int]:
    """The encoder input of ``text``: its ids wrapped in the model's specials, cut to the
    encoder's positions with a notice (``truncate``) or refused."""
    ids, n = _source(loaded, text, truncate)
    if n > len(ids):
        warnings.warn(
            f"source of {n} tokens cut to the encoder's {len(ids)}", LmarchNotice, stacklevel=2
        )
    return ids


def _strip(ids: Sequence[int], config: Any) -> list[int]:
    """Generated ids up to the end token, without the specials a model emits around text."""
    drop = {config.pad_token_id, config.decoder_start_token_id}
    drop |= {getattr(config, "bos_token_id", None), getattr(config, "forced_bos_token_id", None)}
    out = []
    for i in ids:
        if i == config.eos_token_id:
            break
        if i not in drop:
            out.append(int(i))
    return out


def decoding_settings(
    spec: str | Path | Any,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    **given: Any,
) -> dict[str, Any]:
    """The search settings for ``spec``: what is ``given`` (None: not given) wins, then an HF
    folder's own decoding defaults (:func:`lmarch.weights.hf_generation.read_generation_defaults`,
    with a notice naming any it cannot apply), then the run's target length
    (``seq2seq_task.json``), then greedy with :data:`DEFAULT_MAX_NEW_TOKENS`."""
    from lmarch.weights.hf_generation import read_generation_defaults

    folder = None if hasattr(spec, "model") else Path(spec)
    settings: dict[str, Any] = {"num_beams": 1, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    if folder is not None and folder.is_dir():
        settings.update(_task_info(folder))
        defaults, ignored = read_generation_defaults(folder)
        settings.update(defaults)
        if ignored:
            warnings.warn(
                f"{folder.name}'s generation config sets {', '.join(ignored)}, which lmarch "
                "does not apply (greedy or beam search without them)",
                LmarchNotice,
                stacklevel=2,
            )
    given.update(num_beams=num_beams, max_new_tokens=max_new_tokens)
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings["num_beams"] < 1:
        raise LmarchError(f"--num-beams must be at least 1, got {settings['num_beams']}")
    known = {"num_beams", "max_new_tokens", *SEARCH_SETTINGS}
    return {k: v for k, v in settings.items() if k in known}


def decode_ids(loaded: Any, sources: Sequence[Sequence[int]], **settings: Any) -> list[list[int]]:
    """Output ids (specials removed) for source id lists, padded into one batch: greedy when
    ``num_beams`` is 1 (the default), else beam search, with the other ``settings`` of
    :func:`decoding_settings`."""
    from lmarch.data.masking import pad_sequences
    from lmarch.generation.seq2seq import greedy_decode, seq2seq_beam_search, seq2seq_search_config

    model, c = loaded.model, loaded.model.config
    settings = {"num_beams": 1, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **settings}
    settings["max_new_tokens"] = max(1, min(int(settings["max_new_tokens"]), model.max_positions))
    input_ids, mask = pad_sequences([list(s) for s in sources], c.pad_token_id)
    with torch.no_grad():
        if settings["num_beams"] <= 1:
            greedy = {k: v for k, v in settings.items() if k in GREEDY_SETTINGS}
            rows = greedy_decode(model, input_ids, mask, **greedy)[:, 1:]
        else:
            config = seq2seq_search_config(model, **settings)
            rows = seq2seq_beam_search(model, input_ids, config, mask).sequences[:, 1:]
    return [_strip(row.tolist(), c) for row in rows]


def mean_loss(
    loaded: Any, pairs: Sequence[Seq2SeqPair], batch_size: int = 32, truncate: bool = True
) -> float:
    """Teacher-forced cross-entropy per target token (nats, no label smoothing) of the rows,
    inputs built as in training (:mod:`lmarch.data.seq2seq`)."""
    from lmarch.data.seq2seq import collate_seq2seq
    from lmarch.models.transformer import label_smoothed_cross_entropy

    model = loaded.model
    specials = Seq2SeqSpecials.of(model.config)
    limit = int(model.max_positions)
    encoded, _ = encode_pairs(loaded.tokenizer, pairs, specials, limit, limit, truncate)
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, len(encoded), batch_size):
                batch = collate_seq2seq(
                    encoded[lo : lo + batch_size], specials.pad_id, specials.decoder_start_id
                )
                input_ids, mask, decoder_input_ids, labels = batch
                logits = model(input_ids, mask, decoder_input_ids)
                n = int((labels != -100).sum())
                total += float(label_smoothed_cross_entropy(logits, labels, 0.0)) * n
                tokens += n
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def translate_texts(
    spec: str | Path | Any,
    texts: Sequence[str],
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    truncate: bool = True,
    batch_size: int = 32,
    **search: Any,
) -> list[str]:
    """The model's output for each text of ``texts`` (``spec``: a model folder, or a loaded
    model), decoded with :func:`decoding_settings` (``search``: ``min_new_tokens``,
    ``length_penalty``, ``no_repeat_ngram_size``, ...; None = the folder's or the default)."""
    settings = decoding_settings(spec, num_beams, max_new_tokens, **search)
    loaded = spec if hasattr(spec, "model") else load_seq2seq(spec)
    encoded = [_source(loaded, t, truncate) for t in texts]
    ids = [i for i, _ in encoded]
    cut = [n for i, n in encoded if n > len(i)]
    if cut:  # one line for the lot, not one per row
        limit = int(loaded.model.max_positions)
        what = f"source of {cut[0]} tokens" if len(texts) == 1 else f"{len(cut)} sources"
        warnings.warn(f"{what} cut to the encoder's {limit}", LmarchNotice, stacklevel=2)
    outputs = []
    for lo in range(0, len(ids), batch_size):
        for row in decode_ids(loaded, ids[lo : lo + batch_size], **settings):
            outputs.append(loaded.tokenizer.decode(row))
    return outputs


def evaluate_seq2seq(
    spec: str | Path | Any,
    data: str,
    split: str = "test",
    num_beams: int | None = None,
    limit: int | None = None,
    truncate: bool = True,
    max_new_tokens: int | None = None,
    **search: Any,
) -> dict[str, Any]:
    """Decode the rows of ``data`` (a bundled task's ``split`` or a JSONL file; the first
    ``limit`` rows if given) and score them (:func:`score_outputs`). Returns the metrics, the
    teacher-forced ``loss`` (:func:`mean_loss`), the row count, the decoding settings and the
    first three (source, output, reference)."""
    rows = read_rows(data, split)[: limit or None]
    if not rows:
        raise LmarchError(f"{data} has no rows in split {split!r}")
    start = time.perf_counter()
    settings = decoding_settings(spec, num_beams, max_new_tokens, **search)
    loaded = spec if hasattr(spec, "model") else load_seq2seq(spec, "eval")
    outputs = translate_texts(loaded, [r.source for r in rows], truncate=truncate, **settings)
    result: dict[str, Any] = score_outputs(outputs, [r.target for r in rows])
    result.update(
        loss=mean_loss(loaded, rows, truncate=truncate),
        rows=len(rows),
        data=data,
        split=split if is_bundled_task(data) else None,
        num_beams=settings["num_beams"],
        decoding=settings,
        decode_s=time.perf_counter() - start,
        examples=[
            {"source": r.source, "output": o, "reference": r.target}
            for r, o in zip(rows[:3], outputs[:3])
        ],
    )
    return result


# --- training --------------------------------------------------------------------------------------


def _training_pairs(data: str, val_fraction: float) -> tuple[list[Seq2SeqPair], list[Seq2SeqPair]]:
    """(train, validation) rows: a bundled task's ``train`` and ``valid`` splits, or a JSONL
    file's rows split by :func:`lmarch.data.seq2seq.split_pairs`."""
    if is_bundled_task(data):
        return read_rows(data, "train"), read_rows(data, "valid")
    return split_pairs(read_rows(data), val_fraction)


def _max_new_tokens(tokenizer: Any, pairs: Sequence[Seq2SeqPair], limit: int) -> int:
    """Room for the longest training target and half as much again (capped at ``limit``)."""
    longest = max(len(tokenizer.encode(p.target)) for p in pairs[:5000])
    return min(limit, int(longest * 1.5) + 2)


def _fine_tune(
    base: str,
    train: list[Seq2SeqPair],
    val: list[Seq2SeqPair],
    out: Path,
    overrides: dict[str, Any],
    truncate: bool,
    log: Callable[[str], None],
) -> Any:
    """Train the encoder-decoder of folder ``base`` further on the rows; the run folder is
    laid out as ``lmarch train`` writes it (objective ``seq2seq``) so every command loads it."""
    from lmarch.models.registry import config_to_dict, family_of_config
    from lmarch.settings import build_config
    from lmarch.train.callbacks import ProgressBar
    from lmarch.train.config import TrainConfig
    from lmarch.train.run import split_overrides
    from lmarch.train.trainer import Trainer
    from lmarch.weights.checkpoint import write_json

    if out.expanduser().resolve() == Path(base).expanduser().resolve():
        raise LmarchError(
            f"--out {out} is the model's own folder", hint="write the run to a new folder"
        )
    loaded = load_seq2seq(base, "translate train")
    model, tokenizer = loaded.model, loaded.tokenizer
    family = family_of_config(model.config).name
    model_over, train_over = split_overrides(family, overrides)
    if model_over:
        raise LmarchError(
            f"cannot change the settings of a model that is already built: {sorted(model_over)}"
        )
    train_cfg = build_config(TrainConfig, {"warmup_iters": 20, **train_over})
    specials = Seq2SeqSpecials.of(model.config)
    limit = int(model.max_positions)
    encoded = []
    for part in (train, val):
        ids, cut = encode_pairs(tokenizer, part, specials, limit, limit, truncate)
        if cut:
            warnings.warn(f"{cut} rows cut to {limit} tokens", LmarchNotice, stacklevel=2)
        encoded.append(ids)
    batches = [
        Seq2SeqBatches(ids, train_cfg.batch_size, specials, seed=train_cfg.seed + k)
        for k, ids in enumerate(encoded)
    ]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    write_json(
        out / "config.json",
        {
            "preset": None,
            "base": str(base),
            "objective": "seq2seq",
            "model": config_to_dict(model.config),
            "train": dataclasses.asdict(train_cfg),
        },
    )
    from lmarch.models.transformer import Seq2SeqLoss

    log(f"{loaded.name}: fine-tuning on {len(train):,} rows ({len(val):,} held out)")
    trainer = Trainer(
        model.train(),
        batches[0],
        batches[1],
        train_cfg,
        out_dir=out,
        loss_fn=Seq2SeqLoss(0.0),
        callbacks=[ProgressBar()],
    )
    return trainer.fit()


def train_seq2seq(
    task: str,
    model: str,
    data: str,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    truncate: bool = True,
    eval_rows: int | None = 200,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model`` (a trainable preset, or a folder to fine-tune) on the rows of ``data``
    into run folder ``out``; then decode up to ``eval_rows`` held-out rows greedily (a bundled
    task's ``test`` split, or the file's validation rows) and score them.

    Returns the training result (iterations, losses, tokens/s) with the scores under
    ``"eval"``; the run folder also gets ``seq2seq_task.json`` (task, data, decoding length).
    ``truncate=False`` refuses over-long rows when fine-tuning; a preset's run (whose
    tokenizer is trained inside :func:`~lmarch.train.run.train_run`) cuts them with a notice.
    """
    from lmarch.models.registry import PRESETS

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out = Path(out)
    overrides = dict(overrides or {})
    val_fraction = float(overrides.get("val_fraction", 0.1))
    train, val = _training_pairs(data, val_fraction)
    if model in PRESETS:
        from lmarch.train.run import train_run

        # a bundled task trains on its train plays and validates on its valid play there too
        result = train_run(model, data, out, overrides, log=log, objective="seq2seq")
    elif Path(model).expanduser().is_dir():
        result = _fine_tune(model, train, val, out, overrides, truncate, log)
    else:
        from lmarch.models.registry import get_preset

        get_preset(model)  # an unknown preset name: one line naming the closest ones
        raise AssertionError("unreachable")
    loaded = load_seq2seq(out, f"{task} train")
    held_out = read_rows(data, "test") if is_bundled_task(data) else val
    info = {
        "task": task,
        "data": data,
        "max_new_tokens": _max_new_tokens(loaded.tokenizer, train, int(loaded.model.max_positions)),
    }
    (out / TASK_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    summary = {**result.as_dict(), "task": task, "data": data, "out": str(out)}
    if eval_rows:
        rows = held_out[:eval_rows]
        outputs = translate_texts(loaded, [r.source for r in rows], 1, info["max_new_tokens"])
        summary["eval"] = {**score_outputs(outputs, [r.target for r in rows]), "rows": len(rows)}
    return summary


__all__ = [
    "TASKS",
    "TASK_FILE",
    "decode_ids",
    "evaluate_seq2seq",
    "load_seq2seq",
    "mean_loss",
    "read_rows",
    "score_outputs",
    "source_ids",
    "train_seq2seq",
    "translate_texts",
]
