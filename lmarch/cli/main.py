"""The ``lmarch`` command: thin subcommands over the library.

Every subcommand parses its options and calls one library function. Problems with the user's
input (unknown preset, missing file, bad option) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from lmarch.cli import caption as caption_cli
from lmarch.cli import compare as compare_cli
from lmarch.cli import distributed as distributed_cli
from lmarch.cli import export as export_cli
from lmarch.cli import glove as glove_cli
from lmarch.cli import inspect as inspect_cli
from lmarch.cli import ngram as ngram_cli
from lmarch.cli import serve as serve_cli
from lmarch.cli import tfidf as tfidf_cli
from lmarch.cli import vision as vision_cli
from lmarch.cli import word2vec as word2vec_cli
from lmarch.cli.options import add_config_options, add_union_options, given_values
from lmarch.errors import LmarchError, LmarchNotice


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line with a hint, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _add_decoding_options(
    p: argparse.ArgumentParser,
    temperature: float,
    max_new_tokens: int,
    exclude: Sequence[str] = (),
    summary: bool = True,
) -> None:
    """What ``sample``, ``generate`` and ``chat`` share: the fields of SamplingConfig and
    GenerationConfig as options (this command's defaults for two of them), the speed options
    and (with ``summary``) ``--json``."""
    from lmarch.generation import GenerationConfig, SamplingConfig

    defaults = {"temperature": temperature, "max_new_tokens": max_new_tokens}
    group = p.add_argument_group("decoding (SamplingConfig, GenerationConfig)")
    add_config_options(group, SamplingConfig, defaults=defaults)
    add_config_options(group, GenerationConfig, defaults=defaults, exclude=exclude)
    _add_speed_options(p)
    if summary:
        p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant",
        choices=["auto", "none", "int8", "int4", "q8", "q4"],
        default="auto",
        help="auto (default): a GGUF's own Q4 blocks on lmarch's native kernels when the file "
        "has them (float32 otherwise); none = float32; q4 / q8 = llama.cpp's Q4_1 / Q8_0 "
        "blocks on the native kernels; int4 / int8 = PyTorch's weight-only kernels",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (for --quant int4/int8; q4/q8 layers run natively)",
    )


def build_parser() -> OneLineParser:
    """The argument parser for every subcommand; the settings' options come from the config
    dataclasses (:mod:`lmarch.cli.options`)."""
    from lmarch.generation.generate import BEAM_SETTINGS
    from lmarch.models.registry import FAMILIES
    from lmarch.tasks.classify import ClassifyConfig
    from lmarch.train.config import TrainConfig

    parser = OneLineParser(
        prog="lmarch", description="Language-model architectures from scratch: train, sample, eval."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a model from a preset on a corpus")
    t.add_argument("--preset", help="model preset (see 'lmarch presets')")
    t.add_argument("--data", default="shakespeare", help="'shakespeare', a .txt, folder or .jsonl")
    t.add_argument("--out", required=True, help="run folder for checkpoints, metrics and plots")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    t.add_argument("--config", default=None, help="TOML file of settings ([model] / [train])")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--objective",
        choices=["clm", "mlm", "rtd", "span", "denoise", "seq2seq"],
        default=None,
        help="next-token (decoders), masked LM or ELECTRA replaced-token detection (BERT "
        "family), T5 span corruption, BART denoising, or seq2seq pairs from a JSONL of "
        '{"source", "target"} (encoder-decoders)',
    )
    t.add_argument("--whole-word", action="store_true", help="whole-word masking (mlm/rtd)")
    t.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    t.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="run on N local processes: starts torchrun (use with --strategy ddp or fsdp)",
    )
    # every training and model setting is an option too (unset: the preset's or the run's)
    t.set_defaults(
        train_keys=add_config_options(
            t.add_argument_group("training (TrainConfig)"), TrainConfig, unset=True
        ),
        model_keys=add_union_options(
            t.add_argument_group("model (the preset family's config)"),
            {name: fam.config_cls for name, fam in FAMILIES.items()},
        ),
    )

    s = sub.add_parser("sample", help="generate text from a trained run folder")
    s.add_argument("run_dir", help="a folder written by 'lmarch train'")
    s.add_argument("--prompt", default="\n", help="text to continue")
    _add_decoding_options(s, temperature=0.8, max_new_tokens=500, exclude=["ignore_eos"])

    e = sub.add_parser("eval", help="loss and perplexity of a run on a corpus's validation split")
    e.add_argument("run_dir")
    e.add_argument("--data", default="shakespeare")
    e.add_argument("--json", action="store_true")

    sub.add_parser("presets", help="list model presets with parameter counts")

    g = sub.add_parser("generate", help="continue a raw prompt with a model")
    g.add_argument(
        "model", help="a preset with weights, a .gguf file, an HF folder or a run folder"
    )
    g.add_argument("prompt", help="raw text; special tokens written in it are parsed as such")
    _add_decoding_options(g, temperature=0.0, max_new_tokens=128)

    c = sub.add_parser("chat", help="chat with an instruction-tuned model (/reset, /system, /quit)")
    c.add_argument("model", help="a preset with weights, a .gguf file or an HF folder")
    c.add_argument("--system", default=None, help="system message")
    _add_decoding_options(
        c,
        temperature=0.7,
        max_new_tokens=256,
        exclude=["ignore_eos", *BEAM_SETTINGS],
        summary=False,
    )

    k = sub.add_parser("classify", help="fine-tune an encoder to classify text, or use one")
    ksub = k.add_subparsers(dest="classify_command", required=True, parser_class=OneLineParser)
    kt = ksub.add_parser("train", help="fine-tune + TF-IDF baseline; accuracy, macro-F1, PNG")
    kt.add_argument("--model", default="minilm-l6", help="encoder: preset, HF folder, mlm/rtd run")
    kt.add_argument("--data", required=True, help="a .jsonl of {text, label} or shakespeare-genre")
    kt.add_argument("--out", required=True, help="run folder for the classifier and its report")
    kt.add_argument("--passages-per-play", type=int, default=40, help="shakespeare-genre only")
    kt.set_defaults(
        classify_keys=add_config_options(
            kt.add_argument_group("fine-tuning (ClassifyConfig)"),
            ClassifyConfig,
            aliases={"learning_rate": ["--lr"]},
        )
    )
    kt.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    kt.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    kp = ksub.add_parser("predict", help="label texts with a trained classifier")
    kp.add_argument("run_dir", help="a folder written by 'lmarch classify train'")
    kp.add_argument("texts", nargs="+", help="text(s) to classify")
    kp.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    em = sub.add_parser("embed", help="embed each non-empty line of a file")
    em.add_argument("model", help="encoder: a preset with weights (minilm-l6), HF folder, run")
    em.add_argument("file", help="a UTF-8 text file, one sentence a line")
    em.add_argument("--out", required=True, help="VECTORS.npy or VECTORS.safetensors")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    se = sub.add_parser("search", help="the lines of a file nearest to a query (cosine)")
    se.add_argument("model", help="encoder: a preset with weights (minilm-l6), HF folder, run")
    se.add_argument("query", help="the text to search for")
    se.add_argument("--index", required=True, help="a text file whose lines are searched")
    se.add_argument("--top-k", type=int, default=5)
    se.add_argument("--cache", default=None, help="where to keep the index embeddings")
    se.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    _add_finetune_parsers(sub)
    _add_quantize_parser(sub)
    _add_answer_parsers(sub)
    _add_seq2seq_parsers(sub)
    ngram_cli.add_parsers(sub)
    tfidf_cli.add_parsers(sub)
    word2vec_cli.add_parsers(sub)
    glove_cli.add_parsers(sub)
    compare_cli.add_parsers(sub)
    distributed_cli.add_parsers(sub)
    inspect_cli.add_parsers(sub)
    export_cli.add_parsers(sub)
    serve_cli.add_parsers(sub)
    vision_cli.add_parsers(sub)
    caption_cli.add_parsers(sub)

    d = sub.add_parser("demo", help="train a small GPT on Shakespeare (~3 min) and sample it")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--max-iters", type=int, default=None)
    return parser


def _add_finetune_parsers(sub: argparse._SubParsersAction) -> None:
    """``lmarch finetune`` (options from FinetuneConfig and TrainConfig) and ``lmarch merge``."""
    from lmarch.tasks.finetune import FINETUNE_TRAIN_DEFAULTS, LEARNING_RATES, FinetuneConfig
    from lmarch.train.config import TrainConfig

    f = sub.add_parser("finetune", help="fine-tune a pretrained causal LM: full, LoRA or QLoRA")
    f.add_argument("model", nargs="?", help="a preset with weights, a .gguf, an HF or run folder")
    f.add_argument("--data", default="shakespeare", help="'shakespeare', a .txt, folder or .jsonl")
    f.add_argument("--out", required=True, help="run folder (adapter in PEFT's format, or weights)")
    f.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    f.add_argument("--config", default=None, help="TOML file of settings")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    f.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    f.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="run on N local processes: starts torchrun (use with --strategy ddp or fsdp)",
    )
    f.set_defaults(
        finetune_keys=add_config_options(
            f.add_argument_group("fine-tuning (FinetuneConfig)"), FinetuneConfig, unset=True
        ),
        train_keys=add_config_options(
            f.add_argument_group(
                "training (TrainConfig; defaults for fine-tuning, learning rates per method: "
                + ", ".join(f"{k} {v[0]:g}" for k, v in LEARNING_RATES.items())
                + ")"
            ),
            TrainConfig,
            unset=True,
            defaults={**FINETUNE_TRAIN_DEFAULTS, "learning_rate": None, "min_lr": None},
        ),
    )
    m = sub.add_parser("merge", help="fold a LoRA run's adapter into full weights")
    m.add_argument("run_dir", help="a folder written by 'lmarch finetune --method lora|qlora'")
    m.add_argument("--out", required=True, help="run folder for the merged model")
    m.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_finetune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.finetune import finetune
    from lmarch.train.run import parse_set_options, read_config_file

    console = Console(stderr=args.json)
    overrides: dict = read_config_file(args.config) if args.config else {}
    overrides.update(parse_set_options(args.set))
    overrides.update(given_values(args, [*args.finetune_keys, *args.train_keys]))
    result = finetune(
        args.model, args.data, args.out, overrides, resume=args.resume, log=console.print
    )
    console.print(
        f"done: {result.iters} iterations, val loss {result.val_loss_before:.4f} -> "
        f"{result.val_loss_after:.4f}, {result.trainable_share:.3%} of parameters trained "
        f"-> {args.out}"
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def _add_seq2seq_parsers(sub: argparse._SubParsersAction) -> None:
    """``lmarch translate`` and ``lmarch summarize`` (:mod:`lmarch.tasks.seq2seq`): train, run
    and eval on {source, target} rows; the two differ only in name."""
    from lmarch.train.config import TrainConfig

    data_help = "a .jsonl of {source, target} rows, or shakespeare-piglatin / shakespeare-speakers"
    for task, what in (("translate", "translate"), ("summarize", "summarize")):
        p = sub.add_parser(task, help=f"{what} text with an encoder-decoder (train, run, eval)")
        psub = p.add_subparsers(dest="seq2seq_command", required=True, parser_class=OneLineParser)
        tr = psub.add_parser("train", help="train a preset, or fine-tune a model folder")
        tr.add_argument("--model", required=True, help="a trainable seq2seq preset or a folder")
        tr.add_argument("--data", required=True, help=data_help)
        tr.add_argument("--out", required=True, help="run folder to write")
        tr.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
        )
        tr.add_argument("--config", default=None, help="TOML file of settings ([model] / [train])")
        tr.add_argument("--eval-rows", type=int, default=200, help="held-out rows scored after")
        tr.set_defaults(
            train_keys=add_config_options(
                tr.add_argument_group("training (TrainConfig)"), TrainConfig, unset=True
            )
        )
        r = psub.add_parser("run", help="decode text(s) with a trained or HF model folder")
        r.add_argument("model", help="a seq2seq run folder or an HF T5 / BART / Marian folder")
        r.add_argument("texts", nargs="+", help="source text(s)")
        e = psub.add_parser("eval", help="BLEU, chrF and ROUGE of a model on rows")
        e.add_argument("model", help="a seq2seq run folder or an HF T5 / BART / Marian folder")
        e.add_argument("--data", required=True, help=data_help)
        e.add_argument("--split", default="test", help="split of a bundled task (train/valid/test)")
        e.add_argument("--limit", type=int, default=None, help="score only the first N rows")
        for q in (r, e):
            q.add_argument(
                "--num-beams", type=int, default=None, help="1: greedy; more: beam search"
            )
            q.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's")
            q.add_argument("--min-new-tokens", type=int, default=None, help="no end before")
            q.add_argument("--length-penalty", type=float, default=None, help="beam score exponent")
            q.add_argument(
                "--no-repeat-ngram-size", type=int, default=None, help="ban repeated n-grams"
            )
        for q in (tr, r, e):
            q.add_argument(
                "--no-truncate", action="store_true", help="refuse a source too long to encode"
            )
            q.add_argument("--json", action="store_true", help="print a JSON summary last")


def cmd_seq2seq(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks import seq2seq

    console = Console(stderr=args.json)
    truncate = not args.no_truncate
    search = {}
    if args.seq2seq_command in ("run", "eval"):  # None: the model folder's or lmarch's default
        search = dict(
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
    if args.seq2seq_command == "run":
        outputs = seq2seq.translate_texts(args.model, args.texts, truncate=truncate, **search)
        if args.json:
            print(json.dumps([{"source": s, "output": o} for s, o in zip(args.texts, outputs)]))
        else:
            for output in outputs:
                print(output)
        return 0
    if args.seq2seq_command == "eval":
        result = seq2seq.evaluate_seq2seq(
            args.model, args.data, args.split, limit=args.limit, truncate=truncate, **search
        )
    else:
        from lmarch.train.run import parse_set_options, read_config_file

        overrides: dict = read_config_file(args.config) if args.config else {}
        overrides.update(parse_set_options(args.set))
        overrides.update(given_values(args, args.train_keys))
        result = seq2seq.train_seq2seq(
            args.command,
            args.model,
            args.data,
            args.out,
            overrides,
            truncate=truncate,
            eval_rows=args.eval_rows,
            log=console.print,
        )
    scores = result.get("eval", result)
    if "bleu" in scores:
        console.print(
            f"{scores['rows']} rows: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}, "
            f"ROUGE-1/2/L {scores['rouge1']:.2f} / {scores['rouge2']:.2f} / "
            f"{scores['rougeL']:.2f}, exact {scores['exact_match']:.1f}%"
        )
    if args.json:
        print(json.dumps(result))
    return 0


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """``lmarch quantize`` (:mod:`lmarch.tasks.quantize`)."""
    q = sub.add_parser("quantize", help="store a model's Linear weights in 8 or 4 bits")
    q.add_argument("model", help="a preset with weights, a .gguf file, an HF or run folder")
    q.add_argument(
        "--method",
        required=True,
        help="int8 | int4 | nf4 | q8_0 | q4_0 (weight-only; see lmarch.tasks.quantize)",
    )
    q.add_argument(
        "--group-size", type=int, default=None, help="int4: 32 (default), 64, 128, 256; nf4: 64"
    )
    q.add_argument("--out", required=True, help="run folder to write (loadable by every command)")
    q.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.quantize import quantize_to_folder

    summary = quantize_to_folder(args.model, args.method, args.out, args.group_size, args.force)
    group = f" group {summary['group_size']}" if summary["group_size"] else ""
    Console(stderr=args.json).print(
        f"quantised {summary['layers']} layers to {summary['method']}{group}: "
        f"{summary['file_bytes'] / 2**20:.1f} MiB -> {args.out}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.finetune import merge_run

    summary = merge_run(args.run_dir, args.out)
    Console(stderr=args.json).print(
        f"merged {summary['merged_layers']} adapted layers ({summary['method']}) -> {args.out}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.train.run import parse_set_options, read_config_file, train_run

    console = Console(stderr=args.json)
    overrides: dict = read_config_file(args.config) if args.config else {}
    overrides.update(parse_set_options(args.set))
    overrides.update(given_values(args, [*args.train_keys, *args.model_keys]))
    result = train_run(
        args.preset,
        args.data,
        args.out,
        overrides,
        resume=args.resume,
        log=console.print,
        objective=args.objective,
        whole_word=args.whole_word,
    )
    console.print(
        f"done: {result.iters} iterations, val loss {result.val_loss:.4f}, "
        f"{result.tokens_per_s:,.0f} tokens/s -> {args.out}"
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def _decoding(args: argparse.Namespace):
    """SamplingConfig and GenerationConfig from the options, checked before any model loads."""
    from lmarch.cli.options import config_from_args, option_fields
    from lmarch.generation import GenerationConfig, SamplingConfig
    from lmarch.tasks.generate import check_decoding

    sampling, generation = (
        config_from_args(
            cls, args, [f.name for f, _ in option_fields(cls) if hasattr(args, f.name)]
        )
        for cls in (SamplingConfig, GenerationConfig)
    )
    check_decoding(sampling, generation)  # e.g. sampling options with --num-beams
    return sampling, generation


def _decode(args: argparse.Namespace, loaded, prompt: str) -> int:
    """Stream the continuation of ``prompt`` (to stderr with ``--json``, which then prints the
    summary as the last line of stdout); shared by ``sample`` and ``generate``."""
    from lmarch.generation import GenerationStats
    from lmarch.tasks.generate import generate_text

    sampling, generation = args.decoding
    if generation.uses_beams:
        return _decode_beams(args, loaded, prompt)
    stats = GenerationStats()
    pieces = []
    out = sys.stderr if args.json else sys.stdout
    for piece in generate_text(
        loaded,
        prompt,
        generation.max_new_tokens,
        sampling,
        seed=generation.seed,
        ignore_eos=generation.ignore_eos,
        stop=generation.stop,
        stats=stats,
    ):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    if args.json:
        summary = {
            "text": "".join(pieces),
            "token_ids": stats.token_ids,
            "prompt_tokens": stats.prompt_tokens,  # after any cut to the context window
            "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
            "load_s": loaded.load_s,
            "quant": loaded.quant,
            "stopped_by": stats.stopped_by,
        }
        print(json.dumps(summary))
    return 0


def _decode_beams(args: argparse.Namespace, loaded, prompt: str) -> int:
    """``_decode`` with ``--num-beams``: the best continuations once the search ends (with
    ``--num-return-sequences`` > 1 each under a header with its score)."""
    from lmarch.generation import GenerationStats
    from lmarch.tasks.generate import beam_text

    generation = args.decoding[1]
    stats = GenerationStats()
    found = beam_text(loaded, prompt, generation, stats=stats)
    out = sys.stderr if args.json else sys.stdout
    for i, beam in enumerate(found):
        if len(found) > 1:
            out.write(("\n" if i else "") + f"--- beam {i + 1}, score {beam.score:.4f}\n")
        out.write(beam.text + "\n")
    if args.json:
        summary = {
            "text": found[0].text,
            "token_ids": stats.token_ids,
            "prompt_tokens": stats.prompt_tokens,
            "beams": [{"text": b.text, "token_ids": b.token_ids, "score": b.score} for b in found],
            "search_s": stats.decode_s,
            "load_s": loaded.load_s,
            "quant": loaded.quant,
            "stopped_by": stats.stopped_by,
        }
        print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from lmarch.loading import load
    from lmarch.tasks.generate import prepare_for_decoding

    args.decoding = _decoding(args)
    loaded = load(args.run_dir, quant=args.quant)
    loaded = loaded.require("causal-lm", "sample")
    prepare_for_decoding(loaded, compile=args.compile)
    if not args.json:
        sys.stdout.write(args.prompt)
    return _decode(args, loaded, args.prompt)


def cmd_eval(args: argparse.Namespace) -> int:
    from lmarch.tasks.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.data)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"val loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
            f"over {result['tokens']:,} tokens"
        )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmarch.models.registry import PRESETS, count_parameters

    table = Table(title="lmarch presets")
    for col in ("preset", "family", "parameters", "tokenizer", "use", "description"):
        # on a narrow terminal only the description wraps
        table.add_column(
            col, justify="right" if col == "parameters" else "left", no_wrap=col != "description"
        )
    for name, p in PRESETS.items():
        n = count_parameters(p.config)
        table.add_row(name, p.family, f"{n / 1e6:,.2f}M", p.tokenizer, p.use, p.description)
    Console().print(table)
    print(
        "use: train = 'lmarch train --preset NAME' trains it; weights = real pretrained weights "
        "(generate, chat, embed, fine-tune); shape only = for parameter and FLOP accounting"
    )
    print("char presets are counted at vocab_size 65 (tinyshakespeare); bpe at the preset's vocab")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmarch.loading import load
    from lmarch.tasks.generate import prepare_for_decoding

    args.decoding = _decoding(args)
    loaded = load(args.model, quant=args.quant).require("causal-lm", "generate")
    prepare_for_decoding(loaded, compile=args.compile)
    return _decode(args, loaded, args.prompt)


def cmd_chat(args: argparse.Namespace) -> int:
    from lmarch.loading import load
    from lmarch.tasks.chat import ChatSession, chat_loop
    from lmarch.tasks.generate import prepare_for_decoding

    sampling, generation = _decoding(args)
    loaded = load(args.model, quant=args.quant).require("causal-lm", "chat")
    prepare_for_decoding(loaded, compile=args.compile)
    session = ChatSession(loaded, sampling, generation.max_new_tokens, args.system, generation.seed)
    chat_loop(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.cli.options import config_from_args
    from lmarch.tasks.classify import ClassifyConfig, predict, train_classifier

    console = Console(stderr=args.json)
    if args.classify_command == "predict":
        results = predict(args.run_dir, args.texts)
        if args.json:
            print(json.dumps(results))
        else:
            for row in results:
                p = row["probabilities"][row["label"]]
                console.print(f"{row['label']}\t{p:.3f}\t{row['text']}", markup=False)
        return 0
    config = config_from_args(ClassifyConfig, args, args.classify_keys)
    options = {}
    if args.data == "shakespeare-genre":
        options = {
            "train_passages_per_play": args.passages_per_play,
            "test_passages_per_play": args.passages_per_play,
        }
    summary = train_classifier(
        args.model,
        args.data,
        args.out,
        config,
        baseline=not args.no_baseline,
        log=console.print,
        data_options=options,
    )
    line = f"fine-tuned: accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}"
    if "baseline" in summary:
        b = summary["baseline"]
        line += f"; TF-IDF baseline: accuracy {b['accuracy']:.3f}, macro-F1 {b['macro_f1']:.3f}"
    console.print(line + f" -> {args.out}")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.embed import embed_file

    summary = embed_file(args.model, args.file, args.out, batch_size=args.batch_size)
    Console(stderr=args.json).print(
        f"{summary['lines']:,} lines -> {summary['dim']}-d vectors in {summary['out']}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.embed import search

    hits = search(args.model, args.index, args.query, top_k=args.top_k, cache=args.cache)
    if args.json:
        print(json.dumps(hits))
    else:
        console = Console()
        for hit in hits:
            console.print(
                f"{hit['rank']:>2}. {hit['score']:.4f}  line {hit['line']}: {hit['text']}",
                markup=False,
                highlight=False,
            )
    return 0


def _add_answer_parsers(sub: argparse._SubParsersAction) -> None:
    """``lmarch answer train|run|eval``: extractive question answering (:mod:`lmarch.tasks.answer`)."""
    from lmarch.tasks.answer import AnswerConfig

    a = sub.add_parser("answer", help="fine-tune an encoder to answer questions from a context")
    asub = a.add_subparsers(dest="answer_command", required=True, parser_class=OneLineParser)
    at = asub.add_parser("train", help="fine-tune for span answers; exact match and F1")
    at.add_argument("--model", default="minilm-l6", help="encoder: preset, HF folder, mlm/rtd run")
    at.add_argument("--data", required=True, help="a SQuAD-layout .jsonl or shakespeare-qa")
    at.add_argument("--out", required=True, help="run folder for the model and its report")
    at.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    at.add_argument("--resume", action="store_true", help="continue the run in --out")
    at.add_argument("--no-baseline", action="store_true", help="skip the speaker baselines")
    at.set_defaults(
        answer_keys=add_config_options(
            at.add_argument_group("fine-tuning (AnswerConfig)"), AnswerConfig, unset=True
        )
    )
    ar = asub.add_parser("run", help="answer a question about a context")
    ar.add_argument("run_dir", help="a folder written by 'lmarch answer train', or an HF QA folder")
    ar.add_argument("question", help="the question")
    ar.add_argument("--context", required=True, help="the text that holds the answer")
    ar.add_argument("--n-best", type=int, default=None, help="answers to list (default: the run's)")
    ae = asub.add_parser("eval", help="exact match and F1 of a trained model on data")
    ae.add_argument("run_dir", help="a folder written by 'lmarch answer train'")
    ae.add_argument("--data", required=True, help="a SQuAD-layout .jsonl or shakespeare-qa")
    ae.add_argument("--split", default="test", help="shakespeare-qa's train, validation or test")
    ae.add_argument("--no-baseline", action="store_true", help="skip the speaker baselines")
    for q in (at, ar, ae):
        q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_answer(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks import answer
    from lmarch.train.run import parse_set_options

    console = Console(stderr=args.json)
    if args.answer_command == "run":
        result = answer.run_answer(args.run_dir, args.context, args.question, n_best=args.n_best)
        if args.json:
            print(json.dumps(result))
        else:
            print(result["answer"])
            Console(stderr=True).print(
                f"probability {result['probability']:.3f}, characters "
                f"{result['start']}-{result['end']} of the context",
                markup=False,
            )
        return 0
    if args.answer_command == "eval":
        summary = answer.evaluate_answerer(
            args.run_dir, args.data, args.split, baseline=not args.no_baseline
        )
    else:
        overrides = {**parse_set_options(args.set), **given_values(args, args.answer_keys)}
        summary = answer.train_answerer(
            args.model,
            args.data,
            args.out,
            answer.answer_config(overrides),
            resume=args.resume,
            baseline=not args.no_baseline,
            log=console.print,
        )
    console.print(answer.describe_scores(summary), markup=False)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmarch.tasks.demo import run_demo

    run_demo(args.out, max_iters=args.max_iters)
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "presets": cmd_presets,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "classify": cmd_classify,
    "embed": cmd_embed,
    "search": cmd_search,
    "demo": cmd_demo,
    "finetune": cmd_finetune,
    "merge": cmd_merge,
    "quantize": cmd_quantize,
    "answer": cmd_answer,
    "translate": cmd_seq2seq,
    "summarize": cmd_seq2seq,
    **ngram_cli.COMMANDS,
    **tfidf_cli.COMMANDS,
    **word2vec_cli.COMMANDS,
    **glove_cli.COMMANDS,
    **compare_cli.COMMANDS,
    **distributed_cli.COMMANDS,
    **inspect_cli.COMMANDS,
    **export_cli.COMMANDS,
    **serve_cli.COMMANDS,
    **vision_cli.COMMANDS,
    **caption_cli.COMMANDS,
}


def _raised_by_config_check(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside a dataclass's ``__post_init__`` (a config refusing a
    value): the user's input, not a bug, so it is shown as one line like an LmarchError."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__post_init__":
            return True
        tb = tb.tb_next
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmarch`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command in ("train", "finetune"):  # --nproc N: torchrun runs N ranks of this
        from lmarch.train.launch import start_ranks

        code = start_ranks(args, sys.argv[1:] if argv is None else list(argv))
        if code is not None:
            return code

    def notice(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, LmarchNotice):
            sys.stderr.write(f"lmarch {args.command}: notice: {message}\n")
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always", LmarchNotice)
        warnings.showwarning = notice
        try:
            return COMMANDS[args.command](args)
        except LmarchError as exc:
            sys.stderr.write(f"lmarch {args.command}: error: {exc}\n")
            return 2
        except ValueError as exc:
            if not _raised_by_config_check(exc):
                raise
            sys.stderr.write(f"lmarch {args.command}: error: {exc}\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write(f"lmarch {args.command}: interrupted (a checkpoint was saved)\n")
            return 130


if __name__ == "__main__":
    sys.exit(main())
